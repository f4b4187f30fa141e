"""Where a checkpoint is: a local directory, or a Hub repo id fetched into huggingface_hub's cache; and
the names its files go by. No torch here: the command line's refusals use it before anything heavy loads."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DernError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weight formats this tool neither reads nor copies (a Hub download skips them too).
FOREIGN_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "original/*")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(ref: str | os.PathLike) -> Path:
    """A local directory as given, or a Hub repo id fetched through huggingface_hub's cache.

    With HF_HUB_OFFLINE=1 a cached repo resolves without network access.
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DernError(f"input {ref} is a file; give the checkpoint directory")
        return path.resolve()
    if not _REPO_ID.match(str(ref)):
        raise DernError(f"input {ref} does not exist (neither a directory nor a Hugging Face repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(ref), ignore_patterns=list(FOREIGN_WEIGHTS))).resolve()
    except LocalEntryNotFoundError:
        raise DernError(f"no directory {ref}, and no Hugging Face repo {ref} in the local cache "
                        "(the Hub cannot be reached, or HF_HUB_OFFLINE is set)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise DernError(f"no directory {ref}, and fetching Hugging Face repo {ref} failed: "
                        f"{str(e).splitlines()[0]}") from None


