"""The ``ckptavg`` command: parse options, call one function of :mod:`ckptavg.api`, print results.

stdout carries only results (one output path per line, or JSON lines with ``--json``), so
``ckptavg lawa ... | xargs ...`` works; progress, logs and errors go to stderr. Exit codes: 0 success,
1 a problem with the input or the output (one line naming the file, step or tensor), 2 a usage error.
Set CKPTAVG_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from ckptavg import __version__
from ckptavg.errors import CkptavgError, InvalidArgumentError, OptionError
from ckptavg.sizes import SIZE
from ckptavg.slurm import MAX_CPUS, SLURM_MEMORY, SLURM_NAME, SLURM_TIME, TokenSource, job_script, shell_quote
from ckptavg.steps import STEP_RANGE, STEP_RANGE_FLOAT
from ckptavg.tokens import ENV, Redactor, resolve_token, url_secrets

if TYPE_CHECKING:
    from ckptavg.api import Plan

# torch takes a second to import: commands import the library when they run, so --help is instant.
OUTPUT_DTYPES = ("bfloat16", "float16", "float32", "float64")


_REDACTOR = "ckptavg.redactor"  # ctx.meta keys: the Redactor of this invocation, shared by all its contexts,
_ARGS = "ckptavg.args"  # and its arguments as given


def _redactor(ctx: click.Context) -> Redactor:
    found = ctx.meta.get(_REDACTOR)
    if found is None:  # a command invoked on its own, outside the group
        found = ctx.meta[_REDACTOR] = Redactor(os.environ.get(ENV))
    return cast(Redactor, found)


def _token_values(args: list[str]) -> Iterator[str]:
    """The values given to --token in raw arguments, also those of a command given to slurm or status."""
    for i, arg in enumerate(args):
        if arg == "--token" and i + 1 < len(args):
            yield args[i + 1]
        elif arg.startswith("--token="):
            yield arg.partition("=")[2]


def _endpoint_secrets(args: list[str]) -> Iterator[str]:
    """The credentials in the user:password@ part of $HF_ENDPOINT and of every --endpoint value."""
    urls = [os.environ.get("HF_ENDPOINT")]
    for i, arg in enumerate(args):
        if arg == "--endpoint" and i + 1 < len(args):
            urls.append(args[i + 1])
        elif arg.startswith("--endpoint="):
            urls.append(arg.partition("=")[2])
    for url in urls:
        yield from url_secrets(url)


class _Cli(click.Group):
    """Turns library errors into one line and exit code 1 (Click's own usage errors exit 2).

    Nothing it prints holds a token: messages, tracebacks (CKPTAVG_DEBUG=1, or a bug's), log records and
    warnings pass through the invocation's Redactor, which knows $HF_TOKEN, every --token value, the
    token a command resolved and the credentials of an endpoint URL (user:password@).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGS] = list(args)  # as given: before any parsing can fail and quote a --token value
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        args = ctx.meta.get(_ARGS, [])
        redactor = ctx.meta[_REDACTOR] = Redactor(os.environ.get(ENV), *_token_values(args), *_endpoint_secrets(args))
        with redactor.active():
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.Abort, BrokenPipeError):
                raise
            except click.ClickException as e:
                # Keep the exception (its exit code, and a usage error's hint): only its text changes.
                setattr(e, "message", _redact_all(redactor, e.message))  # noqa: B010 (typed Final by click)
                raise
            except CkptavgError as e:
                if not os.environ.get("CKPTAVG_DEBUG"):
                    from ckptavg.progress import one_line

                    message = one_line(_redact_all(redactor, str(e)))
                    if e.exit_code == click.UsageError.exit_code:  # e.g. OptionError: options that cannot go together
                        raise click.UsageError(message, ctx) from e
                    raise click.ClickException(message) from e
                _print_traceback(redactor, e)
                raise SystemExit(e.exit_code) from e
            except Exception as e:  # a bug: its traceback, as Python would print it, but redacted
                _print_traceback(redactor, e)
            raise SystemExit(1)  # not click's Exit, which main(standalone_mode=False) would return, not exit with


def _redact_all(redactor: Redactor, text: str) -> str:
    """Also the stored login huggingface_hub sends when given no token (if it is loaded: no import here)."""
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError, AttributeError):
            redactor.add(Path(hub.HF_TOKEN_PATH).read_text())
    return redactor.redact(text)


def _print_traceback(redactor: Redactor, e: BaseException) -> None:
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    click.echo(_redact_all(redactor, text), err=True, nl=False)


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


# SLURM caps a job array at MaxArraySize, which may not exceed 4000001: task ids 0..4000000.
MAX_TASKS = 4_000_001
# Steps between windows or members, and the first SWA member: a step is never negative.
STRIDE = click.IntRange(min=1)
FIRST_STEP = click.IntRange(min=0)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan compares False with any bound, so passes it)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


DECAY = FiniteFloatRange(0, 1, min_open=True, max_open=True)  # ema's decay: strictly between 0 and 1


