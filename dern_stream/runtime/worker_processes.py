"""Local worker process pools, shared by the rewrite's and the dump's workers.

A worker ends with its driver: killed outright (`kill -9`), a driver cannot stop its workers, so each worker asks
the kernel to end it when its parent goes (Linux), or watches for that itself (elsewhere)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # prctl(2)
_progress = None  # in a worker: the driver's progress queue, if it gave one


def spawn_pool(workers: int, gpus: int = 0, progress=None) -> ProcessPoolExecutor:
    """`workers` spawned processes (not forked: the driver runs threads, which fork does not carry
    safely); with `gpus`, worker n makes GPU n % gpus its current CUDA device. `progress`: a queue of the
    spawn context the workers report to (report_progress), handed over as the processes start."""
    context = _context()
    counter = context.Value("i", 0)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(counter, gpus, progress))


def _context():
    """Workers forked from a server process that imported torch and the layer's code once (Linux and macOS), so
    each starts in a fraction of a second; spawned where there is no fork."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "dern_stream.rewriter.layer_task", "dern_stream.calib.dump_workers"])
    return context


def progress_queue():
    """A queue the workers of spawn_pool(..., progress=it) report to: no server process of its own."""
    return _context().Queue()


def report_progress(item) -> None:
    """In a worker: tell the driver (a layer done, say), when it asked to be told."""
    if _progress is not None:
        _progress.put(item)


def _start_worker(counter, gpus: int, progress) -> None:
    global _progress
    _progress = progress
    _release_server_pipe()
    _end_with(os.getppid())
    with counter.get_lock():
        number = counter.value
        counter.value += 1
    if gpus:
        import torch

        torch.cuda.set_device(number % gpus)


def _release_server_pipe() -> None:
    """A worker forked from the server inherits the write end of the pipe whose EOF tells the server that its driver
    is gone (multiprocessing keeps it so that a worker may start processes of its own, which ours never do). Held
    by the workers, it would keep the server, and so the workers (their parent), alive after the driver dies."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def _end_with(parent: int) -> None:
    """End this process when its parent does: the driver, or the server it forks workers from, which ends with
    the driver."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        else:
            if os.getppid() != parent:  # (it went before the request was made)
                os._exit(1)
            return
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="dern-driver-watch").start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the running workers now (their work is not recorded as done,
    and a rerun does it again): a failure, or Ctrl-C, must not wait for them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
