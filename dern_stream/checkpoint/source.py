"""Input checkpoints: resolve a directory or Hub repo id, index every tensor, read tensors by name.

Only headers are read up front (a few KB per shard), so opening a 300 GB checkpoint costs almost
nothing. Tensors are read with pread into memory the caller owns, not through a memory map: mapped
pages that were touched count toward the process's RSS until unmapped (docs/performance.md, "Memory"), pread
leaves them in the page cache, where the kernel can drop them. With sequential read-ahead advised it
is as fast as the map, and it
is safe from several threads at once (the rewrite reads the next layer while it computes this one).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DernError
from .config_view import config_view
from .descriptors import DescriptorCache, descriptor_budget
from .file_names import INDEX_NAME, SINGLE_NAME
from .locate import resolve_checkpoint  # noqa: F401 - re-exported
from .safetensors_format import TensorEntry, read_header

if TYPE_CHECKING:
    import torch

# Prefetch reads in chunks of this size, and reads across gaps of up to _PREFETCH_GAP between tensors
# (one longer read beats a seek on disks and network block devices alike).
_PREFETCH_CHUNK = 8 * 2**20
_PREFETCH_GAP = 2**20


def open_sequential(path: str) -> int:
    """A read-only descriptor with sequential read-ahead advised (a layer's tensors are read in file
    order). Keep it open: reopening per tensor resets the kernel's read-ahead each time."""
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


def data_extents(fd: int, offset: int, size: int) -> list[tuple[int, int]]:
    """The stretches of [offset, offset + size) the file stores as data, as (start, end): where it has holes (zeros it
    never wrote, as a sparse file holds) they are left out. All of the range where the file system cannot tell, or
    where the range ends past the end of the file (which the read then reports)."""
    end, extents, pos = offset + size, [], offset
    stat = os.fstat(fd)
    if end > stat.st_size or stat.st_blocks * 512 >= stat.st_size:
        return [(offset, end)]  # (a file with as many blocks as bytes has no holes: the file system is not asked)
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            if data >= end:
                break
            pos = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            return [(offset, end)]
        extents.append((data, pos))
    return extents


def pread_fully(fd: int, view: memoryview, offset: int, file: str, what: str) -> None:
    """Fill `view` from `file` (open as `fd`) at `offset`; a short file or a read error is a DernError
    naming the file and `what` was being read."""
    try:
        while view:
            n = os.preadv(fd, [view], offset)
            if n == 0:
                raise DernError(f"{os.path.basename(file)} is truncated: it ends inside {what}")
            view, offset = view[n:], offset + n
    except OSError as e:
        raise DernError(f"cannot read {what} from {os.path.basename(file)}: {e.strerror or e}") from None


