"""Zero-shot downstream accuracy of model folders with lm-evaluation-harness (``ckptavg eval --tasks``).

The paper judges averaging by zero-shot accuracy on LAMBADA, PIQA, ARC, SciQ, ... as well as by held-out
loss; this runs the same harness on every averaged output and original checkpoint and keeps the scores in
the results file that holds the losses, one row per model and task:

    tasks = load_tasks(["lambada_openai", "piqa"], include_path=None, limit=None)
    for row in score(Path("lawa/step5000"), tasks): ...

Tasks are loaded once (names, task YAML files, or the tasks of an ``--include-path`` folder) and each
model is loaded by :func:`ckptavg.evaluate.load_model`, so averaged nanoGPT folders and the checks on
weights that do not fit their config apply here too. Each task carries a hash of what it scores (its
config, its documents and the example limit), so that a task changed since a model was scored is scored
again rather than skipped. lm-eval is an optional extra: ``pip install 'ckptavg[lm-eval]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptavg.errors import InvalidArgumentError, MissingExtraError, ModelFolderError, OptionError
from ckptavg.evaluate import _first_line, describe_model, load_model
from ckptavg.results import Results

_YAML = (".yaml", ".yml")
# Metrics lm-eval reports that are not scores: the task's name, and stderrs (N/A without bootstrap).
_NOT_METRICS = ("alias", "name", "sample_len")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class Task:
    """One lm-eval task, loaded: its name, the harness's task object, and the hash of what it scores."""

    name: str
    task: Any
    hash: str


def require_lm_eval() -> Any:
    """The lm_eval module, or MissingExtraError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError as e:
        raise MissingExtraError("eval --tasks", "lm-evaluation-harness", "lm-eval") from e
    return lm_eval


def load_tasks(specs: list[str], include_path: Path | None = None, limit: int | None = None) -> list[Task]:
    """Every leaf task the specs name (a group or tag names several), each once, in order.

    A spec is a task, group or tag name (lm-eval's own, or one in ``include_path``), or a task YAML
    file. Indexing lm-eval's own tasks takes tens of seconds, so it is done only when a spec is not
    a file and not in ``include_path``. A name no index knows is an OptionError naming it; a task
    that cannot load (a dataset not in the cache offline, a broken YAML) is an InvalidArgumentError.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not include_path.is_dir():
        raise OptionError(f"--include-path {include_path}", "not a folder (of lm-eval task YAML files)")
    with _quiet():
        local = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=False)
        full: Any = None
        tasks: dict[str, Task] = {}
        for spec in specs:
            manager = local
            if spec.endswith(_YAML):
                if not Path(spec).is_file():
                    raise OptionError(f"--tasks {spec}", "no such task YAML file")
            elif spec not in local.all_tasks:
                if full is None:  # lm-eval's own tasks, and include_path's that build on them
                    full = TaskManager(include_path=str(include_path) if include_path else None)
                if spec not in full.all_tasks:
                    where = f" or in {include_path}" if include_path else ""
                    raise OptionError(
                        f"--tasks {spec}",
                        f"not a task, group or tag of lm-eval{where}, nor a task YAML file "
                        f"(lm-eval ls tasks lists them)",
                    )
                manager = full
            try:
                loaded = manager.load([spec])["tasks"]
            except Exception as e:  # the boundary: a dataset it cannot fetch, a YAML it cannot read, ...
                raise InvalidArgumentError(f"--tasks {spec}: lm-eval cannot load it ({_first_line(e)})") from e
            for name, task in loaded.items():
                if not (isinstance(name, str) and name.isprintable()):  # a column of the printed table
                    raise InvalidArgumentError(
                        f"--tasks {spec}: names a task {name!r} with a tab, line break or other control character"
                    )
                if name not in tasks:
                    task.set_config(key="num_fewshot", value=0)  # zero-shot, as the paper; and in the hash
                    tasks[name] = Task(name, task, task_hash(task, limit))
    return list(tasks.values())