class WeightsType(click.ParamType):
    """``--weights 0.2,0.3,0.5``: finite, non-negative, not all zero; checked before any checkpoint is read."""

    name = "W1,W2,..."

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        from ckptavg.windows import normalise_weights

        try:
            weights = [float(x) for x in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 0.2,0.3,0.5", param, ctx)
        try:
            normalise_weights(weights)
        except InvalidArgumentError as e:
            raise click.UsageError(str(e), ctx) from e  # its message names --weights already
        return weights


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
            click.option(
                "--disk-budget",
                type=SIZE,
                default=None,
                help="--repo: most bytes of downloads on disk at once [default: one window's].",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of plain paths."),
            click.option(
                "--overwrite",
                is_flag=True,
                help="Replace outputs that exist (otherwise refused, or skipped when the same plan made them).",
            ),
            click.option(
                "--accumulate",
                type=click.Choice(["float32", "float64"]),
                default="float64",
                show_default=True,
                help="Accumulator dtype: float64 gives the float64 mean rounded once to the output dtype; float32 "
                "is faster on a CPU and rounds sums (LAWA and SWA windows that share checkpoints and float64 "
                "inputs are always summed in float64).",
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
                "--gpu-memory",
                type=SIZE,
                default=None,
                help="--device cuda: most GPU memory to take for chunks and accumulators, e.g. 8GiB "
                "[default: what is free, less 1 GiB].",
            ),
            click.option(
                "--threads",
                type=click.IntRange(min=1, max=MAX_CPUS),
                default=None,
                help="Cores to use: reader threads and torch's intra-op threads (half of them) "
                "[default: the cores this process may use, e.g. SLURM's --cpus-per-task].",
            ),
            click.option(
                "--max-shard-size",
                type=SIZE,
                default="5GB",
                show_default=True,
                help="Split output weights into shards of at most this size (not with --format ckpt).",
            ),
            click.option(
                "--format",
                "fmt",
                type=click.Choice(["safetensors", "ckpt"]),
                default="safetensors",
                show_default=True,
                help="ckpt: also write nanoGPT's ckpt.pt (nanoGPT sources only); one file by nanoGPT's design, "
                "so --max-shard-size does not apply.",
            ),
            click.option(
                "--tokenizer",
                metavar="DIR|REPO",
                default=None,
                help="Put these tokenizer files in every output instead of the run's: a folder, or a Hub repo "
                "(only its tokenizer files are fetched, with --endpoint, --token, --cache-dir).",
            ),
            click.option(
                "--hash",
                "hash_inputs",
                is_flag=True,
                help="Record the sha256 of every local input file in ckptavg.json (reads each file once more).",
            ),
            click.option(
                "--optimizer",
                type=click.Choice(["newest", "none"]),
                default=None,
                help="--format ckpt: newest puts the newest member's optimizer state and best_val_loss in "
                "ckpt.pt, for train.py --init_from=resume; none leaves the optimizer out (sample.py needs none; "
                "train.py's resume then fails at optimizer.load_state_dict) [default: newest].",
            ),
            click.option("--allow-nonfinite", is_flag=True, help="Average NaN/Inf inputs instead of refusing them."),
            click.option(
                "--allow-legacy-pickle",
                is_flag=True,
                help="Load legacy (non-zip) torch pickles whole into memory (weights_only still applies).",
            ),
            click.option(
                "--task-index",
                type=click.IntRange(min=0, max=MAX_TASKS - 1),
                default=None,
                help="Do only this task's share of the outputs [default: $SLURM_ARRAY_TASK_ID - _MIN].",
            ),
            click.option(
                "--num-tasks",
                type=click.IntRange(min=1, max=MAX_TASKS),
                default=None,
                help="Number of tasks the outputs are split into [default: $SLURM_ARRAY_TASK_COUNT, or 1].",
            ),
            click.option("--quiet", "-q", is_flag=True, help="No progress or log lines on stderr."),
            click.option("--chunk", type=click.IntRange(min=1024, max=1 << 24), default=None, hidden=True),
        ]
    ):
        f = opt(f)
    return f


def _emit_plan(plan: Plan, as_json: bool, budget: int | None = None) -> None:
    from ckptavg.api import describe, downloads
    from ckptavg.progress import human_bytes

    fetch = downloads(plan, budget)
    if fetch is not None:  # on stderr: stdout keeps one row per output
        click.echo(
            f"ckptavg: downloads {fetch['files']} weight files, {human_bytes(fetch['bytes'])} in all, in "
            f"{fetch['units']} parts holding at most {human_bytes(fetch['budget'])} (--disk-budget)",
            err=True,
        )

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


class RevisionPatternType(click.ParamType):
    """``--revision-pattern``: parsed (sources/revisions.py) before anything is fetched; a bad one is a usage error."""

    name = "PATTERN"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ckptavg.sources.revisions import RevisionPattern

        if isinstance(value, RevisionPattern):
            return value
        try:
            return RevisionPattern.parse(str(value))
        except InvalidArgumentError as e:
            self.fail(str(e), param, ctx)


REVISION_PATTERN = RevisionPatternType()
NAME_BY = click.option(
    "--name-by",
    type=click.Choice(["step", "revision"]),
    default="step",
    show_default=True,
    help="Name each output OUT/step{N}, or as the run names the newest checkpoint it averages: its Hub "
    "revision (OUT/step2000-tokens8B, OUT/ckpt_005), folder (OUT/checkpoint-1000) or nanoGPT file's stem.",
)


