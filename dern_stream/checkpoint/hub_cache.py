"""Checkpoints fetched from the Hugging Face Hub by repo id into huggingface_hub's cache (only the files a
command uses), and how the audit record names such an input. huggingface_hub does the transfers, with its cache
(HF_HOME), offline mode (HF_HUB_OFFLINE), token and resumed downloads. No torch here: the command line's refusals
use this module before anything heavy loads."""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DernError
from .file_names import FOREIGN_WEIGHTS, INDEX_NAME, SINGLE_NAME

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# Everything at the top level but weights and dot-files: config.json, the index, generation config,
# tokenizer, chat template, README, license... (what a rewrite copies beside its shards, see
# output_dir.side_files). Sub-folders (Mixtral's original/) and other weight formats are never fetched.
_SIDE_FILES_ONLY = ["*/*", ".*", "*.safetensors", *FOREIGN_WEIGHTS]


def download(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot of `repo_id` at `revision` (default: the repo's main branch) in huggingface_hub's
    cache, holding the files a command reads: the top-level side files (config.json and the index
    among them), then the safetensors shards the index names (model.safetensors without an index),
    fetched at the commit the first step resolved. Any other .safetensors file (a `consolidated` copy),
    weights in other formats and sub-folders are left on the Hub. An interrupted download resumes
    (huggingface_hub keeps the partial file and asks for the rest); with HF_HUB_OFFLINE=1 the cache
    alone answers. A failure is a DernError naming the repo and the revision."""
    from huggingface_hub import snapshot_download

    with _fetching(repo_id, revision):
        snapshot = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=_SIDE_FILES_ONLY))
        # Shards already in the snapshot are complete (the cache links a file there only once it is whole): asking
        # again would cost a listing of the repo, which huggingface_hub 1.x refuses offline even for a cached commit.
        shards = [name for name in _shard_names(snapshot) if not (snapshot / name).is_file()]
        if shards:  # pinned to the commit already resolved: a branch moving meanwhile cannot mix two commits
            snapshot_download(repo_id, revision=snapshot.name, allow_patterns=[glob.escape(s) for s in shards])
    return snapshot.resolve()


def _shard_names(snapshot: Path) -> list[str]:
    """The shards the index names, or model.safetensors; none for an index that cannot be read (the
    checkpoint reader then says what is wrong with it)."""
    index = snapshot / INDEX_NAME
    if not index.is_file():
        return [SINGLE_NAME]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        # (plain file names only, as the reader accepts them: never a path into a sub-folder)
        return sorted({name for name in weight_map.values() if isinstance(name, str) and "/" not in name
                       and name.endswith(".safetensors") and not name.startswith(".")})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return []


@contextmanager
def _fetching(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's errors as one line naming the repo and the revision."""
    try:
        yield
    except DernError:
        raise
    except Exception as e:  # (the library's, and its HTTP client's, which are not OSErrors)
        raise DernError(_fetch_failure(e, repo_id, revision)) from e


def _fetch_failure(e: Exception, repo_id: str, revision: str | None) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"Hugging Face repo {repo_id} (revision {revision or 'main'})"
    if isinstance(e, GatedRepoError):
        return f"{what} is gated: accept its terms on the Hub, then log in (`hf auth login`) or set HF_TOKEN"
    if isinstance(e, RepositoryNotFoundError):
        return (f"Hugging Face repo {repo_id} was not found on the Hub (if it is private: log in with "
                "`hf auth login` or set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return f"{what} was not found: the repo has no such branch, tag or commit"
    if isinstance(e, LocalEntryNotFoundError):
        reason = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
        return f"{what} is not (completely) in the local cache {_cache_dir()}, and {reason}"
    return f"{what} could not be fetched: {first_line(e)}"


def first_line(e: BaseException) -> str:
    """The error's type and first line, and its root cause's (huggingface_hub wraps an upload's failure)."""
    def text(error: BaseException) -> str:
        return (str(error).strip().splitlines() or [""])[0]

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    line = f"{type(e).__name__}: {text(e)}"
    return line if root is e or text(root) == text(e) else f"{line} ({type(root).__name__}: {text(root)})"


def http_status(e: BaseException | None) -> int | None:
    """The HTTP status behind an error, if any (looked for along its causes)."""
    while e is not None:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:
            return status
        e = e.__cause__
    return None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def source_record(path: Path, revision: str | None = None) -> dict:
    """How dern_stream.json names the input: for a snapshot in huggingface_hub's cache, the repo id, the
    revision asked for and the commit it resolved to; else the directory's name alone (not its path,
    which says where it lay on one machine). With no revision given, the revision is `main` when the
    cache's ref for main names this commit, else null (unknown)."""
    path = Path(path)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--") or not _COMMIT.match(path.name):
        return {"name": path.name}
    if revision is None:
        main = path.parent.parent / "refs" / "main"
        revision = "main" if main.is_file() and main.read_text().strip() == path.name else None
    return {"repo_id": "/".join(repo.split("--")[1:]), "revision": revision, "commit": path.name}
