"""Executors that run a plan's layers in parallel: local worker processes, or tasks on a Ray cluster.

Each layer runs whole in one worker (layer_task.run_layer), which writes its tensors into the shards the
driver laid out; the driver yields (layer, record, stage seconds) as layers finish, and journals them.
A worker that dies (killed, out of memory) loses only its layer, which is run again, up to RETRIES times.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from .errors import DernError
from .layer_task import run_layer
from .optional import require_ray
from .rewrite_plan import RewritePlan

log = logging.getLogger("dern_stream")

RETRIES = 2  # runs of a layer after its first, when the worker running it dies

Finished = tuple[int, dict, dict[str, float]]


def run_local(plan: RewritePlan, staged: Path, layers: list[int], workers: int) -> Iterator[Finished]:
    """`workers` processes on this machine, each running one layer at a time. Each uses the driver's torch
    thread count, so its layer is computed exactly as one process computes it (CPU kernels may sum in
    another order with another count); on CPU the workers then share the cores."""
    threads = plan.threads
    if plan.device.type == "cpu":
        log.warning("note: %d workers on the CPU share its cores, each with the %d threads one process would use "
                    "(so the output is the same bytes); to share the cores out, set OMP_NUM_THREADS to cores / "
                    "workers (the output is then that of one process with as many threads)", workers, threads)
    attempts = dict.fromkeys(layers, 0)
    left = list(layers)  # in order; a layer leaves the list when its record is in
    while left:
        # spawn, not fork: the driver runs threads (the writer's flusher), which fork does not carry safely.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            waiting = iter(list(left))
            # At most one layer per worker is handed over at a time, so a dead worker's pool can name the
            # layers that were running (all it had): only they are charged a retry.
            running = {pool.submit(run_layer, plan, staged, i): i for i in itertools.islice(waiting, workers)}
            try:
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        index = running.pop(future)
                        record, seconds = future.result()
                        left.remove(index)
                        for i in itertools.islice(waiting, 1):
                            running[pool.submit(run_layer, plan, staged, i)] = i
                        yield index, record, seconds
            except BrokenProcessPool:
                for index in running.values():
                    attempts[index] += 1
                    if attempts[index] > RETRIES:
                        raise DernError(f"the worker process running layer {index} died {attempts[index]} times "
                                        "(killed, or out of memory?); finished layers are kept") from None
                log.warning("note: a worker process died; running layers %s again", sorted(running.values()))
            except BaseException:
                _stop(pool)  # a layer failed for good (bad input, non-finite values) or Ctrl-C: no waiting
                raise


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now: their layers are not journaled, and a resumed
    run writes them again."""
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way to stop a running task
        process.terminate()


def run_ray(plan: RewritePlan, staged: Path, layers: list[int], address: str) -> Iterator[Finished]:
    """One Ray task per layer (with a GPU each when the plan computes on CUDA). Every node must see the
    checkpoint, the dump and the output at the same paths (a shared filesystem)."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DernError(f"cannot join the Ray cluster at {address!r}: {first}") from None
    gpus = 1 if plan.device.type == "cuda" else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False)(run_layer)
    shared = ray.put(plan)
    running = {task.remote(shared, staged, i): i for i in layers}
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            index = running.pop(ref)
            try:
                record, seconds = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                for other in running:
                    ray.cancel(other, force=True)
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else DernError(str(e).splitlines()[-1])) from None
            except ray.exceptions.WorkerCrashedError:
                raise DernError(f"the Ray worker running layer {index} died {RETRIES + 1} times "
                                "(killed, or out of memory?); finished layers are kept") from None
            yield index, record, seconds
