"""Runs on the Hugging Face Hub: one revision per step (Pythia: branches step1000, step2000, ...).

Planning reads only the revision list and file lists (and the small index files of sharded
checkpoints): no weight is downloaded before the plan holds together. Averaging then fetches each
member's files with ``huggingface_hub`` into its usual cache and reads them like a local folder.
Provenance names the repository, each revision and its commit hash, never a token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ckptavg.errors import CheckpointFormatError, CkptavgError
from ckptavg.sources.checkpoint import Checkpoint
from ckptavg.sources.hf_folder import WEIGHT_FILES, open_hf_checkpoint

_EXTRA = re.compile(
    r"^(config\.json|generation_config\.json|special_tokens_map\.json|tokenizer.*|vocab\..*|merges\.txt)$"
)


def _template_regex(template: str) -> re.Pattern[str]:
    if "{step}" not in template:
        raise CkptavgError(f"--revision-template {template!r} needs a {{step}} placeholder")
    head, _, tail = template.partition("{step}")
    return re.compile(f"^{re.escape(head)}(\\d+){re.escape(tail)}$")


class HubSource:
    """One repository: its step revisions, and how to plan and fetch each."""

    def __init__(
        self,
        repo: str,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        cache_dir: str | None = None,
        template: str = "step{step}",
        allow_legacy: bool = False,
    ):
        from huggingface_hub import HfApi

        self.repo = repo
        self.endpoint = endpoint
        self.token = token
        self.cache_dir = cache_dir
        self.allow_legacy = allow_legacy
        self.api = HfApi(endpoint=endpoint, token=token)
        from huggingface_hub import constants

        pattern = _template_regex(template)
        self.offline = bool(constants.HF_HUB_OFFLINE)
        self.repo_cache = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        if self.offline:  # HF_HUB_OFFLINE=1: the revisions this cache has seen, as the client recorded them
            refs_dir = self.repo_cache / "refs"
            names = {p.name: p.read_text().strip() for p in refs_dir.iterdir()} if refs_dir.is_dir() else {}
        else:
            refs = self._call(lambda: self.api.list_repo_refs(repo), what="list its revisions")
            names = {b.name: b.target_commit for b in [*refs.branches, *refs.tags]}
        self.revisions: dict[int, tuple[str, str]] = {}
        for name, commit in names.items():
            m = pattern.match(name)
            if m:
                self.revisions[int(m.group(1))] = (name, commit)
        if not self.revisions and self.offline:
            raise CkptavgError(f"{repo}: HF_HUB_OFFLINE is set and {self.repo_cache} holds no revision of it")
        if not self.revisions:
            raise CkptavgError(f"{repo}: no revision matches {template!r} (use --revision-template)")

    def _call(self, fn: Any, *, what: str) -> Any:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.repo} on {self.endpoint or 'the Hugging Face Hub'}"
        try:
            return fn()
        except GatedRepoError as e:
            raise CkptavgError(f"{where}: access refused; a token is needed (--token or HF_TOKEN)") from e
        except RepositoryNotFoundError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise CkptavgError(f"{where}: access refused; a token is needed (--token or HF_TOKEN)") from e
            raise CkptavgError(f"{where}: repository not found (or private: pass --token)") from e
        except RevisionNotFoundError as e:
            raise CkptavgError(f"{where}: revision not found while trying to {what}") from e
        except EntryNotFoundError as e:
            raise CkptavgError(f"{where}: file not found while trying to {what}") from e
        except LocalEntryNotFoundError as e:
            raise CkptavgError(f"{where}: not in the local cache and the Hub cannot be reached ({what})") from e
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            raise CkptavgError(f"{where}: the server answered HTTP {status} while trying to {what}") from e
        except Exception as e:
            # The client's transport errors (connection refused, dropped mid-file after its retries,
            # timeouts) come from its HTTP library, whose name changes between versions: match on that.
            if isinstance(e, OSError) or type(e).__module__.split(".")[0].startswith(("httpx", "httpcore")):
                raise CkptavgError(f"{where}: cannot {what} ({e.__class__.__name__}: {e})") from e
            raise

    def _download(self, step: int, filename: str) -> Path:
        from huggingface_hub import hf_hub_download

        name, commit = self.revisions[step]
        path = Path(
            self._call(
                lambda: hf_hub_download(
                    self.repo,
                    filename,
                    revision=name,  # by name, so the cache records the branch for HF_HUB_OFFLINE
                    cache_dir=self.cache_dir,
                    endpoint=self.endpoint,
                    token=self.token,
                ),
                what=f"download {filename} of {name}",
            )
        )
        if commit not in path.parts:
            raise CkptavgError(f"{self.repo}@{name} moved to another commit while this run used it; run it again")
        return path

    def plan_checkpoint(self, step: int) -> Checkpoint:
        """The checkpoint of ``step`` as files and sizes, with a ``fetch`` that downloads it."""
        name, commit = self.revisions[step]
        if self.offline:
            snapshot = self.repo_cache / "snapshots" / commit
            files = [p for p in snapshot.rglob("*") if p.is_file()] if snapshot.is_dir() else []
            sizes = {str(p.relative_to(snapshot)): p.stat().st_size for p in files}
        else:
            listing = self._call(lambda: list(self.api.list_repo_tree(self.repo, revision=commit)), what=f"list {name}")
            sizes = {f.path: f.size for f in listing if getattr(f, "size", None) is not None}
        found = next(((n, fmt) for n, fmt in WEIGHT_FILES if n in sizes), None)
        if found is None:
            raise CheckpointFormatError(
                f"{self.repo}@{name}: no weights in a supported format (has {', '.join(sorted(sizes)) or 'nothing'})"
            )
        weight, fmt = found
        if weight.endswith(".index.json"):
            index = json.loads(self._download(step, weight).read_text())
            weights = sorted(set(index["weight_map"].values()))
            missing = [w for w in weights if w not in sizes]
            if missing:
                raise CheckpointFormatError(f"{self.repo}@{name}: {weight} names {missing[0]}, which is not there")
            needed = [weight, *weights]
        else:
            needed = [weight]
        extras = [f for f in sizes if _EXTRA.match(f)]
        label = f"{self.repo}@{name}"
        meta: dict[str, object] = {"hub": {"repo": self.repo, "revision": name, "commit": commit}}

        def fetch() -> Checkpoint:
            snapshot = self.repo_cache / "snapshots" / commit
            before = {f for f in [*extras, *needed] if (snapshot / f).exists()}
            local = [self._download(step, f) for f in [*extras, *needed]]
            ckpt = open_hf_checkpoint(local[-1].parent, step, allow_legacy=self.allow_legacy)
            ckpt.label, ckpt.meta = label, meta
            # Only what this run brought in may be evicted again: the cache may hold the user's own downloads.
            ckpt.downloaded = [p for f, p in zip([*extras, *needed], local, strict=True) if f not in before]
            return ckpt

        return Checkpoint(
            step,
            label,
            fmt,
            {},
            meta=meta,
            fetch=fetch,
            download_bytes=sum(sizes[f] for f in [*needed, *extras]),
        )
