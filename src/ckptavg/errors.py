"""Every exception ckptavg raises on purpose.

The library raises these and never prints or exits; the CLI turns any of them into one line on stderr
and exit code 1. Each message names the file, step or tensor at fault and, where there is one, the fix.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable


class CkptavgError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in ckptavg."""

    exit_code = 1  # what the CLI exits with


class InvalidArgumentError(CkptavgError):
    """Parameters that cannot describe a valid averaging (k < 1, decay outside (0, 1), ...)."""


class OptionError(InvalidArgumentError):
    """Options that cannot go together, or a value no run could satisfy: a usage error (exit code 2)."""

    exit_code = 2

    def __init__(self, option: str, detail: str) -> None:
        self.option = option
        self.detail = detail
        super().__init__(f"{option}: {detail}")


class StepNotFoundError(CkptavgError):
    """A window needs checkpoints that the run does not have."""

    def __init__(self, missing: Iterable[int], available: Iterable[int], source: str) -> None:
        self.missing = sorted(set(missing))
        self.available = sorted(set(available))
        self.source = source
        nearest = sorted({n for s in self.missing[:5] if (n := _nearest(s, self.available)) is not None})
        shown = ", ".join(str(s) for s in self.missing[:10])
        more = f" and {len(self.missing) - 10} more" if len(self.missing) > 10 else ""
        near = ", ".join(str(s) for s in nearest) if nearest else "none"
        noun = "step" if len(self.missing) == 1 else "steps"
        super().__init__(f"{noun} {shown}{more} not found in {source} (nearest available: {near})")


def _nearest(step: int, available: list[int]) -> int | None:
    return min(available, key=lambda a: (abs(a - step), a)) if available else None


class InvalidRunError(CkptavgError):
    """A folder, glob or repository cannot be read as a run of step checkpoints."""

    def __init__(self, run: str, detail: str) -> None:
        self.run = run
        self.detail = detail
        super().__init__(f"{run}: {detail}")


class _PathError(CkptavgError):
    """A problem with one file or folder: ``path`` (how the message names it) and ``detail`` (what is wrong)."""

    def __init__(self, path: object, detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{path}: {detail}")


class InvalidCheckpointError(_PathError):
    """A checkpoint (a file, a folder, a Hub revision's file) is missing, truncated, corrupt, or not in a
    supported format. ``path`` is how the message names it: a path, or repo@revision/file."""


class UnsafePickleError(InvalidCheckpointError):
    """A torch file holds more than plain tensors; ``weights_only=True`` refused it."""


class MismatchError(CkptavgError):
    """Members of one average disagree on a tensor's presence, shape or dtype."""


class NonFiniteError(CkptavgError):
    """A float input holds NaN or Inf, which would poison every average it enters."""


class OutputError(CkptavgError):
    """The output cannot be written: it exists, escapes its folder, or the disk refused."""


class HubError(CkptavgError):
    """A request to a Hub failed for good: the repository, a revision or a file cannot be had as asked."""

    def __init__(
        self,
        message: str,
        *,
        repo: str = "",
        revision: str | None = None,
        filename: str | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.repo = repo
        self.revision = revision
        self.filename = filename
        self.status = status  # the HTTP status that decided it, when there was one


class RevisionMovedError(HubError):
    """A revision (a branch) pointed to another commit in the middle of a run."""

    def __init__(self, repo: str, revision: str) -> None:
        super().__init__(
            f"{repo}@{revision} moved to another commit while this run used it; run it again",
            repo=repo,
            revision=revision,
        )


class HubUnavailableError(HubError):
    """Transient faults (HTTP 429 or 5xx, dropped connections, timeouts) outlived the retries.

    Nothing is wrong with the input: a run that fails this way keeps its finished work, and the same
    command later resumes it."""

    def __init__(
        self,
        message: str,
        *,
        repo: str = "",
        revision: str | None = None,
        filename: str | None = None,
        attempts: int = 0,
        seconds: float = 0.0,
        last: str = "",
    ):
        super().__init__(message, repo=repo, revision=revision, filename=filename)
        self.attempts = attempts
        self.seconds = seconds
        self.last = last


class UnsafeServerValueError(HubError):
    """A value from the server (file name, index entry, revision name, commit hash, ETag) would make a
    path outside the repository's cache folder, or is not what that field can hold."""


class CacheDirError(InvalidArgumentError):
    """The download cache (``--cache-dir``, or huggingface_hub's) cannot be a writable folder."""

    def __init__(self, path: object, detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{path}: cannot be the download cache: {detail}")


class ResultsFileError(_PathError):
    """A results file (``eval --results``, ``plot``) that is not what ``eval`` writes, or not for this run."""


class ModelFolderError(_PathError):
    """A folder given to ``eval`` that transformers cannot load, or that has no tokenizer to read text with."""


class DataFileError(_PathError):
    """Evaluation data that cannot be read or tokenized into at least one sequence."""


class MissingExtraError(CkptavgError):
    """A command needs an optional dependency that is not installed."""

    def __init__(self, what: str, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{what} needs {package}: pip install 'ckptavg[{extra}]'")


class TokenError(InvalidArgumentError):
    """A token that cannot be sent as an HTTP header. Its message never contains the token."""


class Terminated(BaseException):
    """SIGTERM arrived while a command that cleans up on it ran. A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` takes it for an error to handle; not a KeyboardInterrupt, which Click
    turns into a bare Abort."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")
