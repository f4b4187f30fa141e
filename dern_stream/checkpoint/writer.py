"""Sharded safetensors output written in place.

Every output tensor's name, dtype and shape is known before any layer is computed (the
rewrite only changes counts), so the shards and their headers are laid out first and each
tensor is then written at its offset the moment it exists. Nothing waits in a shard-sized
buffer: host memory stays at one layer, whatever --max-shard-size is.
"""

from __future__ import annotations

import errno
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DernError
from .safetensors_format import DTYPE_NAMES, TensorEntry, build_header, dtype_size
from .source import INDEX_NAME, SINGLE_NAME, open_sequential

_COPY_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Pre-sized shard files in `directory`; write() / copy_raw() fill each tensor's slot once."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_size: int, resume: bool = False):
        """With `resume`, the shards must already exist exactly as planned (an interrupted run's): they
        are reopened as they are, and `skip()` marks the tensors they already hold."""
        self.directory = Path(directory)
        self.specs = {s.name: s for s in specs}
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        self._fds: list[int] = []
        self._pending = set(self.specs)
        self._pending_in: dict[int, set[str]] = {}  # per shard fd: tensors not yet written
        # Finished shards are flushed on a thread of their own, so the disk writes back one shard while
        # the next is filled (a flush in line would stall the writer for the whole write-back).
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="dern-fsync")
        self._flushes: list[Future] = []
        self._sources: dict[str, int] = {}
        self._touched: set[int] = set()  # shard fds written since the last commit()
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(s.nbytes for s in specs)
        shards = plan_shards(specs, max_shard_size)
        for fname, shard in zip(shard_names(len(shards)), shards, strict=True):
            head, offsets = build_header([(s.name, s.dtype, s.shape) for s in shard], {"format": "pt"})
            size = len(head) + sum(s.nbytes for s in shard)
            if resume:
                self._fds.append(_reopen(self.directory / fname, head, size))
            else:
                fd = os.open(self.directory / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, size)
            fd = self._fds[-1]
            self._pending_in[fd] = {spec.name for spec in shard}
            for spec, off in zip(shard, offsets, strict=True):
                self._slots[spec.name] = (fd, off)
                self.weight_map[spec.name] = fname
        self.files = shard_names(len(shards))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise AssertionError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        fd, off = self._slots[name]
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
        self._done(name)

    def copy_raw(self, name: str, src: TensorEntry) -> None:
        """Copy a tensor's bytes file to file (in the kernel where it can), never decoding them."""
        spec = self.specs[name]
        if (src.dtype, src.shape) != (spec.dtype, spec.shape):
            raise AssertionError(f"{name}: source {src.dtype} {src.shape} differs from plan {spec.dtype} {spec.shape}")
        fd, off = self._slots[name]
        _copy_range(self._source(src.file), src.start, fd, off, src.nbytes)
        self._done(name)

    def skip(self, name: str) -> None:
        """`name` is already in place (written by the interrupted run this one resumes)."""
        self._mark(name)

    def commit(self, then) -> None:
        """Flush every shard written since the last commit, then call `then()`, on the flush thread (in
        order, without stalling the writer): what `then` records as done is on disk by then.
        The flushed pages also leave the page cache: a whole model's output would otherwise push
        out what is still to be read (the input read ahead, the dump)."""
        touched, self._touched = sorted(self._touched), set()

        def flush_and_record() -> None:
            for fd in touched:
                os.fdatasync(fd)
                _drop_cached(fd)
            then()

        self._flushes.append(self._flusher.submit(flush_and_record))

    def _source(self, path: str) -> int:
        """One descriptor per source shard, kept open (measured: reopening per tensor made cold copies
        run well under the disk's speed)."""
        fd = self._sources.get(path)
        if fd is None:
            fd = self._sources[path] = open_sequential(path)
        return fd

    def _done(self, name: str) -> None:
        """A shard is flushed to disk as soon as its last tensor is in, while later layers are computed."""
        fd = self._slots[name][0]
        self._touched.add(fd)
        if self._mark(name):
            self._flushes.append(self._flusher.submit(os.fsync, fd))

    def _mark(self, name: str) -> bool:
        """Count `name` as in place; True when it was its shard's last one."""
        self._pending.discard(name)
        fd = self._slots[name][0]
        left = self._pending_in.get(fd)
        if left is None:
            return False
        left.discard(name)
        if left:
            return False
        del self._pending_in[fd]
        return True

    def finish(self) -> None:
        """Check every planned tensor was written, flush to disk, write the index if sharded."""
        if self._pending:
            raise AssertionError(f"{len(self._pending)} planned tensors were never written, e.g. {min(self._pending)}")
        for flush in self._flushes:
            flush.result()  # raises the flush's error (a full disk shows here at the latest)
        self.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        self._flusher.shutdown(wait=True)  # no flush may outlive its file descriptor
        for fd in [*self._fds, *self._sources.values()]:
            os.close(fd)
        self._fds, self._sources = [], {}


def _reopen(path: Path, head: bytes, size: int) -> int:
    """An interrupted run's shard, checked to be the one this run plans (same header, same size)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise DernError(f"cannot resume: partial shard {path.name} cannot be opened ({e.strerror}); "
                        "pass --restart to start over") from None
    if os.fstat(fd).st_size != size or os.pread(fd, len(head), 0) != head:
        os.close(fd)
        raise DernError(f"cannot resume: partial shard {path.name} is not laid out as this run plans; "
                        "pass --restart to start over")
    return fd


def _drop_cached(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages only; nothing is lost


# copy_file_range is unsupported here (old kernel, cross-device, some filesystems): copy in user space.
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, count: int) -> None:
    try:
        while count:
            n = os.copy_file_range(src_fd, dst_fd, min(count, 2**30), src_off, dst_off)
            if n == 0:
                raise OSError(errno.EIO, f"source ended {count} bytes early")
            src_off, dst_off, count = src_off + n, dst_off + n, count - n
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise  # a full disk or an I/O error is the user's to see, not a reason to retry
        while count:
            buf = os.pread(src_fd, min(count, _COPY_CHUNK), src_off)
            if not buf:
                raise
            os.pwrite(dst_fd, buf, dst_off)
            src_off, dst_off, count = src_off + len(buf), dst_off + len(buf), count - len(buf)
