"""Local worker process pools, shared by the rewrite's and the dump's workers."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch


def spawn_pool(workers: int, gpus: int = 0) -> ProcessPoolExecutor:
    """`workers` spawned processes (not forked: the driver runs threads, which fork does not carry
    safely); with `gpus`, worker n makes GPU n % gpus its current CUDA device."""
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_number_worker, initargs=(counter, gpus))


def _number_worker(counter, gpus: int) -> None:
    with counter.get_lock():
        number = counter.value
        counter.value += 1
    if gpus:
        torch.cuda.set_device(number % gpus)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the running workers now (their work is not recorded as done,
    and a rerun does it again): a failure, or Ctrl-C, must not wait for them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
