"""The pipelined rewrite: three threads in order and bounded, failures surfacing, batched kernels
equal to their one-at-a-time forms, and the shortcut that skips reading experts."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import raw_bytes

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.errors import DernError
from dern_stream.experts.kmeans import batched_spherical_kmeans, spherical_weighted_kmeans
from dern_stream.rewriter.pipeline import run_pipeline


def test_pipeline_keeps_order_and_stays_bounded():
    """Results are written in item order, and the reader is never more than one item ahead of the
    computation (the item being computed plus one read), whatever the stages' speeds."""
    state = {"read": 0, "computed": 0, "max_ahead": 0}
    written: list[int] = []
    lock = threading.Lock()

    def read(i):
        with lock:
            state["read"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["read"] - state["computed"])
        return i

    def compute(i):
        time.sleep(0.002 * (i % 3))
        with lock:
            state["computed"] += 1
        return i * 10

    def write(r):
        time.sleep(0.003 * (r % 2))
        written.append(r)

    run_pipeline(range(20), read, compute, write)
    assert written == [i * 10 for i in range(20)]
    assert state["max_ahead"] <= 2


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_pipeline_failure_on_any_thread_is_raised_here_with_its_type(stage):
    done = []

    def fail_at(name, i):
        if name == stage and i == 3:
            raise DernError(f"{name} failed at 3")
        return i

    with pytest.raises(DernError, match=f"{stage} failed at 3"):
        run_pipeline(range(10), lambda i: fail_at("read", i), lambda i: fail_at("compute", i),
                     lambda i: done.append(fail_at("write", i)))
    assert done == list(range(len(done))) and len(done) <= 3  # in order, nothing from item 3 on
    if stage == "compute":
        assert done == [0, 1, 2]  # what was computed before the failure is still written
    assert not [t for t in threading.enumerate() if t.name.startswith("dern-")]  # no thread left behind


def test_batched_kmeans_equals_each_expert_alone():
    """Padding and the per-expert stopping rule make a batch exactly as good as separate runs."""
    gen = torch.Generator().manual_seed(3)
    d, k = 6, 5
    sizes = [9, 14, 5]  # the last one has as many members as centroids: all singletons
    members = torch.zeros(len(sizes), max(sizes), 3 * d)
    weights = torch.zeros(len(sizes), max(sizes))
    init = torch.empty(len(sizes), k, dtype=torch.long)
    cols = torch.arange(d, 3 * d)
    alone = []
    for j, m in enumerate(sizes):
        members[j, :m] = torch.randn(m, 3 * d, generator=gen)
        weights[j, :m] = torch.rand(m, generator=gen)
        init[j] = torch.randperm(m, generator=gen)[:k]
        alone.append(spherical_weighted_kmeans(members[j, :m], weights[j, :m], cols, k, 20, init[j]))
    batched = batched_spherical_kmeans(members, weights, torch.tensor(sizes), cols, k, 20, init)
    for one, many in zip(alone, batched, strict=True):
        assert torch.equal(one.assignment, many.assignment)
        assert one.iterations == many.iterations
        torch.testing.assert_close(one.segments, many.segments, rtol=1e-6, atol=1e-6)
    assert torch.equal(batched[2].segments[batched[2].assignment], members[2, :5])  # singletons exact


def test_alpha_one_skips_the_expert_reads_and_equals_pruning(build, tmp_path):
    """With alpha = 1 nothing can move, so the rewrite reads no expert weights at all; its output
    must still be byte-identical to --method prune, and to a run where reading is forced."""
    built = build("mixtral")
    common = dict(experts=4, calib=built.calib, recipe="paper", progress=False)  # the paper's DERN: no refit
    dern_stream.rewrite(built.model_dir, tmp_path / "a1", alpha=1.0, **common)
    dern_stream.rewrite(built.model_dir, tmp_path / "prune", method="prune", **common)
    # a candidate list forces the expert reads (and the layer-output evaluation); alpha 1 is its only choice
    dern_stream.rewrite(built.model_dir, tmp_path / "read", alpha_candidates="1", **common)
    a1, prune, read = (raw_bytes(tmp_path / n) for n in ("a1", "prune", "read"))
    assert a1 == prune == read


def test_truncated_shard_is_a_clean_error(build, tmp_path):
    built = build("mixtral")
    ckpt = Checkpoint(built.model_dir)
    name = max(ckpt.entries, key=lambda n: ckpt.entries[n].end)
    entry = ckpt.entries[name]
    with open(entry.file, "rb") as f:
        data = f.read()
    copy = tmp_path / "ck"
    copy.mkdir()
    for f in built.model_dir.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    truncated = Checkpoint(copy)
    path = truncated.entries[name].file
    with open(path, "r+b") as f:
        f.truncate(len(data) - 10)  # after the header was read: the tensor now ends past the file
    with pytest.raises(DernError, match="truncated"):
        truncated.load(name)