def _source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Where a run is: a local RUN folder, or --repo on the Hub (or a Hub-like --endpoint)."""
    for opt in reversed(
        [
            click.option("--repo", default=None, help="A Hub repository (ORG/NAME) instead of a RUN folder."),
            click.option(
                "--revision-pattern",
                "--revision-template",
                "revision_pattern",
                type=REVISION_PATTERN,
                default="step{step}",
                show_default=True,
                help="How --repo names the revision of each step: literal text, one {step} (or {step:03d}, "
                "zero-padded) and any {*} (any text but '/'), e.g. checkpoint-{step}, ckpt_{step:03d}, "
                "step{step}-tokens{*}B. The step is read from the name. --revision-template is its older name.",
            ),
            click.option(
                "--token",
                default=None,
                help="Hub token [default: $HF_TOKEN]; never printed or recorded (not even by `slurm`).",
            ),
            click.option(
                "--token-file",
                default=None,
                metavar="PATH",
                help="Read the Hub token from this file instead, e.g. ~/.cache/huggingface/token.",
            ),
            click.option("--endpoint", envvar="HF_ENDPOINT", default=None, show_envvar=True, help="Hub URL."),
            click.option(
                "--cache-dir", default=None, help="Download cache [default: huggingface_hub's, under HF_HOME]."
            ),
            click.option(
                "--retry-time",
                type=FiniteFloatRange(min=0, max=7 * 24 * 3600),
                default=600,
                show_default=True,
                metavar="SECONDS",
                help="Keep retrying a Hub request that fails with HTTP 429/5xx or a dropped connection for this "
                "long without progress (at most a week), then stop with one line (the same command resumes).",
            ),
        ]
    ):
        f = opt(f)
    return f


def _source(kw: dict[str, Any]) -> Any:
    """The run to plan from: a folder path (or glob), or a Hub repository."""
    if kw.get("repo") and kw.get("run"):
        raise click.UsageError("give a RUN folder or --repo, not both")
    if kw.get("repo"):
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hf_logging

        from ckptavg.sources import open_hub_run

        disable_progress_bars()  # stderr carries our progress; a dead download is one line, not six retries
        hf_logging.set_verbosity_error()

        if kw.get("token") is not None and kw.get("token_file") is not None:
            raise click.UsageError("give --token or --token-file, not both")
        token = resolve_token(kw.get("token"), token_file=kw.get("token_file"))
        _redactor(click.get_current_context()).add(token)
        return open_hub_run(
            kw["repo"],
            endpoint=kw["endpoint"],
            token=token,
            cache_dir=kw["cache_dir"],
            pattern=kw["revision_pattern"],
            allow_legacy=kw["allow_legacy_pickle"],
            retry_time=kw["retry_time"],
        )
    if not kw.get("run"):
        raise click.UsageError("give a RUN folder, or --repo ORG/NAME")
    return kw["run"]


def _tokenizer(kw: dict[str, Any]) -> Any:
    """--tokenizer, resolved: a folder's tokenizer files, or a Hub repo's, fetched now (before any work)."""
    if kw.get("tokenizer") is None:
        return None
    from ckptavg.sources.extras import resolve_tokenizer

    token = None
    if not Path(kw["tokenizer"]).expanduser().is_dir():  # a repo: the Hub options of the command apply
        if kw.get("token") is not None and kw.get("token_file") is not None:
            raise click.UsageError("give --token or --token-file, not both")
        token = resolve_token(kw.get("token"), token_file=kw.get("token_file"))
        _redactor(click.get_current_context()).add(token)
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return resolve_tokenizer(kw["tokenizer"], endpoint=kw.get("endpoint"), token=token, cache_dir=kw.get("cache_dir"))


def _options(kw: dict[str, Any]) -> Any:
    from ckptavg import api

    return api.Options(
        accumulate=kw["accumulate"],
        dtype=kw["dtype"],
        device=kw["device"],
        overwrite=kw["overwrite"],
        max_shard_size=kw["max_shard_size"],
        allow_nonfinite=kw["allow_nonfinite"],
        write_ckpt=kw["fmt"] == "ckpt",
        optimizer=_optimizer(kw),
        chunk=kw["chunk"],
        disk_budget=kw["disk_budget"],
        tokenizer=_tokenizer(kw),
        hash_inputs=kw["hash_inputs"],
        gpu_memory=_gpu_memory(kw),
        threads=kw["threads"],
    )


def _gpu_memory(kw: dict[str, Any]) -> int | None:
    """--gpu-memory sizes the CUDA stage; given with another --device it is a usage error, not ignored."""
    if kw["gpu_memory"] is not None and not str(kw["device"]).startswith("cuda"):
        raise OptionError("--gpu-memory", f"applies to --device cuda only, not --device {kw['device']}")
    return kw["gpu_memory"]


def _optimizer(kw: dict[str, Any]) -> str:
    """--optimizer: what ckpt.pt carries; given without --format ckpt it is a usage error, not ignored."""
    if kw["optimizer"] is not None and kw["fmt"] != "ckpt":
        raise OptionError("--optimizer", "applies to --format ckpt only (a safetensors output holds the weights alone)")
    return kw["optimizer"] or "newest"


_ID, _MIN, _COUNT = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"


def task_from_env(task_index: int | None, num_tasks: int | None) -> tuple[int, int]:
    """This process's task: explicit options win; else a SLURM job array says (its ids made 0-based).

    An explicit --num-tasks takes SLURM_ARRAY_TASK_ID as the absolute index: a resubmitted subset of an
    array (``--array=5,17``) has SLURM_ARRAY_TASK_COUNT=2 and _MIN=5, which describe only the subset.

    A SLURM variable that is not a whole number, or an id outside the array it describes, is the
    environment's fault, not the command line's: InvalidArgumentError (one line naming the variable, exit
    1). A --task-index outside --num-tasks is a usage error (exit 2).
    """
    env = os.environ
    if num_tasks is None and task_index is None and _ID in env:
        tid, first = _env_int(_ID), _env_int(_MIN, 0)
        count = _env_int(_COUNT, 1, minimum=1)
        if not first <= tid < first + count:
            raise InvalidArgumentError(
                f"{_ID}={tid} is outside {first}..{first + count - 1}, the array that {_MIN}={first} and "
                f"{_COUNT}={count} describe; for an array with gaps (--array=5,17) give --num-tasks N"
            )
        return tid - first, count
    count = num_tasks or 1
    if task_index is None and _ID in env and num_tasks:
        task_index = _env_int(_ID)
        if task_index >= count:
            raise InvalidArgumentError(f"{_ID}={task_index} is outside 0..{count - 1} (--num-tasks {count})")
    task_index = task_index or 0
    if task_index >= count:
        raise click.UsageError(f"--task-index {task_index} is outside 0..{count - 1} (--num-tasks {count})")
    return task_index, count


def _env_int(name: str, default: int | None = None, minimum: int = 0) -> int:
    """A SLURM variable's whole number: ASCII digits only (int() would take '+3', '3_0' and '٣')."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    digits = (text or "").strip()
    shown = text if text is None or len(text) <= 40 else text[:40] + "..."
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidArgumentError(
            f"{name}={shown!r} is not a whole number; "
            "run inside a SLURM job array, or give --task-index and --num-tasks"
        )
    if len(digits.lstrip("0")) > 7 or int(digits) > MAX_TASKS:
        raise InvalidArgumentError(f"{name}={shown!r} is past the largest SLURM job array ({MAX_TASKS} tasks)")
    if int(digits) < minimum:
        raise InvalidArgumentError(f"{name}={shown!r} is below {minimum}")
    return int(digits)


# The options of each run-based method, named as in its api.plan_* function.
_METHOD_PARAMS = {
    "lawa": ("k", "interval", "k_stepsize", "name_by"),
    "ema": ("decay", "interval", "every", "name_by"),
    "swa": ("start", "every", "interval", "name_by"),
}


def _plan(name: str, kw: dict[str, Any]) -> Plan:
    from ckptavg import api

    legacy = kw["allow_legacy_pickle"]
    if name in _METHOD_PARAMS:
        planner = getattr(api, f"plan_{name}")
        params = {p: kw[p] for p in _METHOD_PARAMS[name]}
        return planner(_source(kw), kw["steps"], out=kw["out"], allow_legacy=legacy, **params)
    weights = kw["weights"]  # parsed and checked by WeightsType
    run = _source({**kw, "run": None}) if kw.get("repo") else None  # then CHECKPOINTS are step numbers
    return api.plan_avg(list(kw["checkpoints"]), weights=weights, out=kw["out"], allow_legacy=legacy, run=run)


