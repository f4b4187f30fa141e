"""What identifies a rewrite: the key an interrupted run must match to be resumed, and the
reproducibility facts recorded in dern_stream.json.

The key covers everything that decides the output bytes: the options that set values, the shard
size (it sets the layout), the device type and model (CPU and CUDA kernels round differently, and so
may two GPU models), the driver's torch thread count (CPU kernels could split their sums by it: the tests find
the bytes the same with 1 thread as with 2, which is why local workers share the cores out, but a resume keeps
it), the versions of this tool and torch, and the inputs. Inputs are identified by structure (config, tensor names,
dtypes, shapes) and by each file's size and modification time, so a checkpoint or dump replaced in
place (a new download, a rerun dump) is caught without reading hundreds of GB.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from .. import __version__


def versions() -> dict[str, str]:
    import numpy as np  # here: output_dir needs key_differences, the command line's checks no torch
    import safetensors
    import torch

    return {"dern_stream": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__}


def files_stamp(paths: list[Path]) -> str:
    """sha256 over each file's name, size and modification time (following symlinks, as the Hub cache uses)."""
    return _stamp(paths, lambda path: path.name)


def tree_stamp(root: Path) -> str:
    """files_stamp of every file under `root` (a zarr store is a directory of chunk files), each named by
    its path inside `root`."""
    root = Path(root)
    return _stamp([p for p in root.rglob("*") if p.is_file()], lambda path: path.relative_to(root))


def _stamp(paths: list[Path], label) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        st = os.stat(path)
        h.update(f"{label(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def run_key(*, options_record: dict, max_shard_size: int, device_type: str, device_name: str | None, threads: int,
            source_fingerprint: str, source_files: str, calib_files: str | None) -> dict:
    """The facts two runs must share for one to continue the other's partial output."""
    v = versions()
    return {
        "dern_stream": v["dern_stream"], "torch": v["torch"], "device_type": device_type,
        "device_name": device_name, "threads": threads,
        "options": options_record, "max_shard_size": max_shard_size,
        "source": {"fingerprint": source_fingerprint, "files": source_files},
        "calibration": calib_files,
    }


def key_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ, e.g. ['options.alpha: 0.4 -> 0.5', 'source.files']."""
    out = []
    for k in sorted(set(old) | set(new)):
        name = f"{prefix}{k}"
        if (k in old) != (k in new):  # (a key one run lacks: a null value must not hide it)
            out.append(f"{name} (only in the {'earlier' if k in old else 'new'} run)")
            continue
        a, b = old[k], new[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += key_differences(a, b, name + ".")
        elif a != b:
            short = all(isinstance(v, (int, float, bool, str, type(None))) and len(str(v)) <= 24 for v in (a, b))
            out.append(f"{name}: {a} -> {b}" if short else name)
    return out