def task_hash(task: Any, limit: int | None) -> str:
    """sha256 of the task's config (without where its YAML lies), its documents, and the limit."""
    config = dict(task.dump_config())
    metadata = dict(config.get("metadata") or {})
    metadata.pop("config_source", None)
    config["metadata"] = metadata
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps({"limit": limit}).encode())
    for doc in task.eval_docs:
        digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def load_tokenizer(folder: Path, tokenizer: Path | None = None) -> Any:
    """The tokenizer in ``tokenizer`` (or ``folder``); ModelFolderError naming the folder if none loads."""
    source = tokenizer or folder
    if not any((source / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelFolderError(source, f"no tokenizer to score tasks with (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except MemoryError:
        raise
    except Exception as e:  # the boundary: whatever a broken tokenizer file makes transformers raise
        raise ModelFolderError(source, f"no tokenizer to score tasks with ({_first_line(e)})") from e


def score(
    folder: Path,
    tasks: list[Task],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    tokenizer: Path | None = None,
) -> list[dict[str, Any]]:
    """One row per task: method and step (as a loss row), the task, its hash, its metrics and ``n``."""
    if not tasks:
        return []
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tok = load_tokenizer(folder, tokenizer)
    model = load_model(folder, device)
    with _quiet():
        try:
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
            # lm_eval.evaluate, not simple_evaluate: the tasks are loaded (zero-shot) already, and
            # simple_evaluate would also seed random, numpy and torch for the whole process, ask git for a
            # commit, and run `pip list` for its environment report (about 3 s per model, for nothing kept)
            out = lm_eval.evaluate(
                lm=lm,
                task_dict={"tasks": {t.name: t.task for t in tasks}, "groups": {}, "group_map": {}},
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
            )
        except MemoryError:
            raise
        except Exception as e:  # the boundary: what the harness or the model raises on these tasks
            names = ", ".join(t.name for t in tasks)
            raise ModelFolderError(folder, f"lm-eval failed on {names} ({_first_line(e)})") from e
    about = describe_model(folder)
    rows = []
    for t in tasks:
        rows.append(
            {
                "model": str(folder),
                **about,
                "task": t.name,
                "task_hash": t.hash,
                "n": int(out["n-samples"][t.name]["effective"]),
                "metrics": metrics(out["results"][t.name]),
            }
        )
    return rows


def score_into(
    table: Results,
    folder: Path,
    tasks: list[Task],
    *,
    log: Callable[[str], None],
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    tokenizer: Path | None = None,
) -> None:
    """Score ``folder`` on the tasks ``table`` lacks for it (or holds for an older version of the task),
    adding each row as it comes; ``log`` hears one line of what was skipped and one of what was scored."""
    todo = [t for t in tasks if not table.has_task(folder, t.name, t.hash)]
    if len(todo) < len(tasks):
        log(f"{folder}: {len(tasks) - len(todo)} task(s) already in {table.path}; skipped")
    if not todo:
        return
    for row in score(folder, todo, limit=limit, batch_size=batch_size, device=device, tokenizer=tokenizer):
        table.add(row)
    log(f"scored {folder} on {', '.join(t.name for t in todo)}")


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Task rows as printed: a header, then one line per model (method, step, one column per task metric
    as ``task/metric``, folder), tab-separated. A metric a model lacks is empty; one beyond range, inf."""
    columns = list(dict.fromkeys(f"{r['task']}/{m}" for r in rows for m in r["metrics"]))
    by_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        line = by_model.setdefault(r["model"], {"method": r["method"], "step": r["step"]})
        line.update({f"{r['task']}/{m}": v for m, v in r["metrics"].items()})
    out = ["\t".join(["method", "step", *columns, "model"])]
    for model, line in by_model.items():
        step = "-" if line["step"] is None else str(line["step"])
        out.append("\t".join([line["method"], step, *(_cell(line, c) for c in columns), model]))
    return out


def _cell(line: dict[str, Any], column: str) -> str:
    """4 decimals, or 4 significant digits for a perplexity in the millions."""
    if column not in line:
        return ""
    v = line[column]
    return "inf" if v is None else f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


def metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc": 0.31, "acc_norm": 0.29}`` from lm-eval's ``{"acc,none": 0.31, "acc_stderr,none": "N/A"}``.

    A metric under a filter other than ``none`` keeps it: ``exact_match:strict-match``. A value beyond
    float range (a perplexity of an untrained model) is None, as a loss row's ``ppl``."""
    out: dict[str, float | None] = {}
    for key, v in result.items():
        name, _, filt = key.partition(",")
        if name in _NOT_METRICS or "_stderr" in name or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[name if filt in ("", "none") else f"{name}:{filt}"] = float(v) if math.isfinite(v) else None
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep lm-eval's log lines, progress bars and git's complaint (it asks git for a commit) off stderr,
    which carries ckptavg's one line per model; CKPTAVG_DEBUG=1 lets them through."""
    if os.environ.get("CKPTAVG_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