def _execute(name: str, kw: dict[str, Any]) -> None:
    from ckptavg import api
    from ckptavg.progress import Reporter

    opts = _options(kw)  # options that cannot go together fail before any planning
    task = task_from_env(kw["task_index"], kw["num_tasks"])  # a bad SLURM variable fails before any planning
    opts = _options(kw)  # --tokenizer is checked (and fetched) here, before any planning
    plan = api.task_share(_plan(name, kw), *task)
    if kw["dry_run"]:
        _emit_plan(plan, kw["as_json"], kw["disk_budget"])
        return
    for path in api.average(plan, opts, Reporter(quiet=kw["quiet"])):
        click.echo(json.dumps({"out": str(path)}) if kw["as_json"] else str(path))


@cli.command()
@click.argument("run", required=False)
@_source_options
@click.option("--steps", type=STEP_RANGE, required=True, help="Window ends START:END[:INTERVAL], inclusive.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="Checkpoints per window.")
@click.option(
    "--k-stepsize",
    "--nu",
    "k_stepsize",
    type=STRIDE,
    default=None,
    help="Training steps between window members (nu) [default: the run's checkpoint spacing].",
)
@click.option(
    "--interval",
    type=STRIDE,
    default=None,
    help="Training steps between window ends [default: the run's checkpoint spacing].",
)
@NAME_BY
@_write_options
def lawa(**kw: Any) -> None:
    """LAWA: at every INTERVAL steps t, average the k checkpoints t-(k-1)*nu, ..., t-nu, t.

    This is the paper's text; its Algorithm 1 slice would keep fewer than k checkpoints when nu > 1.

    \b
    ckptavg lawa runs/pythia-70m --steps 21000:141000 --k 5 --interval 3000 --out averaged/
    ckptavg lawa runs/nanogpt/ --steps 2000:70000 --k 5 --k-stepsize 1000 --interval 1000 --out lawa/
    """
    _execute("lawa", kw)


@cli.command()
@click.argument("run", required=False)
@_source_options
@click.option(
    "--steps",
    type=STEP_RANGE,
    required=True,
    help="The EMA runs over checkpoints START..END; outputs at START, START+INTERVAL, ...",
)
@click.option(
    "--decay",
    type=DECAY,
    default=0.9,
    show_default=True,
    help="ema = decay*ema + (1-decay)*x.",
)
@click.option("--interval", type=STRIDE, default=None, help="Steps between outputs [default: checkpoint spacing].")
@click.option("--every", type=STRIDE, default=None, help="Use only checkpoints START, START+EVERY, ... [default: all].")
@NAME_BY
@_write_options
def ema(**kw: Any) -> None:
    """EMA over the checkpoint sequence: ema = decay*ema + (1-decay)*x, written at every INTERVAL steps.

    \b
    ckptavg ema runs/pythia-70m --decay 0.9 --steps 1000:143000 --interval 3000 --out ema/
    """
    _execute("ema", kw)


@cli.command()
@click.argument("run", required=False)
@_source_options
@click.option("--steps", type=STEP_RANGE, required=True, help="Output steps START:END[:INTERVAL].")
@click.option("--start", type=FIRST_STEP, default=None, help="First averaged checkpoint [default: START of --steps].")
@click.option("--every", type=STRIDE, default=None, help="Steps between averaged checkpoints [default: spacing].")
@click.option("--interval", type=STRIDE, default=None, help="Steps between outputs [default: --every].")
@NAME_BY
@_write_options
def swa(**kw: Any) -> None:
    """SWA: the uniform mean of checkpoints START, START+EVERY, ... up to each output step.

    \b
    ckptavg swa runs/pythia-70m --start 107000 --every 1000 --steps 107000:143000 --out swa/
    """
    _execute("swa", kw)


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True)
@_source_options
@click.option(
    "--weights",
    type=WeightsType(),
    default=None,
    help="Comma-separated weights, one per checkpoint (normalised; finite, >= 0, not all zero).",
)
@_write_options
def avg(**kw: Any) -> None:
    """Average explicit checkpoints (folders or nanoGPT .pt files; with --repo, step numbers), optionally weighted.

    \b
    ckptavg avg a/ b/ c/ --weights 0.2,0.3,0.5 --out soup/
    ckptavg avg --repo EleutherAI/pythia-70m 141000 142000 143000 --out soup/
    """
    _execute("avg", kw)