class Checkpoint:
    """A safetensors checkpoint directory: config, tensor index, and lazy tensor reads. Opening one (config and
    headers) needs no torch: the command line's checks do it before torch loads; the reads import it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.file_config = self._read_config()  # config.json as written
        self.entries, self.shard_files = self._index_tensors()
        self._files = DescriptorCache(self._open, descriptor_budget(1 / 3))

    @property
    def config(self) -> dict:
        """config.json as every stage reads it: one flat dict of the language model's settings (config_view.py;
        computed at each use, so that it follows the layouts the family records register)."""
        return config_view(self.file_config)

    def _read_config(self) -> dict:
        path = self.root / "config.json"
        if not path.is_file():
            raise DernError(f"{self.root} has no config.json; is it a Hugging Face checkpoint directory?")
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DernError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise DernError(f"{path} does not hold a JSON object")
        return config

    def _index_tensors(self) -> tuple[dict[str, TensorEntry], list[str]]:
        index_path = self.root / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise DernError(f"{index_path} is not a valid safetensors index (no weight_map)") from None
            for name, fname in weight_map.items():
                # Shard names are plain file names in this directory: never a path out of it.
                if not isinstance(fname, str) or not fname.endswith(".safetensors") or "/" in fname \
                        or fname.startswith("."):
                    raise DernError(f"{INDEX_NAME} places tensor {name!r} in {fname!r}, which is not a "
                                    ".safetensors file name in this directory")
            files = sorted(set(weight_map.values()))
        elif (self.root / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise DernError(f"{self.root} holds no {SINGLE_NAME} or {INDEX_NAME} (only safetensors is supported)")
        entries: dict[str, TensorEntry] = {}
        for fname in files:
            fpath = self.root / fname
            if not fpath.is_file():
                raise DernError(f"shard {fname} named in {INDEX_NAME} is missing from {self.root}")
            shard_entries, _ = read_header(str(fpath))
            for name, entry in shard_entries.items():
                if weight_map is None or weight_map.get(name) == fname:
                    entries[name] = entry
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in entries:
                    raise DernError(f"{INDEX_NAME} places tensor {name!r} in {fname}, which does not hold it")
        return entries, files

    def fingerprint(self) -> str:
        """sha256 over config.json and every tensor's name, dtype and shape (no tensor data is read)."""
        h = hashlib.sha256(json.dumps(self.file_config, sort_keys=True).encode())
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(f"{name}|{e.dtype}|{e.shape}|{e.nbytes}\n".encode())
        return h.hexdigest()

    def load(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, in freshly allocated host memory."""
        import torch

        from .safetensors_format import DTYPES

        entry = self.entries[name]
        out = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read a tensor's bytes straight into `out` (contiguous, host, same dtype and shape): no second copy."""
        import torch

        from .safetensors_format import DTYPES

        entry = self.entries[name]
        if out.dtype != DTYPES[entry.dtype] or tuple(out.shape) != entry.shape or not out.is_contiguous():
            raise AssertionError(f"{name}: buffer {out.dtype} {tuple(out.shape)} for {entry.dtype} {entry.shape}")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B") if entry.nbytes else memoryview(b"")
        self._pread_fully(entry.file, entry.start, view, f"tensor {name!r}")

    def read_rows_into(self, name: str, first: int, out: torch.Tensor) -> None:
        """Read `out.shape[0]` entries of a tensor's leading dimension, from `first` on, straight into `out`:
        one pread of their byte range (a fused tensor's expert, without reading the others)."""
        import torch

        from .safetensors_format import DTYPES

        entry = self.entries[name]
        rows = out.shape[0]
        if (out.dtype != DTYPES[entry.dtype] or tuple(out.shape[1:]) != entry.shape[1:] or not out.is_contiguous()
                or not 0 <= first <= first + rows <= entry.shape[0]):
            raise AssertionError(f"{name}: rows {first}+{rows} into {out.dtype} {tuple(out.shape)} for "
                                 f"{entry.dtype} {entry.shape}")
        row_bytes = entry.nbytes // entry.shape[0]
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        self._pread_fully(entry.file, entry.start + first * row_bytes, view, f"tensor {name!r}")

    def prefetch(self, names: Iterable[str]) -> int:
        """Read the tensors' bytes from disk into the kernel's page cache, keeping none of them; returns
        the bytes read. A later read_into or raw copy of them is then a memory copy.

        This is how the rewrite reads ahead: the next layer's disk reads overlap this layer's work
        without a second layer in the process's own memory (page cache is the kernel's to reclaim,
        and counts toward no process's RSS). Nearby tensors are read as one span, in file order."""
        spans: list[list] = []
        for entry in sorted((self.entries[n] for n in names), key=lambda e: (e.file, e.start)):
            if spans and spans[-1][0] == entry.file and entry.start <= spans[-1][2] + _PREFETCH_GAP:
                spans[-1][2] = max(spans[-1][2], entry.start + entry.nbytes)
            else:
                spans.append([entry.file, entry.start, entry.start + entry.nbytes])
        longest = max((end - start for _, start, end in spans), default=0)
        if not longest:
            return 0
        scratch = memoryview(bytearray(min(_PREFETCH_CHUNK, longest)))
        for file, start, end in spans:
            for offset in range(start, end, len(scratch)):
                self._pread_fully(file, offset, scratch[:min(len(scratch), end - offset)],
                                  f"the tensors at bytes {start}-{end}")
        return sum(b - a for _, a, b in spans)

    def _pread_fully(self, file: str, offset: int, view: memoryview, what: str) -> None:
        with self._files.use(file) as fd:
            pread_fully(fd, view, offset, file, what)

    @staticmethod
    def _open(path: str) -> int:
        try:
            return open_sequential(path)
        except OSError as e:
            raise DernError(f"cannot open {os.path.basename(path)}: {e.strerror or e}") from None

    def release(self) -> None:
        """Close the shard files (reopened on the next read)."""
        self._files.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
