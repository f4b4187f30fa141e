"""A calibration dump split across worker processes: each streams the model layer by layer over its own
share of the sequences and writes its rows of every MoE layer's array, regions no other worker touches.

The shares are whole batches (so every batch holds the same sequences as in a single-process dump, and
the forward computes the same values) and whole zarr chunks (so no chunk file is written by two
workers). The driver creates the arrays at full size first and marks the layers complete once every
worker is done: an interrupted run leaves no layer that looks finished.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import DernError
from ..runtime.device import resolve_device
from ..runtime.worker_processes import progress_queue, report_progress, spawn_pool, stop_pool
from ..stream import HiddenStore, StreamedModel
from ..stream.executor import batched, parse_dtype
from . import CalibWriter


def split_sequences(sequences: int, seq_len: int, batch_size: int, chunk_tokens: int,
                    workers: int) -> list[tuple[int, int]]:
    """[start, end) sequence ranges, one per worker (fewer when there is not enough work), each a whole
    number of batches and starting on a chunk boundary."""
    unit = math.lcm(batch_size, chunk_tokens // math.gcd(chunk_tokens, seq_len))
    units = -(-sequences // unit)
    parts, start = [], 0
    for w in range(workers):
        end = min(sequences, start + (units // workers + (w < units % workers)) * unit)
        if end > start:
            parts.append((start, end))
        start = end
    return parts


def dump_in_workers(src: Path, out: Path, ids: torch.Tensor, parts: list[tuple[int, int]], moe_layers: list[int],
                    batch_size: int, device: torch.device, dtype: str, on_layer: Callable[[], None]) -> None:
    """Fill the arrays the driver created in `out` (CalibWriter.create_layer) with one process per part of
    `split_sequences`. `on_layer` is called each time a worker finishes a decoder layer (a progress bar)."""
    # The driver's threads shared out among the workers: the forward's values do not depend on the thread count
    # (tests/rewriter/test_executors.py compares the dump with a single process's), so no worker needs them all.
    threads = max(1, torch.get_num_threads() // len(parts))
    gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    done = progress_queue()  # a plain queue the workers inherit: no server process that could die under it
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            try:
                done.get(timeout=0.1)
            except queue.Empty:
                continue
            except (OSError, EOFError, ValueError):  # the queue is gone: the driver is stopping anyway
                return
            on_layer()

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    pool = spawn_pool(len(parts), gpus if gpus >= len(parts) else 0, progress=done)  # a GPU each, as the rewrite's
    # The token ids as numpy: torch would share a tensor through file descriptors (see layer_task.run_pickled).
    futures = [pool.submit(dump_part, src, out, ids[a:b].numpy(), a * ids.shape[1], moe_layers, batch_size,
                           str(device), dtype, threads) for a, b in parts]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.result()
        pool.shutdown()
    except BrokenProcessPool:
        stop_pool(pool)
        raise DernError("a dump worker process died (killed, or out of memory?)") from None
    except BaseException:
        stop_pool(pool)  # one worker failed, or Ctrl-C: the others are not waited for
        raise
    finally:
        stop.set()
        counter.join()
        done.close()


def dump_part(src: Path, out: Path, ids: np.ndarray, first_row: int, moe_layers: list[int], batch_size: int,
              device: str, dtype: str, threads: int) -> None:
    """In a worker: the sequences `ids` through every decoder layer up to the last MoE layer, their MoE
    inputs written from row `first_row` on."""
    torch.set_num_threads(threads)
    writer = CalibWriter.attach(out)
    batches = batched(torch.from_numpy(ids), batch_size)
    with Checkpoint(src) as ckpt:
        model = StreamedModel(ckpt, resolve_device(device), parse_dtype(dtype))
        hidden = int(ckpt.config["hidden_size"])
        with HiddenStore([(*b.shape, hidden) for b in batches], model.dtype, model.device,
                         scratch_dir=out.parent) as store:
            model.embed(batches, store)
            for i in range(moe_layers[-1] + 1):
                if i in moe_layers:
                    row = [first_row]

                    def write(_batch: int, x: torch.Tensor, i: int = i, row: list = row) -> None:
                        writer.write_rows(i, row[0], x)
                        row[0] += x.numel() // hidden

                    model.run_layer(i, batches, store, write)
                else:
                    model.run_layer(i, batches, store)
                report_progress(i)