@cli.command()
@click.argument("run", required=False)
@_source_options
@click.option("--method", type=click.Choice(["lawa", "ema", "swa"]), default="lawa", show_default=True)
@click.option("--steps", type=STEP_RANGE, required=True, help="Output steps START:END[:INTERVAL].")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="lawa: checkpoints per window.")
@click.option("--k-stepsize", "--nu", "k_stepsize", type=STRIDE, default=None, help="lawa: steps between members.")
@click.option("--interval", type=STRIDE, default=None, help="Steps between outputs.")
@click.option(
    "--decay",
    type=DECAY,
    default=0.9,
    show_default=True,
    help="ema: decay.",
)
@click.option("--start", type=FIRST_STEP, default=None, help="swa: first averaged checkpoint.")
@click.option("--every", type=STRIDE, default=None, help="ema/swa: steps between used checkpoints.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@NAME_BY
@click.option("--json", "as_json", is_flag=True, help="One JSON object per output.")
@click.option("--allow-legacy-pickle", is_flag=True)
def plan(
    method: str,
    steps: Any,
    k: int,
    k_stepsize: int | None,
    interval: int | None,
    decay: float,
    start: int | None,
    every: int | None,
    out: Path,
    name_by: str,
    as_json: bool,
    allow_legacy_pickle: bool,
    **source: Any,
) -> None:
    """Print which checkpoints, with which weights, feed each output; reads headers only.

    \b
    ckptavg plan runs/pythia-70m --steps 21000:141000 --k 5 --interval 3000
    ckptavg plan runs/pythia-70m --method ema --steps 1000:143000 --interval 3000 --json
    """
    _emit_plan(_plan(method, {**locals(), **source}), as_json)


AVERAGING = ("lawa", "ema", "swa", "avg")
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _sub_invocation(command: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """Parse ``lawa RUN --steps ...`` exactly as that command would, without running it."""
    if not command or command[0] not in AVERAGING:
        raise click.UsageError(f"give an averaging command ({', '.join(AVERAGING)}) and its arguments last")
    sub = cli.commands[command[0]]
    ctx = sub.make_context(command[0], list(command[1:]), parent=click.get_current_context())
    return command[0], ctx.params


def _task_of(n_outputs: int, num_tasks: int) -> list[int]:
    from ckptavg.api import task_bounds

    owner = [0] * n_outputs
    for t in range(num_tasks):
        lo, hi = task_bounds(n_outputs, t, num_tasks)
        owner[lo:hi] = [t] * (hi - lo)
    return owner


@cli.command(context_settings=_PASS_THROUGH)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per output.")
@click.option("--array", "array_only", is_flag=True, help="Print only the tasks to run again, as an --array list.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def status(as_json: bool, array_only: bool, command: tuple[str, ...]) -> None:
    """Which outputs of an averaging command are complete, partial (a killed run's), other or missing.

    complete: made by this very plan; partial: a killed run's temporary folder is there (the same command
    resumes it); other: something else has the name (the command refuses it without --overwrite, e.g. an
    output made from inputs that have changed since); missing: nothing yet.

    Give the averaging command last, as you would run it (with its --num-tasks, if any); each output
    is shown with the task that makes it, and the tasks to run again are summed up as an --array list.

    \b
    ckptavg status lawa runs/pythia-70m --steps 21000:141000 --k 5 --interval 3000 --out lawa/ --num-tasks 8
    sbatch --array=$(ckptavg status --array lawa ... --num-tasks 8) job.sbatch
    """
    from ckptavg import api

    name, kw = _sub_invocation(command)
    plan = _plan(name, kw)
    num_tasks = kw["num_tasks"] or 1
    owner = _task_of(len(plan.outputs), num_tasks)
    states = api.output_states(plan, _options(kw))
    redo = sorted({owner[j] for j, st in enumerate(states) if st != "complete"})
    if array_only:
        click.echo(api.array_spec(redo))
        return
    for j, (out, state) in enumerate(zip(plan.outputs, states, strict=True)):
        if as_json:
            click.echo(json.dumps({"out": str(out), "state": state, "task": owner[j]}))
        else:
            click.echo(f"{out}\t{state}\ttask={owner[j]}")
    done = states.count("complete")
    summary = f"{done} of {len(states)} outputs complete"
    if redo:
        summary += f"; tasks to run again: --array={api.array_spec(redo)}"
    click.echo(f"ckptavg: {summary}", err=True)


@cli.command(context_settings=_PASS_THROUGH)
@click.option(
    "--num-tasks",
    type=click.IntRange(min=1, max=MAX_TASKS),
    default=None,
    help="Array size [default: one task per 4 outputs, at most 32].",
)
@click.option("--partition", type=SLURM_NAME, default=None, help="SLURM partition.")
@click.option(
    "--time",
    "time_limit",
    type=SLURM_TIME,
    default=None,
    help="Time limit per task: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]] or UNLIMITED, e.g. 2:00:00.",
)
@click.option(
    "--cpus",
    type=click.IntRange(min=1, max=MAX_CPUS),
    default=2,
    show_default=True,
    help="CPUs per task; the command gets --threads CPUS unless it names its own.",
)
@click.option(
    "--mem",
    type=SLURM_MEMORY,
    default="2G",
    show_default=True,
    help="Memory per task, a whole number with K, M, G or T (ckptavg peaks near 0.3 GB).",
)
@click.option("--job-name", type=SLURM_NAME, default=None, help="[default: ckptavg-METHOD]")
@click.option("--submit", is_flag=True, help="Submit with sbatch and print the job id, instead of the script.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def slurm(
    num_tasks: int | None,
    partition: str | None,
    time_limit: str | None,
    cpus: int,
    mem: str,
    job_name: str | None,
    submit: bool,
    command: tuple[str, ...],
) -> None:
    """Print an sbatch script that runs an averaging command as a job array (or --submit it).

    Each array task does a contiguous share of the outputs; finished outputs are skipped, so the same
    script can be submitted again, whole or for the tasks that `ckptavg status` lists.

    \b
    ckptavg slurm --num-tasks 8 lawa runs/pythia-70m --steps 21000:141000 --k 5 --interval 3000 --out lawa/ > job.sbatch
    sbatch job.sbatch
    """
    from ckptavg import api
    from ckptavg.progress import human_bytes

    name, kw = _sub_invocation(command)
    if kw["task_index"] is not None or kw["num_tasks"] is not None:
        raise click.UsageError("leave --task-index/--num-tasks out of the command: the script sets them")
    plan = _plan(name, kw)
    n = len(plan.outputs)
    tasks = min(num_tasks or max(1, min(32, -(-n // 4))), n)
    shares = [api.task_share(plan, t, tasks) for t in range(tasks)]
    read = max(p.bytes_to_read() for p in shares)
    written = max(sum(plan.members[w.steps[-1]].nbytes for w in p.windows) for p in shares)
    token, note = _job_token(kw, submit)
    summary = (
        f"ckptavg {name}: {n} outputs in {tasks} array tasks; the largest task reads about {human_bytes(read)} "
        f"and writes about {human_bytes(written)} into {shell_quote(kw['out'])}"
    )
    argv = _without_token(command)  # its first word is the subcommand's name
    head = [sys.executable, "-m", "ckptavg", argv[0], *_threads_for(kw, cpus)]
    script = job_script(
        [*head, *argv[1:]],
        options_at=len(head),
        tasks=tasks,
        workdir=Path.cwd(),
        job_name=job_name or f"ckptavg-{name}",
        cpus=cpus,
        mem=mem,
        time=time_limit,
        partition=partition,
        summary=summary,
        token=token,
    )
    if note:
        click.echo(f"ckptavg: {note}", err=True)
    if not submit:
        click.echo(script, nl=False)
        return
    env = None
    if _given_token(kw):  # to the job as sbatch passes on its environment (--export=ALL), not in the script
        env = {**os.environ, ENV: _given_token(kw)}
    try:
        done = subprocess.run(["sbatch", "--parsable"], input=script.encode(), capture_output=True, env=env)
    except FileNotFoundError as e:
        raise click.ClickException("sbatch not found: is this a SLURM login node?") from e
    if done.returncode != 0:
        from ckptavg.progress import one_line

        why = one_line("; ".join(done.stderr.decode(errors="replace").split("\n")).strip("; "))
        raise click.ClickException(f"sbatch refused the job: {why}")
    click.echo(done.stdout.decode(errors="replace").strip().split(";")[0])


def _threads_for(kw: dict[str, Any], cpus: int) -> list[str]:
    """A task's --threads: its --cpus-per-task, unless the command names its own. Without it the task would
    use every core its affinity mask allows, which is the whole node where SLURM does not bind tasks. Like
    --task-index, it goes right after the subcommand's name: after a ``--`` it would be a checkpoint."""
    return [] if kw["threads"] is not None else ["--threads", str(cpus)]


def _without_token(command: tuple[str, ...]) -> list[str]:
    """The command less its --token value, which a script, and SLURM's record of it, must not hold."""
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
        elif arg == "--token":
            skip = True
        elif not arg.startswith("--token="):
            out.append(arg)
    return out


def _given_token(kw: dict[str, Any]) -> str:
    """The clean --token of a command, or "" if it has none (an empty --token is none)."""
    return (resolve_token(kw["token"]) or "") if kw.get("token") is not None else ""


def _job_token(kw: dict[str, Any], submit: bool) -> tuple[TokenSource | None, str]:
    """How the job gets its Hub token (see ckptavg.slurm.job_script), and a note for stderr; never in the script.

    A --token-file stays in the command: a path is not a secret, and the job reads the file when it runs
    (on a file system the compute nodes share). Otherwise the job reads HF_TOKEN from the environment
    sbatch passes on; with --submit, a --token is put there for it.
    """
    if not kw.get("repo"):
        return None, ""
    if kw.get("token_file") is not None:
        path = shell_quote(kw["token_file"])
        return "file", f"the job reads its Hub token from --token-file {path}; compute nodes must see that file"
    if not _given_token(kw):
        return "environment", (
            "the script holds no token; its job reads HF_TOKEN from the environment of sbatch "
            "(export HF_TOKEN=... before sbatch) when the repository needs one"
        )
    if submit:
        return "required", "--token goes to the job as HF_TOKEN in the environment of sbatch, not in the script"
    return "required", (
        "--token was left out of the script: export HF_TOKEN=... before sbatch (sbatch passes the environment "
        "on), or use --token-file PATH"
    )


def _given(name: str) -> bool:
    """Whether the user gave this parameter of the running command (not its default)."""
    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def _shown(option: str, name: str, value: object) -> str:
    """``--seq-len 128``, or ``--seq-len 64 (the default)`` where the user did not give it."""
    return f"{option} {value}" + ("" if _given(name) else " (the default)")


def _eval_slice(data: Path | None, max_tokens: int, seq_len: int) -> Any:
    """The data slice of eval and interpolate; options that cannot make one are refused naming them."""
    from ckptavg.errors import OptionError
    from ckptavg.evaluate import make_slice

    if data is None:  # not required by click: eval --tasks alone scores no held-out loss
        raise click.UsageError("Missing option '--data'.")
    if max_tokens < seq_len:
        if _given("seq_len"):
            raise OptionError(
                f"--seq-len {seq_len}",
                f"longer than the {_shown('--max-tokens', 'max_tokens', max_tokens)} scored; give a larger "
                f"--max-tokens or a smaller --seq-len",
            )
        raise OptionError(
            f"--max-tokens {max_tokens}",
            f"shorter than one sequence of {_shown('--seq-len', 'seq_len', seq_len)}; give at least {seq_len}",
        )
    return make_slice(data, max_tokens, seq_len)


def check_plot_target(out: Path, option: str = "--plot") -> None:
    """For commands that draw an image after evaluating (interpolate --plot): refuse, before any model is
    evaluated, an image matplotlib cannot write there, or a missing matplotlib."""
    from ckptavg.plot import check_target

    check_target(out, option)


class DeviceType(click.ParamType):
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``mps``; checked before any work."""

    name = "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        import torch

        try:
            device = torch.device(str(value))
        except (RuntimeError, ValueError):
            self.fail(f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps)", param, ctx)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                self.fail(f"{value!r}: no CUDA device here (torch.cuda.is_available() is False)", param, ctx)
            if device.index is not None and device.index >= count:
                self.fail(f"{value!r}: this machine has {count} CUDA device(s), numbered from 0", param, ctx)
        elif device.type == "mps" and not torch.backends.mps.is_available():
            self.fail(f"{value!r}: no MPS device here", param, ctx)
        elif device.type not in ("cpu", "cuda", "mps"):
            self.fail(f"{value!r}: ckptavg evaluates on cpu, cuda or mps", param, ctx)
        return str(value)


# Upper bounds that no evaluation reaches, so that a typo fails here, not deep in torch: how much is read
# is bounded by the data (--max-tokens) and each model's context (--seq-len), and a batch by the slice.
MAX_EVAL_TOKENS = 10**12
MAX_SEQ_LEN = 10**7
MAX_BATCH = 10**6


def _eval_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option(
                "--data",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                default=None,
                help="Held-out text (UTF-8, tokenized by each model's tokenizer) or nanoGPT val.bin (uint16 ids). "
                "Required, except by eval --tasks alone.",
            ),
            click.option(
                "--max-tokens",
                type=click.IntRange(min=2, max=MAX_EVAL_TOKENS),
                default=32768,
                show_default=True,
                help="Score the first this many tokens of --data.",
            ),
            click.option(
                "--seq-len",
                type=click.IntRange(min=2, max=MAX_SEQ_LEN),
                default=64,
                show_default=True,
                help="Tokens per sequence; at most each model's context (n_positions, max_position_embeddings).",
            ),
            click.option("--batch-size", type=click.IntRange(min=1, max=MAX_BATCH), default=8, show_default=True),
            click.option("--device", type=DeviceType(), default="cpu", show_default=True),
            click.option(
                "--tokenizer",
                metavar="DIR|REPO",
                default=None,
                help="Read --data with this tokenizer (a folder, or a Hub repo: HF_ENDPOINT, HF_TOKEN) for models "
                "that have none; a model's own tokenizer comes first.",
            ),
        ]
    ):
        f = opt(f)
    return f


def _results_option(help: str) -> Callable[..., Any]:
    return click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None, help=help)


def _eval_tokenizer(spec: str | None) -> Path | None:
    """eval's --tokenizer: the folder its tokenizer is loaded from (a Hub repo's fetched now, before any
    model is scored; huggingface_hub reads HF_ENDPOINT and HF_TOKEN itself)."""
    if spec is None:
        return None
    from ckptavg.sources.extras import resolve_tokenizer

    if not Path(spec).expanduser().is_dir():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return cast(Path, resolve_tokenizer(spec, endpoint=os.environ.get("HF_ENDPOINT") or None).folder)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        step = "-" if r.get("step") is None else r["step"]
        ppl = "inf" if r.get("ppl") is None else f"{r['ppl']:.3f}"
        click.echo(f"{r['method']}\t{step}\t{r['loss']:.4f}\t{ppl}\t{r['model']}")


@cli.command(name="eval")
@click.argument("models", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", default=None, help="Also evaluate this run's original checkpoints at --steps.")
@click.option("--steps", type=STEP_RANGE, default=None, help="With --run: START:END:EVERY.")
@click.option("--disagreement", is_flag=True, help="With two models: how often their next-token predictions differ.")
@click.option(
    "--tasks",
    default=None,
    help="Comma list of lm-evaluation-harness tasks (names or task YAML files), scored zero-shot; "
    "needs pip install 'ckptavg[lm-eval]'.",
)
@click.option(
    "--include-path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="With --tasks: a folder of local task YAML files (examples/tasks); a YAML's !function runs Python "
    "from beside it, so give only folders you trust.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="With --tasks: score the first N examples.")
@_eval_options
@_results_option(
    "JSON results file (a CSV is written beside it); models already in it are skipped. "
    "Several runs may share one (a job array): rows are merged under a lock."
)
def eval_(
    models: tuple[Path, ...],
    run: str | None,
    steps: Any,
    disagreement: bool,
    tasks: str | None,
    include_path: Path | None,
    limit: int | None,
    data: Path | None,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
    device: str,
    results: Path | None,
    tokenizer: str | None,
) -> None:
    """Held-out mean token loss and perplexity of model folders, grouped by method and ordered by step.

    Method and step come from each output's provenance (ckptavg.json); other folders count as original
    checkpoints. Prints method, step, loss, perplexity and folder per model.

    \b
    ckptavg eval averaged/step* --data heldout.txt --results results.json
    ckptavg eval --run runs/pythia-70m --steps 21000:141000:3000 --data heldout.txt --results results.json
    ckptavg eval --disagreement runs/x/step20000 runs/x/step21000 --data heldout.txt
    ckptavg eval averaged/step* --tasks lambada_openai,piqa,arc_easy,sciq --results results.json
    ckptavg eval out/lawa/step* --tasks genesis_next_word --include-path examples/tasks --results results.json

    With --tasks, each model is also scored zero-shot by lm-evaluation-harness; its rows join the same
    --results file (a model and task already scored there, the task unchanged, is skipped), and a table
    of one row per model and one column per task metric is printed. --data may then be left out.
    """
    from ckptavg import evaluate
    from ckptavg.progress import Reporter

    if steps is not None and run is None:
        raise click.UsageError("--steps needs --run RUN (the run whose checkpoints it names)")
    if run is not None and steps is None:
        raise click.UsageError("--run needs --steps START:END[:EVERY]")
    if disagreement and results is not None:
        raise click.UsageError("--disagreement prints one number and writes no --results; leave one out")
    if tasks is None and (include_path is not None or limit is not None):
        raise click.UsageError(f"{'--include-path' if include_path is not None else '--limit'} needs --tasks")
    if tasks is not None and disagreement:
        raise click.UsageError("--disagreement compares two models' predictions and scores no --tasks; leave one out")
    sl = None if tasks is not None and data is None else _eval_slice(data, max_tokens, seq_len)
    task_list = None
    if tasks is not None:
        from ckptavg import downstream

        task_list = downstream.load_tasks(_task_specs(tasks), include_path, limit)  # before any model
    tok = _eval_tokenizer(tokenizer)
    folders = list(models)
    if run is not None:
        from ckptavg.errors import StepNotFoundError
        from ckptavg.sources import open_run

        r = open_run(run)
        wanted = evaluate.run_steps(r.steps(), steps, r.label)
        if set(wanted) - set(r.paths):
            raise StepNotFoundError(set(wanted) - set(r.paths), r.paths, r.label)
        folders += [r.paths[s] for s in wanted]
    if not disagreement:  # a folder named twice (a glob and --run) is evaluated once
        unique: dict[Path, Path] = {}
        for folder in folders:
            unique.setdefault(folder.resolve(), folder)
        folders = list(unique.values())
    log = Reporter()
    option = _shown("--seq-len", "seq_len", seq_len)
    notes = [evaluate.context_check(folder, seq_len, option) for folder in folders if sl]  # all, before any work
    for note in notes:
        if note is not None:
            log.log(f"warning: {note}")
    if disagreement:
        if len(folders) != 2:
            raise click.UsageError("--disagreement compares exactly two models")
        assert sl is not None  # --disagreement goes without --tasks, so with --data
        share = evaluate.disagreement(folders[0], folders[1], sl, batch_size=batch_size, device=device, tokenizer=tok)
        click.echo(f"{share:.6f}")
        return
    if not folders:
        raise click.UsageError("give model folders, or --run with --steps")
    table = evaluate.Results(results, sl, warn=lambda m: log.log(f"warning: {m}"))
    for folder in folders:
        if sl is None:
            pass
        elif table.has(folder):
            log.log(f"{folder}: already in {results}; skipped")
        else:
            table.add(evaluate.evaluate(folder, sl, batch_size=batch_size, device=device, tokenizer=tok))
            log.log(f"evaluated {folder}")
        if task_list is not None:
            downstream.score_into(
                table, folder, task_list, log=log.log, limit=limit, batch_size=batch_size, device=device, tokenizer=tok
            )
    from ckptavg.results import loss_rows, task_rows

    if sl is not None:
        _print_rows(loss_rows(table.sorted_rows()))
    if task_list is not None:
        for line in downstream.table_lines(task_rows(table.sorted_rows())):
            click.echo(line)


def _task_specs(tasks: str) -> list[str]:
    specs = [t.strip() for t in tasks.split(",") if t.strip()]
    if not specs:
        raise click.BadParameter("names no task", param_hint="'--tasks'")
    return specs


INTERPOLATE_PREFIX = ".ckptavg-interpolate-"  # the scratch folders of interpolate: one point's model


@cli.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--alphas",
    type=STEP_RANGE_FLOAT,
    default="0:1:0.25",
    show_default=True,
    help="START:END:STEP of alpha in alpha*A + (1-alpha)*B.",
)
@_eval_options
@_results_option("Write the points (alpha, loss, ppl) and the data slice to this JSON file, replacing it.")
@click.option(
    "--plot",
    "plot_to",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw loss against alpha into this image (needs the plot extra).",
)
@click.option(
    "--tmp-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Where each point is averaged, one model at a time [default: beside --results, else $TMPDIR].",
)
def interpolate(
    a: Path,
    b: Path,
    alphas: list[float],
    data: Path,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
    device: str,
    results: Path | None,
    tokenizer: str | None,
    plot_to: Path | None,
    tmp_dir: Path | None,
) -> None:
    """Loss along the line between two checkpoints: alpha*A + (1-alpha)*B (linear mode connectivity).

    Each point is averaged by the streaming engine into a temporary folder, evaluated, and removed.
    Prints alpha, loss and perplexity per point.

    The temporary folder (.ckptavg-interpolate-*, as large as one model) goes in --tmp-dir, by default
    beside --results, else in $TMPDIR: on a compute node $TMPDIR is often small or in memory (tmpfs,
    counted against the job's memory), while --results lies where the experiment's files are kept. It
    is removed on Ctrl-C and on SIGTERM (a SLURM time limit) too; one left by a run killed outright is
    removed by the next interpolate that uses the same folder.

    \b
    ckptavg interpolate runs/x/step20000 runs/x/step40000 --alphas 0:1:0.2 --data heldout.txt
    """
    import shutil

    from ckptavg import api, evaluate, scratch
    from ckptavg.outputs import check_file_output
    from ckptavg.progress import Reporter

    if results is not None:
        check_file_output(results, "--results")
    if plot_to is not None:
        check_plot_target(plot_to)
    sl = _eval_slice(data, max_tokens, seq_len)
    tok = _eval_tokenizer(tokenizer)
    if tmp_dir is None:
        import tempfile

        tmp_dir = results.parent if results is not None else Path(tempfile.gettempdir())
    log = Reporter()
    for p in scratch.remove_abandoned(scratch.with_prefix(tmp_dir, INTERPOLATE_PREFIX)):
        log.log(f"removed {p}, left by an interpolate that was killed")
    rows = []
    with scratch.sigterm_raises(), scratch.scratch_folder(tmp_dir, INTERPOLATE_PREFIX) as tmp:
        for i, alpha in enumerate(alphas):
            out = tmp / f"alpha{i}"
            plan = api.plan_avg([str(a), str(b)], weights=[alpha, 1 - alpha], out=out)
            api.average(plan)
            row = evaluate.evaluate(out, sl, batch_size=batch_size, device=device, tokenizer=tok)
            shutil.rmtree(out)  # one model on disk at a time
            rows.append({**row, "alpha": alpha, "model": f"{alpha:g}*{a} + {1 - alpha:g}*{b}"})
    if results is not None:
        results.write_text(json.dumps({"slice": evaluate.asdict(sl), "rows": rows}, indent=2) + "\n")
    for r in rows:
        ppl = "inf" if r.get("ppl") is None else f"{r['ppl']:.3f}"
        click.echo(f"{r['alpha']:g}\t{r['loss']:.4f}\t{ppl}")
    if plot_to is not None:
        from ckptavg.plot import plot_interpolation

        plot_interpolation([(r["alpha"], r["loss"]) for r in rows], plot_to, f"{a.name} -> {b.name}")


@cli.command(name="plot")
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Image file (.png, .pdf, .svg).",
)
@click.option("--title", default=None)
def plot_(results: Path, output: Path, title: str | None) -> None:
    """Plot held-out loss against step, one line per method, from an `eval --results` file.

    Prints the image path, then for each method the first step at which it reaches the original run's
    final loss (the paper's savings view), or '-' where it never does. Needs matplotlib
    (pip install 'ckptavg[plot]').

    \b
    ckptavg plot results.json -o curves.png
    """
    from ckptavg.plot import plot

    reached = plot(results, output, title, option="-o")
    click.echo(str(output))
    for method, step in reached.items():
        click.echo(f"{method}\t{'-' if step is None else step}")


@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="GPT-2 folder to write.")
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Copy tokenizer files from this folder (nanoGPT uses GPT-2's BPE, which is not bundled).",
)
@click.option("--overwrite", is_flag=True, help="Replace what is at --out: a folder, a file or a symlink.")
def convert(source: Path, out: Path, tokenizer: Path | None, overwrite: bool) -> None:
    """Turn nanoGPT weights (a ckpt.pt, or a folder ckptavg averaged from nanoGPT) into a GPT-2 folder.

    The result loads with transformers' AutoModelForCausalLM and so in lm-evaluation-harness. It is
    built in a hidden folder beside --out, removed however the conversion ends (SIGTERM too); one left
    by a conversion killed outright is removed by the next one to the same --out. --overwrite replaces
    a folder, a file or a symlink at --out (the link, never what it points to).

    \b
    ckptavg convert lawa/step6000 --out lawa-gpt2/step6000 --tokenizer gpt2-tokenizer/
    """
    from ckptavg.convert import convert as run
    from ckptavg.scratch import sigterm_raises

    with sigterm_raises():
        done = run(source, out, tokenizer=tokenizer, overwrite=overwrite)
    click.echo(str(done))


@cli.command(name="ls")
@click.argument("run", required=False)
@_source_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per checkpoint.")
@click.option("--allow-legacy-pickle", is_flag=True)
def ls_(as_json: bool, **kw: Any) -> None:
    """List a run's checkpoints: step, format, size (on disk, or to download), path.

    \b
    ckptavg ls runs/pythia-70m
    ckptavg ls --repo EleutherAI/pythia-70m-deduped
    """
    from ckptavg import api
    from ckptavg.progress import one_line

    for row in api.list_checkpoints(_source(kw), allow_legacy=kw["allow_legacy_pickle"]):
        if as_json:
            click.echo(json.dumps(row))
        else:
            size = "-" if row["bytes"] is None else f"{row['bytes'] / 1e6:.1f}MB"
            click.echo(f"{row['step']}\t{row['format']}\t{size}\t{one_line(row.get('error') or row['path'])}")


def main() -> None:
    from ckptavg.errors import Terminated

    try:
        cli.main(prog_name="ckptavg", standalone_mode=False)
    except Terminated as e:  # interpolate and convert turn SIGTERM into this, and clean up as on Ctrl-C
        click.echo(f"ckptavg: {e}; temporary folders were removed", err=True)
        sys.exit(1)
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
