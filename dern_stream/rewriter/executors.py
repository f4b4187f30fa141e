"""Executors that run a plan's layers in parallel: local worker processes, or tasks on a Ray cluster.

Each layer runs whole in one worker (layer_task.run_layer), which writes its tensors into the shards the
driver laid out; the driver yields (layer, record, stage seconds) as layers finish, and journals them.
A worker that dies (killed, out of memory) loses only its layer, which is run again, up to RETRIES times.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from ..errors import DernError
from ..runtime.optional_packages import require_ray
from ..runtime.worker_processes import spawn_pool, stop_pool
from .layer_task import run_layer, run_pickled
from .plan import RewritePlan

log = logging.getLogger("dern_stream")

RETRIES = 2  # runs of a layer after its first, when the worker running it dies

Finished = tuple[int, dict, dict[str, float]]


def run_local(plan: RewritePlan, staged: Path, layers: list[int], workers: int) -> Iterator[Finished]:
    """`workers` processes on this machine, each running one layer at a time (on CUDA with several GPUs
    and no index given, worker n on GPU n), each computing with the plan's threads."""
    threads = plan.threads  # (by default the cores shared out among the workers: plan.py)
    if plan.device.type == "cpu":
        log.warning("note: %d workers on the CPU, each computing with %d thread(s) (--threads)", workers, threads)
    gpus = torch.cuda.device_count() if plan.device.type == "cuda" and plan.device.index is None else 0
    blob = pickle.dumps(plan)
    attempts = dict.fromkeys(layers, 0)
    left = list(layers)  # in order; a layer leaves the list when its record is in
    while left:
        pool = spawn_pool(workers, gpus)
        running: dict = {}
        try:
            yield from _run_in_pool(pool, blob, staged, left, workers, running, threads)
            pool.shutdown()
        except BrokenProcessPool:
            stop_pool(pool)
            for index in running.values():
                attempts[index] += 1
                if attempts[index] > RETRIES:
                    raise DernError(f"the worker process running layer {index} died {attempts[index]} times "
                                    "(killed, or out of memory?); finished layers are kept") from None
            log.warning("note: a worker process died; running layers %s again", sorted(running.values()))
        except BaseException:
            stop_pool(pool)  # a layer failed for good (bad input, non-finite values) or Ctrl-C: no waiting
            raise


def _run_in_pool(pool, blob: bytes, staged: Path, left: list[int], workers: int, running: dict,
                 threads: int) -> Iterator[Finished]:
    """The layers `left` on `pool`, yielded as they finish and then taken off `left`. `running` (future -> layer)
    holds the layers handed over and not yet finished, for the caller to charge a retry when the pool breaks."""
    waiting = iter(list(left))
    # At most one layer per worker is handed over at a time, so when a worker dies the layers then
    # running are all the pool had: only they are charged a retry.
    running.update({pool.submit(run_pickled, blob, staged, i, threads): i for i in itertools.islice(waiting, workers)})
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            record, seconds = future.result()
            index = running.pop(future)
            # Handed over (and journaled) before the next submit: a submit to a pool broken meanwhile
            # raises, and a layer taken off `left` but never handed over would be lost.
            yield index, record, seconds
            left.remove(index)
            for i in itertools.islice(waiting, 1):
                running[pool.submit(run_pickled, blob, staged, i, threads)] = i


def run_ray(plan: RewritePlan, staged: Path, layers: list[int], address: str) -> Iterator[Finished]:
    """One Ray task per layer (with a GPU each when the plan computes on CUDA). Every node must see the
    checkpoint, the dump and the output at the same paths (a shared filesystem)."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DernError(f"cannot join the Ray cluster at {address!r}: {_one_line(e)}") from None
    gpus = 1 if plan.device.type == "cuda" else 0
    if gpus:  # Ray shows each task its one GPU as device 0
        plan = dataclasses.replace(plan, device=torch.device("cuda"))
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False)(run_layer)
    shared = ray.put(plan)
    running = {task.remote(shared, staged, i): i for i in layers}
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                index = running.pop(ref)
                yield index, *_task_result(ray, ref, index)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _task_result(ray, ref, index: int) -> tuple[dict, dict[str, float]]:
    """A finished task's (record, seconds), or its failure as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task raised: its own error, one line
        cause = getattr(e, "cause", None)
        if isinstance(cause, DernError):
            raise cause from None
        raise DernError(f"layer {index} failed on the Ray cluster: {_one_line(cause or e)}") from None
    except ray.exceptions.RayError as e:  # a worker or node lost for good, out of memory...
        raise DernError(f"layer {index} could not be run on the Ray cluster ({type(e).__name__}, after "
                        f"{RETRIES} retries): {_one_line(e)}; finished layers are kept") from None


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
