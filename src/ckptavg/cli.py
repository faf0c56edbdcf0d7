"""The ``ckptavg`` command: parse options, call one function of :mod:`ckptavg.api`, print results.

stdout carries only results (one output path per line, or JSON lines with ``--json``), so
``ckptavg lawa ... | xargs ...`` works; progress, logs and errors go to stderr. Exit codes: 0 success,
1 a problem with the input or the output (one line naming the file, step or tensor), 2 a usage error.
Set CKPTAVG_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckptavg import __version__
from ckptavg.errors import CkptavgError
from ckptavg.steps import STEP_RANGE

if TYPE_CHECKING:
    from ckptavg.api import Plan

# torch takes a second to import: commands import the library when they run, so --help is instant.
OUTPUT_DTYPES = ("bfloat16", "float16", "float32", "float64")


class _Cli(click.Group):
    """Turns library errors into one line and exit code 1 (Click's own usage errors exit 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptavgError as e:
            if os.environ.get("CKPTAVG_DEBUG"):
                raise
            raise click.ClickException(str(e)) from e


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ckptavg")
def cli() -> None:
    """Average the checkpoints of a training run into better models (LAWA, EMA, SWA).

    \b
    ckptavg ls   runs/pythia-70m
    ckptavg lawa runs/pythia-70m --steps 21000:141000 --k 5 --interval 3000 --out lawa/
    ckptavg ema  runs/pythia-70m --steps 1000:143000 --decay 0.9 --interval 3000 --out ema/
    ckptavg swa  runs/pythia-70m --steps 107000:143000 --start 107000 --every 1000 --out swa/
    ckptavg avg  a/ b/ c/ --weights 0.2,0.3,0.5 --out soup/
    """


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count (decimal units, as transformers reads them)."""
    t = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "TIB": 1 << 40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    for unit, mult in units.items():
        number = t[: -len(unit)]
        if t.endswith(unit) and number.replace(".", "", 1).isdigit():
            return int(float(number) * mult)
    if t.isdigit():
        return int(t)
    raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _write_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every averaging command shares."""
    for opt in reversed(
        [
            click.option(
                "--out",
                "-o",
                type=click.Path(path_type=Path),
                required=True,
                help="Folder to write into (one step{N}/ folder per output; avg writes the folder itself).",
            ),
            click.option("--dry-run", is_flag=True, help="Print the plan (members, weights, bytes to read) and stop."),
            click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of plain paths."),
            click.option(
                "--overwrite",
                is_flag=True,
                help="Replace outputs that exist (otherwise refused, or skipped when the same plan made them).",
            ),
            click.option(
                "--accumulate",
                type=click.Choice(["float32", "float64"]),
                default="float32",
                show_default=True,
                help="Accumulator dtype (overlapping LAWA windows always keep exact float64 running sums).",
            ),
            click.option(
                "--dtype",
                type=click.Choice(OUTPUT_DTYPES),
                default=None,
                help="Output dtype of averaged tensors [default: the input's].",
            ),
            click.option(
                "--device", default="cpu", show_default=True, help="Where to do the arithmetic: cpu, cuda, cuda:1."
            ),
            click.option(
                "--max-shard-size",
                default="5GB",
                show_default=True,
                callback=_size,
                help="Split output weights into shards of at most this size.",
            ),
            click.option(
                "--format",
                "fmt",
                type=click.Choice(["safetensors", "ckpt"]),
                default="safetensors",
                show_default=True,
                help="ckpt: also write nanoGPT's ckpt.pt (nanoGPT sources only).",
            ),
            click.option("--allow-nonfinite", is_flag=True, help="Average NaN/Inf inputs instead of refusing them."),
            click.option(
                "--allow-legacy-pickle",
                is_flag=True,
                help="Load legacy (non-zip) torch pickles whole into memory (weights_only still applies).",
            ),
            click.option("--quiet", "-q", is_flag=True, help="No progress or log lines on stderr."),
            click.option("--chunk", type=click.IntRange(min=1024), default=None, hidden=True),
        ]
    ):
        f = opt(f)
    return f


def _emit_plan(plan: Plan, as_json: bool) -> None:
    from ckptavg.api import describe
    from ckptavg.progress import human_bytes

    for row in describe(plan):
        if as_json:
            click.echo(json.dumps(row))
        else:
            members = ",".join(str(m) for m in row["members"])
            weights = ",".join(f"{w:.6g}" for w in row["weights"])
            step = "-" if row["step"] is None else row["step"]
            click.echo(
                f"{row['out']}\t{row['method']}\tstep={step}\tmembers={members}\tweights={weights}\t"
                f"read={human_bytes(row['bytes_to_read']).replace(' ', '')}"
            )


def _execute(plan: Plan, kw: dict[str, Any]) -> None:
    from ckptavg import api
    from ckptavg.progress import Reporter

    if kw["dry_run"]:
        _emit_plan(plan, kw["as_json"])
        return
    if kw["fmt"] == "ckpt" and any(c.format != "nanogpt" for c in plan.members.values()):
        raise click.UsageError("--format ckpt is for nanoGPT sources")
    opts = api.Options(
        accumulate=kw["accumulate"],
        dtype=kw["dtype"],
        device=kw["device"],
        overwrite=kw["overwrite"],
        max_shard_size=kw["max_shard_size"],
        allow_nonfinite=kw["allow_nonfinite"],
        write_ckpt=kw["fmt"] == "ckpt",
        chunk=kw["chunk"],
    )
    for path in api.average(plan, opts, Reporter(quiet=kw["quiet"])):
        click.echo(json.dumps({"out": str(path)}) if kw["as_json"] else str(path))


@cli.command()
@click.argument("run")
@click.option("--steps", type=STEP_RANGE, required=True, help="Window ends START:END[:INTERVAL], inclusive.")
@click.option("--k", type=int, default=5, show_default=True, help="Checkpoints per window.")
@click.option(
    "--k-stepsize",
    "--nu",
    "k_stepsize",
    type=int,
    default=None,
    help="Training steps between window members (nu) [default: the run's checkpoint spacing].",
)
@click.option(
    "--interval",
    type=int,
    default=None,
    help="Training steps between window ends [default: the run's checkpoint spacing].",
)
@_write_options
def lawa(run: str, steps: Any, k: int, k_stepsize: int | None, interval: int | None, **kw: Any) -> None:
    """LAWA: at every INTERVAL steps t, average the k checkpoints t-(k-1)*nu, ..., t-nu, t.

    This is the paper's text; its Algorithm 1 slice would keep fewer than k checkpoints when nu > 1.

    \b
    ckptavg lawa runs/pythia-70m --steps 21000:141000 --k 5 --interval 3000 --out averaged/
    ckptavg lawa runs/nanogpt/ --steps 2000:70000 --k 5 --k-stepsize 1000 --interval 1000 --out lawa/
    """
    from ckptavg import api

    plan = api.plan_lawa(
        run, steps, k=k, interval=interval, k_stepsize=k_stepsize, out=kw["out"], allow_legacy=kw["allow_legacy_pickle"]
    )
    _execute(plan, kw)


@cli.command()
@click.argument("run")
@click.option(
    "--steps",
    type=STEP_RANGE,
    required=True,
    help="The EMA runs over checkpoints START..END; outputs at START, START+INTERVAL, ...",
)
@click.option("--decay", type=float, default=0.9, show_default=True, help="ema = decay*ema + (1-decay)*x.")
@click.option("--interval", type=int, default=None, help="Steps between outputs [default: checkpoint spacing].")
@click.option("--every", type=int, default=None, help="Use only checkpoints START, START+EVERY, ... [default: all].")
@_write_options
def ema(run: str, steps: Any, decay: float, interval: int | None, every: int | None, **kw: Any) -> None:
    """EMA over the checkpoint sequence: ema = decay*ema + (1-decay)*x, written at every INTERVAL steps.

    \b
    ckptavg ema runs/pythia-70m --decay 0.9 --steps 1000:143000 --interval 3000 --out ema/
    """
    from ckptavg import api

    plan = api.plan_ema(
        run, steps, decay=decay, interval=interval, every=every, out=kw["out"], allow_legacy=kw["allow_legacy_pickle"]
    )
    _execute(plan, kw)


@cli.command()
@click.argument("run")
@click.option("--steps", type=STEP_RANGE, required=True, help="Output steps START:END[:INTERVAL].")
@click.option("--start", type=int, default=None, help="First averaged checkpoint [default: START of --steps].")
@click.option("--every", type=int, default=None, help="Steps between averaged checkpoints [default: spacing].")
@click.option("--interval", type=int, default=None, help="Steps between outputs [default: --every].")
@_write_options
def swa(run: str, steps: Any, start: int | None, every: int | None, interval: int | None, **kw: Any) -> None:
    """SWA: the uniform mean of checkpoints START, START+EVERY, ... up to each output step.

    \b
    ckptavg swa runs/pythia-70m --start 107000 --every 1000 --steps 107000:143000 --out swa/
    """
    from ckptavg import api

    plan = api.plan_swa(
        run, steps, start=start, every=every, interval=interval, out=kw["out"], allow_legacy=kw["allow_legacy_pickle"]
    )
    _execute(plan, kw)


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--weights", default=None, help="Comma-separated weights, one per checkpoint (normalised).")
@_write_options
def avg(checkpoints: tuple[str, ...], weights: str | None, **kw: Any) -> None:
    """Average explicit checkpoints (folders or nanoGPT .pt files), optionally weighted.

    \b
    ckptavg avg a/ b/ c/ --weights 0.2,0.3,0.5 --out soup/
    """
    from ckptavg import api

    parsed = None
    if weights is not None:
        try:
            parsed = [float(x) for x in weights.split(",")]
        except ValueError as e:
            raise click.BadParameter(
                f"{weights!r} is not a comma-separated list of numbers", param_hint="--weights"
            ) from e
    plan = api.plan_avg(list(checkpoints), weights=parsed, out=kw["out"], allow_legacy=kw["allow_legacy_pickle"])
    _execute(plan, kw)


@cli.command()
@click.argument("run")
@click.option("--method", type=click.Choice(["lawa", "ema", "swa"]), default="lawa", show_default=True)
@click.option("--steps", type=STEP_RANGE, required=True, help="Output steps START:END[:INTERVAL].")
@click.option("--k", type=int, default=5, show_default=True, help="lawa: checkpoints per window.")
@click.option("--k-stepsize", "--nu", "k_stepsize", type=int, default=None, help="lawa: steps between members.")
@click.option("--interval", type=int, default=None, help="Steps between outputs.")
@click.option("--decay", type=float, default=0.9, show_default=True, help="ema: decay.")
@click.option("--start", type=int, default=None, help="swa: first averaged checkpoint.")
@click.option("--every", type=int, default=None, help="ema/swa: steps between used checkpoints.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per output.")
@click.option("--allow-legacy-pickle", is_flag=True)
def plan(
    run: str,
    method: str,
    steps: Any,
    k: int,
    k_stepsize: int | None,
    interval: int | None,
    decay: float,
    start: int | None,
    every: int | None,
    out: Path,
    as_json: bool,
    allow_legacy_pickle: bool,
) -> None:
    """Print which checkpoints, with which weights, feed each output; reads headers only.

    \b
    ckptavg plan runs/pythia-70m --steps 21000:141000 --k 5 --interval 3000
    ckptavg plan runs/pythia-70m --method ema --steps 1000:143000 --interval 3000 --json
    """
    from ckptavg import api

    legacy = allow_legacy_pickle
    if method == "lawa":
        p = api.plan_lawa(run, steps, k=k, interval=interval, k_stepsize=k_stepsize, out=out, allow_legacy=legacy)
    elif method == "ema":
        p = api.plan_ema(run, steps, decay=decay, interval=interval, every=every, out=out, allow_legacy=legacy)
    else:
        p = api.plan_swa(run, steps, start=start, every=every, interval=interval, out=out, allow_legacy=legacy)
    _emit_plan(p, as_json)


@cli.command(name="ls")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per checkpoint.")
@click.option("--allow-legacy-pickle", is_flag=True)
def ls_(run: str, as_json: bool, allow_legacy_pickle: bool) -> None:
    """List a run's checkpoints: step, format, size on disk, path.

    \b
    ckptavg ls runs/pythia-70m
    """
    from ckptavg import api

    for row in api.list_checkpoints(run, allow_legacy=allow_legacy_pickle):
        if as_json:
            click.echo(json.dumps(row))
        else:
            size = "-" if row["bytes"] is None else f"{row['bytes'] / 1e6:.1f}MB"
            click.echo(f"{row['step']}\t{row['format']}\t{size}\t{row['path']}")


def main() -> None:
    try:
        cli.main(prog_name="ckptavg", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("ckptavg: interrupted; unfinished outputs were removed", err=True)
        sys.exit(1)
    except BrokenPipeError:
        # The reader of stdout went away (`| head -1`): say nothing more, and let Python not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
