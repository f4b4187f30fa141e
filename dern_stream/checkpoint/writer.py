"""Sharded safetensors output written in place.

Every output tensor's name, dtype and shape is known before any layer is computed (the
rewrite only changes counts), so the shards and their headers are laid out first and each
tensor is then written at its offset the moment it exists. Nothing waits in a shard-sized
buffer: host memory stays at one layer, whatever --max-shard-size is.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DernError, NonFinite, arg, writing
from ..runtime.durable_files import write_durably
from .descriptors import DescriptorCache, descriptor_budget
from .integrity import all_finite, bytes_finite, checksum, new_hasher
from .safetensors_format import DTYPE_NAMES, TensorEntry, TensorSpec, build_header
from .source import INDEX_NAME, SINGLE_NAME, data_extents, open_sequential, pread_fully

_COPY_CHUNK = 16 * 2**20  # bytes per read/write of a copied tensor (one reused buffer)


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


@dataclass(frozen=True)
class ShardLayout:
    """One output shard as laid out before anything is written: its header bytes, its size, and the
    absolute byte offset of each of its tensors (in order)."""

    file: str
    header: bytes
    size: int
    offsets: dict[str, int]


def layout_shards(specs: list[TensorSpec], max_shard_size: int) -> list[ShardLayout]:
    """The output shards for `specs`, split greedily in order (plan_shards), with their headers."""
    shards = plan_shards(specs, max_shard_size)
    layouts = []
    for fname, shard in zip(shard_names(len(shards)), shards, strict=True):
        head, offsets = build_header([(s.name, s.dtype, s.shape) for s in shard], {"format": "pt"})
        layouts.append(ShardLayout(fname, head, len(head) + sum(s.nbytes for s in shard),
                                   {s.name: off for s, off in zip(shard, offsets, strict=True)}))
    return layouts


class NonFiniteTensor(NonFinite):
    """A tensor about to be written holds NaN or Inf: computed (write) or copied from the input (copy_raw)."""

    def __init__(self, message: str, copied: bool):
        super().__init__(message)
        self.copied = copied

    def __reduce__(self):  # raised in a worker process, re-raised in the driver
        return NonFiniteTensor, (str(self), self.copied)


class ShardedWriter:
    """Pre-sized shard files in `directory`; write() / copy_raw() fill each tensor's slot once.

    Every byte written passes through here once: its checksum is taken (`take_checksums`) and float
    tensors are checked to be finite, so nothing with NaN or Inf is ever reported as written. A bounded
    number of shard files is open at a time, those waiting for their flush included (a small
    --max-shard-size on a large model makes thousands of shards): the least recently written is
    flushed and closed to make room. Source shards are read through a bounded DescriptorCache."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_size: int, resume: bool = False):
        """With `resume`, the shards must already exist exactly as planned (an interrupted run's): they
        are reopened as they are, and `skip()` marks the tensors they already hold."""
        self.directory = Path(directory)
        self.specs = {s.name: s for s in specs}
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (shard number, absolute offset)
        self._pending = set(self.specs)
        self._pending_in: dict[int, set[str]] = {}  # per shard: tensors not yet written
        self._open: OrderedDict[int, int] = OrderedDict()  # shard number -> fd, least recently used first
        # Finished shards are flushed on a thread of their own, so the disk writes back one shard while
        # the next is filled (a flush in line would stall the writer for the whole write-back).
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="dern-fsync")
        self._flushes: list[Future] = []
        self._flush_error: OSError | None = None  # the first flush that failed: nothing is recorded after it
        self._sources = DescriptorCache(open_sequential, descriptor_budget(1 / 6))
        self._max_open = descriptor_budget(1 / 3)  # output shards open or waiting to be flushed and closed
        self._closing: deque[Future] = deque()
        self._touched: set[int] = set()  # shards written since the last commit()
        self._checksums: dict[str, str] = {}  # since the last take_checksums()
        self._buffer: memoryview | None = None
        self._zeros: memoryview | None = None  # what a hole in the source holds
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(s.nbytes for s in specs)
        shards = layout_shards(specs, max_shard_size)
        self.files = [shard.file for shard in shards]
        self.header_checksums: dict[str, str] = {}
        for number, shard in enumerate(shards):
            self.header_checksums[shard.file] = checksum(shard.header)
            if resume:
                _check_partial(self.directory / shard.file, shard.header, shard.size)
            else:
                _create(self.directory / shard.file, shard.header, shard.size)
            self._pending_in[number] = set(shard.offsets)
            for name, off in shard.offsets.items():
                self._slots[name] = (number, off)
                self.weight_map[name] = shard.file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if DTYPE_NAMES.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise AssertionError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}")
        tensor = tensor.detach().to("cpu").contiguous()
        if not all_finite(tensor):
            raise NonFiniteTensor(f"tensor {name} came out with NaN or Inf values", copied=False)
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        self._checksums[name] = checksum(view)
        self._pwrite(name, view, self._slots[name][1])
        self._done(name)

    def copy_raw(self, name: str, src: TensorEntry) -> None:
        """Copy a tensor's bytes file to file, never decoding them, through one reused buffer (where
        their checksum is taken and their values checked to be finite)."""
        spec = self.specs[name]
        if (src.dtype, src.shape) != (spec.dtype, spec.shape):
            raise AssertionError(f"{name}: source {src.dtype} {src.shape} differs from plan {spec.dtype} {spec.shape}")
        if self._buffer is None:
            self._buffer = memoryview(bytearray(_COPY_CHUNK))
        hasher, offset = new_hasher(), self._slots[name][1]
        for start in range(0, src.nbytes, _COPY_CHUNK):
            view = self._buffer[:min(_COPY_CHUNK, src.nbytes - start)]
            with self._sources.use(src.file) as source:
                extents = data_extents(source, src.start + start, len(view))
                if not extents:  # a hole: zeros, not read
                    view = self._zero_view(len(view))
                else:
                    pread_fully(source, view, src.start + start, src.file, f"tensor {name!r}")
            if extents and not bytes_finite(view, src.dtype):
                raise NonFiniteTensor(f"tensor {name} holds NaN or Inf values in the input "
                                      f"({os.path.basename(src.file)}); the input weights are not finite", copied=True)
            hasher.update(view)
            if extents == [(src.start + start, src.start + start + len(view))]:
                self._pwrite(name, view, offset + start)
                continue
            # Part of the source is a hole: its zeros are written only where the output already holds data (a new
            # shard is a hole), so a sparse input costs no disk in the output either.
            shift = offset - src.start
            fd = self._shard(self._slots[name][0])
            for a, b in _merged([(a + shift, b + shift) for a, b in extents]
                                + data_extents(fd, offset + start, len(view))):
                self._pwrite(name, view[a - offset - start:b - offset - start], a)
        self._checksums[name] = hasher.hexdigest()
        self._done(name)

    def _zero_view(self, size: int) -> memoryview:
        if self._zeros is None:
            self._zeros = memoryview(bytes(_COPY_CHUNK))
        return self._zeros[:size]

    def skip(self, name: str) -> None:
        """`name` is already in place (written by the interrupted run this one resumes)."""
        self._mark(name)

    def take_checksums(self) -> dict[str, str]:
        """Checksums of the tensors written since the last call, by name."""
        taken, self._checksums = self._checksums, {}
        return taken

    def commit(self, then) -> None:
        """Flush every shard written since the last commit, then call `then()`, on the flush thread (in
        order, without stalling the writer): what `then` records as done is on disk by then.
        The flushed pages also leave the page cache: a whole model's output would otherwise push
        out what is still to be read (the input read ahead, the dump). Shards closed since the last
        commit were flushed when they were closed, earlier on the same thread."""
        if self._flush_error is not None:
            raise self._flush_error
        touched = [(n, self._open[n]) for n in sorted(self._touched) if n in self._open]
        self._touched = set()

        def flush_and_record() -> None:
            for number, fd in touched:
                self._flush(number, fd, os.fdatasync)
            if self._flush_error is None:
                then()

        self._flushes.append(self._flusher.submit(flush_and_record))

    def _pwrite(self, name: str, view: memoryview, offset: int) -> None:
        number = self._slots[name][0]
        fd = self._shard(number)
        with writing(self.directory / self.files[number]):
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        self._touched.add(number)

    def _shard(self, number: int) -> int:
        """The shard's descriptor, opened (and another closed) if need be."""
        fd = self._open.get(number)
        if fd is not None:
            self._open.move_to_end(number)
            return fd
        while self._closing and self._closing[0].done():
            self._closing.popleft().result()  # (a flush error shows here, at the latest)
        if len(self._open) + len(self._closing) >= self._max_open and self._open:
            self._close(*self._open.popitem(last=False))
        while len(self._open) + len(self._closing) >= self._max_open:
            self._closing.popleft().result()  # wait for a closing shard's flush: its descriptor is then free
        with writing(self.directory / self.files[number]):
            fd = self._open[number] = os.open(self.directory / self.files[number], os.O_RDWR)
        return fd

    def _close(self, number: int, fd: int) -> None:
        """Flush and close a shard on the flush thread, after every flush queued before it."""
        self._touched.discard(number)

        def flush_and_close() -> None:
            try:
                self._flush(number, fd, os.fsync)
            finally:
                os.close(fd)

        closed = self._flusher.submit(flush_and_close)
        self._flushes.append(closed)
        self._closing.append(closed)

    def _flush(self, number: int, fd: int, sync) -> None:
        """On the flush thread. After a failure no later journal entry is written: a layer whose bytes
        may not be on disk must never be recorded as done."""
        try:
            sync(fd)
        except OSError as e:
            error = OSError(e.errno, e.strerror, str(self.directory / self.files[number]))
            self._flush_error = self._flush_error or error
            raise error from None
        _drop_cached(fd)

    def _done(self, name: str) -> None:
        """A shard is flushed to disk and closed as soon as its last tensor is in, while later layers
        are computed."""
        number = self._slots[name][0]
        if self._mark(name) and number in self._open:
            self._close(number, self._open.pop(number))

    def _mark(self, name: str) -> bool:
        """Count `name` as in place; True when it was its shard's last one."""
        self._pending.discard(name)
        number = self._slots[name][0]
        left = self._pending_in.get(number)
        if left is None:
            return False
        left.discard(name)
        if left:
            return False
        del self._pending_in[number]
        return True

    def finish(self) -> None:
        """Check every planned tensor was written, flush to disk, write the index if sharded."""
        if self._pending:
            raise DernError(f"internal error: {len(self._pending)} planned output tensors were never written, "
                            f"e.g. {min(self._pending)}; the output is incomplete and was not finished")
        self.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            write_durably(self.directory / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close every file; raises the first flush error (a full disk shows here at the latest)."""
        while self._open:
            self._close(*self._open.popitem(last=False))
        self._flusher.shutdown(wait=True)  # no flush may outlive its file descriptor
        self._sources.close()
        self._closing.clear()
        flushes, self._flushes = self._flushes, []
        for flush in flushes:
            flush.result()


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching (start, end) ranges joined, in order."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _create(path: Path, head: bytes, size: int) -> None:
    """A shard with its header written and its data area reserved (sparse until written)."""
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


def _check_partial(path: Path, head: bytes, size: int) -> None:
    """An interrupted run's shard, checked to be the one this run plans (same header, same size)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise DernError(f"cannot resume: partial shard {path.name} cannot be opened ({e.strerror}); "
                        f"pass {arg('restart', True)} to start over") from None
    try:
        if os.fstat(fd).st_size != size or os.pread(fd, len(head), 0) != head:
            raise DernError(f"cannot resume: partial shard {path.name} is not laid out as this run plans; "
                            f"pass {arg('restart', True)} to start over")
    finally:
        os.close(fd)


def _drop_cached(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages only; nothing is lost
