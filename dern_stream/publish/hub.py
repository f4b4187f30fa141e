"""A rewrite's output uploaded to the Hugging Face Hub once it verifies (fetching by repo id:
checkpoint/hub_cache.py). huggingface_hub does the transfer, with its token (HF_TOKEN or `hf auth login`) and
progress bars. No torch here: the command line's refusals use this module before anything heavy loads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint.hub_cache import first_line, http_status, hub_offline
from ..checkpoint.locate import REPO_ID
from ..checkpoint.output_dir import not_rewrite_output
from ..errors import DernError


def push(out: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         against: str | os.PathLike | None = None, against_revision: str | None = None,
         progress: bool = True) -> str:
    """Upload the rewrite output `out` to the Hub model repo `repo_id` (created if needed, `private` if
    so asked; into branch `revision`, created from main if needed) once `dern_stream.publish.verify.verify(out,
    against=against)` passes. Nothing is uploaded when it does not, nor when the repo already holds
    safetensors weights that `out` does not (they would sit beside the new ones). Returns the commit's
    URL. The token is huggingface_hub's (HF_TOKEN, or `hf auth login`)."""
    root = Path(out).expanduser().resolve()
    check_repo_id(repo_id, "REPO")
    check_push_token(repo_id)
    reason = not_rewrite_output(root) if root.is_dir() else "is not a directory"
    if reason is not None:
        raise DernError(f"not pushed to {repo_id}: {root} {reason}; only a rewrite's output is pushed")
    from .verify import verify  # (loads torch)

    try:
        report = verify(root, against=against, revision=against_revision, progress=progress)
    except DernError as e:
        raise DernError(f"not pushed to {repo_id}: {e}") from e
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise DernError(f"not pushed to {repo_id}: verify found a problem in {root}: {report.problems[0]}{more}; "
                        "nothing was uploaded")
    from huggingface_hub import HfApi

    api = HfApi()
    target = f"Hugging Face repo {repo_id}" + (f" (branch {revision})" if revision else "")
    with _pushing(target):
        check_push_target(repo_id, {p.name for p in root.iterdir() if p.is_file()}, revision, root.name)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=root, revision=revision, ignore_patterns=[".*"],
                                 commit_message=f"dern-stream rewrite: {root.name}")
    return info.commit_url


def _repo_files(api, repo_id: str, revision: str | None) -> set[str]:
    """The files the push will add to: the repo's at `revision`, main's for a branch not made yet (it
    is made from main), none for a repo not made yet."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    for rev in dict.fromkeys([revision, None]):
        try:
            return set(api.list_repo_files(repo_id, revision=rev))
        except RevisionNotFoundError:
            continue
        except RepositoryNotFoundError:
            break
    return set()


@contextmanager
def _pushing(target: str) -> Iterator[None]:
    try:
        yield
    except DernError:
        raise
    except Exception as e:
        hint = ("; log in with `hf auth login` or set HF_TOKEN (a token that can write there)"
                if http_status(e) in (401, 403) else "")
        raise DernError(f"pushing to {target} failed: {first_line(e)}{hint}") from e


def check_push_token(repo_id: str) -> None:
    """Before a push, and before a long rewrite that ends in one: a token must be there (HF_TOKEN, or `hf auth
    login`) and the Hub not be switched off (HF_HUB_OFFLINE), else the push would fail only after the work.
    Whether the token may write to `repo_id` is known only when the push runs."""
    from huggingface_hub import get_token

    if hub_offline():
        raise DernError(f"cannot push to Hugging Face repo {repo_id}: HF_HUB_OFFLINE is set (checked before any work)")
    if get_token() is None:
        raise DernError(f"pushing to Hugging Face repo {repo_id} needs a token: log in with `hf auth login` or set "
                        "HF_TOKEN (checked before any work)")


def check_push_access(repo_id: str) -> None:
    """Before a long rewrite that ends in a push: the Hub knows the token, and it may write to the repo's namespace
    (its own user or one of its organisations)."""
    from huggingface_hub import HfApi

    target = f"Hugging Face repo {repo_id}"
    with _pushing(target):
        who = HfApi().whoami()
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise DernError(f"pushing to {target} needs a token that may write; this one is read-only (checked before "
                        "any work)")
    namespaces = {who.get("name"), *((org or {}).get("name") for org in who.get("orgs") or [])} - {None}
    if repo_id.split("/")[0] not in namespaces:
        raise DernError(f"pushing to {target}: the token is {who.get('name')}'s, which may write to "
                        f"{', '.join(sorted(namespaces))}, not to {repo_id.split('/')[0]} (checked before any work)")


def check_push_target(repo_id: str, ours: set[str], revision: str | None = None, what: str = "the output") -> None:
    """The repo holds no safetensors weights that the push of the files `ours` would leave beside the new ones."""
    from huggingface_hub import HfApi

    target = f"Hugging Face repo {repo_id}" + (f" (branch {revision})" if revision else "")
    with _pushing(target):
        present = _repo_files(HfApi(), repo_id, revision)
    stale = sorted(f for f in present - ours if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"))
    if stale:
        raise DernError(f"not pushed: {target} already holds weights that {what} does not "
                        f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}), which would sit beside "
                        "the new ones; push to a new repo or branch, or delete them there first")


def check_repo_id(repo_id: str, option: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
            raise HFValidationError("")
        validate_repo_id(repo_id)  # the Hub's own rules (no "--", "..", at most 96 characters...), offline
    except HFValidationError as e:
        why = f" ({str(e).split(':')[0]})" if str(e) else ""
        raise DernError(f"{option} needs a Hugging Face repo id such as me/Mixtral-4x, got {repo_id!r}{why}") from None
