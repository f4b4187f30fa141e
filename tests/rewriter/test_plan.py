"""`dern-stream plan`: what a rewrite will do, decided from headers, config, routers and the dump alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main
from dern_stream.errors import DernError
from dern_stream.options import option_fields
from dern_stream.rewriter import estimates
from dern_stream.runtime.arguments import format_size
from dern_stream.runtime.device import memory_size
from dern_stream.synthetic import write_sparse, write_synthetic, write_synthetic_dump


def _read_bytes() -> int:
    """Bytes this process has read through read/pread so far (/proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_the_rewrite_does_what_the_plan_says(family, build, tmp_path):
    """Kept experts, every tensor's shard and byte offset, shard sizes and the run key: as planned."""
    built = build(family)
    plan_file = tmp_path / "plan.json"
    dern_stream.plan(built.model_dir, experts=4, calib=built.calib, json_path=plan_file, progress=False)
    record = json.loads(plan_file.read_text())
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())

    assert record["run_key"] == audit["reproduce"]["resume_key"]
    assert {i: layer["kept"] for i, layer in record["layers"].items()} == \
        {i: layer["kept"] for i, layer in audit["layers"].items()}
    for i, layer in record["layers"].items():
        done = audit["layers"][i]
        assert layer["importance"] == done["importance"]
        assert layer["ranking"] == done["importance_source"]
        assert layer["calibration_tokens"] == done["calibration_tokens"]
        assert {source for source, _, _ in done["transfers"]} <= set(layer["dropped"])  # only dropped experts move
    written = Checkpoint(out)
    planned = {name: (shard["file"], start, end) for shard in record["shards"]
               for name, (start, end) in shard["tensors"].items()}
    assert set(planned) == set(written.entries)
    for name, entry in written.entries.items():
        assert planned[name] == (Path(entry.file).name, entry.start, entry.start + entry.nbytes), name
    for shard in record["shards"]:
        assert (out / shard["file"]).stat().st_size == shard["size"]
    assert record["output_bytes"] == sum(shard["size"] for shard in record["shards"])
    assert record["config"] == json.loads((out / "config.json").read_text())


def test_plan_of_a_600_gb_checkpoint_reads_headers_and_routers_only(tmp_path):
    """A 600 GB checkpoint of sparse files (headers and holes): the plan reads a few MB of it."""
    layers, hidden, inter, experts = 62, 4096, 3072, 128
    src = write_sparse(tmp_path / "big", layers=layers, hidden=hidden, intermediate=inter, experts=experts)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert size > 600e9
    before = _read_bytes()
    plan = dern_stream.plan(src, experts=64, device="cpu", progress=False)  # the experts in host memory
    read = _read_bytes() - before
    routers = layers * experts * hidden * 2
    assert read < routers + 50e6, read  # the routers, the headers, config.json: nothing of the experts

    assert len(plan.layers) == layers and all(len(s.kept) == 64 for s in plan.selection.values())
    expert_bytes = 3 * inter * hidden * 2
    dropped = layers * 64 * (expert_bytes + hidden * 2)  # 64 experts and their router rows per layer
    assert plan.output_bytes - sum(len(s.header) for s in plan.shards) == size - sum(
        _header_size(f) for f in src.glob("*.safetensors")) - dropped
    # one layer's experts (9.7 GB), the two layers' results being computed and written (4.8 GB each)
    est = plan.estimates
    assert 128 * expert_bytes + 2 * 64 * expert_bytes < est.host_peak < 128 * expert_bytes + 2 * 64 * expert_bytes + 1e9
    assert est.device_peak is None and est.per_layer.reassign > 0 and est.per_layer.cluster > 0


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.slow  # (the default run's time: README, set-up)
def test_estimated_peak_bounds_a_measured_rewrite(tmp_path):
    """The plan's host-memory estimate against the kernel's peak (VmHWM) of a real rewrite process."""
    src = write_synthetic(tmp_path / "ck", layers=3, hidden=512, intermediate=1024, experts=16, upcycled=0.3,
                          vocab=2048)
    dump = write_synthetic_dump(src, tmp_path / "calib.zarr", tokens=1024)
    code = ("import dern_stream, sys, json;"
            f"dern_stream.rewrite({str(src)!r}, {str(tmp_path / 'out')!r}, experts=8, calib={str(dump)!r},"
            " kmeans_iters=2, progress=False);"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured = int(run.stdout.split()[-1]) * 1024
    est = dern_stream.plan(src, experts=8, calib=dump, kmeans_iters=2, progress=False).estimates.host_peak
    layer = 16 * 3 * 1024 * 512 * 2
    assert measured <= est <= measured + 4 * layer, (measured, est)


def test_plan_command_without_a_dump_ranks_by_router_norm(build, tmp_path):
    built = build("mixtral")
    result = CliRunner().invoke(main, ["plan", str(built.model_dir), "--experts", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert "layers that change: 3 of 3" in result.output and "ranked by router norm" in result.output
    assert "free disk needed" in result.output and "peak host memory" in result.output
    assert not any(p.name.startswith(".") for p in built.model_dir.parent.iterdir())


def test_plan_json_never_replaces_a_file_it_did_not_write(build, tmp_path):
    built = build("mixtral")
    theirs = tmp_path / "notes.json"
    theirs.write_text('{"mine": true}')
    result = CliRunner().invoke(main, ["plan", str(built.model_dir), "-k", "4", "-q", "--json", str(theirs),
                                       "--overwrite"])
    assert_clean_failure(result, tmp_path / "absent", "is not a report that dern-stream plan wrote")
    assert theirs.read_text() == '{"mine": true}'
    ours = tmp_path / "plan.json"
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(main, ["plan", str(built.model_dir), "-k", "2", "-q", "--json", str(ours), *extra])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["plan", str(built.model_dir), "-k", "2", "-q", "--json", str(ours)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr


def test_every_rewrite_option_is_a_command_line_option_with_its_help_choices_and_default():
    """rewrite and plan build their options from RewriteOptions' fields: each field is an option of both, its help,
    choices and default shown as the field describes them."""
    runner = CliRunner()
    for name in ("rewrite", "plan"):
        command = main.commands[name]
        params = {param.name: param for param in command.params}
        text = " ".join(runner.invoke(main, [name, "--help"], terminal_width=400).output.split())
        for spec in option_fields():
            param, flag = params[spec.name], "--" + spec.name.replace("_", "-")
            assert flag in param.opts, (name, spec.name)
            assert " ".join(spec.metadata["help"].split()) in text, (name, spec.name)
            if spec.metadata["choices"]:
                assert tuple(param.type.choices) == spec.metadata["choices"], (name, spec.name)
            if spec.metadata["flag"]:
                assert param.secondary_opts == ["--no-" + flag[2:]], (name, spec.name)
            shown = spec.metadata["shown"]
            assert shown is None or f"[default: {shown}]" in text, (name, spec.name)


def test_an_unknown_api_option_is_one_line(build, tmp_path):
    with pytest.raises(DernError, match="unknown rewrite option 'alhpa'"):
        dern_stream.rewrite(build("mixtral").model_dir, tmp_path / "out", experts=4, alhpa=0.5)
    assert not (tmp_path / "out").exists()


def test_a_plan_whose_estimated_peak_exceeds_the_memory_here_says_so_and_what_lowers_it(tmp_path, monkeypatch):
    """The machine's memory is the one thing set here (a test machine has plenty); the estimates are the plan's own.
    The largest group of experts the gradient refit can move together within that memory is named."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 2**30 < memory_size(torch.device("cpu")) <= ram  # the RAM, or a container's limit below it
    src = write_synthetic(tmp_path / "ck", layers=2, hidden=512, intermediate=1024, experts=16, vocab=2048)
    dump = write_synthetic_dump(src, tmp_path / "calib.zarr", tokens=1024)

    def peak(**options) -> int:
        return dern_stream.plan(src, experts=8, calib=dump, recipe="best", device="cpu", progress=False,
                                **options).estimates.host_peak

    whole, by_four, by_two = peak(), peak(refit_group=4), peak(refit_group=2)
    assert whole > by_four > by_two  # the Adam state of fewer experts at a time
    args = ["plan", str(src), "-k", "8", "--calib", str(dump), "--recipe", "best", "--device", "cpu", "-q"]
    for total, shown in ((whole, None), (whole - 1, 4), (by_four, 4), (by_four - 1, 2)):
        monkeypatch.setattr(estimates, "memory_size", lambda device, total=total: total)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        if shown is None:
            assert "may stop out of memory" not in result.output
            continue
        assert (f"note: the estimated peak of {format_size(whole)} exceeds the {format_size(total)} of host memory: "
                f"the run may stop out of memory; lower it with --refit-group {shown} (the gradient refit holds about "
                f"22 bytes per weight of the experts it moves together), or --refit-steps 0, or a smaller "
                f"--fit-tokens (now 1024 rows per layer)") in " ".join(result.output.split())
    # Without the gradient refit, none of its advice.
    monkeypatch.setattr(estimates, "memory_size", lambda device: 2**20)
    result = CliRunner().invoke(main, [*args, "--refit-steps", "0"])
    assert "may stop out of memory" in result.output and "refit" not in result.output.split("may stop")[1]


def test_plan_takes_every_rewrite_option():
    """plan shows what rewrite with the same command line would do: it takes every option rewrite takes."""
    rewrite_options = {p.name for p in main.commands["rewrite"].params}
    plan_options = {p.name for p in main.commands["plan"].params}
    assert rewrite_options <= plan_options, rewrite_options - plan_options


def test_plan_with_out_says_what_the_rewrite_would_resume_and_whether_the_disk_has_room(build, tmp_path, monkeypatch):
    from dern_stream.checkpoint.progress import Progress
    from dern_stream.rewriter import plan_record

    built, out = build("mixtral"), tmp_path / "out"
    common = dict(experts=4, calib=built.calib, threads=1, progress=False)  # (the same threads, whatever the workers)
    made = dern_stream.plan(built.model_dir, out, workers=2, **common)
    assert not any("interrupted" in n or "free" in n for n in made.notes)
    assert any(n.startswith("2 worker processes") and format_size(2 * made.estimates.host_peak) in n
               for n in made.notes), made.notes
    staging = tmp_path / ".out.dern-partial"
    staging.mkdir()
    Progress(staging, made.run, {"0": {"segments_reassigned": 0}}).save()
    notes = dern_stream.plan(built.model_dir, out, **common).notes
    assert any("1 of 3 layers done: the rewrite would resume from them" in n for n in notes), notes
    assert any("would be discarded" in n for n in dern_stream.plan(built.model_dir, out, restart=True, **common).notes)
    with pytest.raises(DernError, match="started with different options or inputs"):
        dern_stream.plan(built.model_dir, out, alpha=0.5, **common)  # as the rewrite would refuse it
    monkeypatch.setattr(plan_record, "free_space", lambda path: 1000)
    notes = dern_stream.plan(built.model_dir, out, restart=True, **common).notes
    assert any(n.startswith("the disk OUT is on has 1 kB free") and "would refuse to start" in n for n in notes)
    assert not list(tmp_path.glob("out*")) and [p.name for p in staging.iterdir()] == [".dern-progress.json"]


KIMI_SHAPE = (61, 7168, 2048, 384)  # layers, hidden, neurons, experts


def _kimi_sized(path: Path, layers: int = KIMI_SHAPE[0], experts: int = KIMI_SHAPE[3]) -> Path:
    """A sparse checkpoint of Kimi-K2-Thinking's size and storage: int4 in groups of 32 as compressed-tensors packs
    them, Mixtral's tensor names (write_sparse: headers and holes, every value zero)."""
    from dern_stream.storage.formats import CompressedWeights

    _, hidden, inter, _ = KIMI_SHAPE
    int4 = CompressedWeights("pack-quantized", 4, "int", True, "group", 32)
    return write_sparse(path, layers=layers, hidden=hidden, intermediate=inter, experts=experts, top_k=8,
                        compressed=int4)


@pytest.mark.slow  # (the default run's time: README, set-up)
def test_plan_of_a_kimi_k2_thinking_sized_int4_checkpoint(tmp_path):
    """Kimi-K2-Thinking's size and storage (61 layers of 384 experts, hidden 7168, 2048 neurons, int4 in groups of
    32 as compressed-tensors packs them; Mixtral's tensor names): the plan reads headers and routers only, sizes
    the output from the packed tensors, and estimates memory from one layer."""
    layers, hidden, inter, experts = KIMI_SHAPE
    src = _kimi_sized(tmp_path / "kimi")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert 580e9 < size < 620e9
    small = _kimi_sized(tmp_path / "small", layers=2, experts=16)  # imports done first: only the plan's reads count
    dern_stream.plan(small, experts=8, method="prune", device="cpu", progress=False)
    before = _read_bytes()
    plan = dern_stream.plan(src, experts=192, method="prune", device="cpu", progress=False)
    read = _read_bytes() - before
    headers = sum(_header_size(f) for f in src.glob("*.safetensors"))  # 0.5 MB a shard: 9 tensors an expert
    assert read < layers * experts * hidden * 2 + 2 * headers + 50e6, (read, headers)
    assert len(plan.layers) == layers and all(len(s.kept) == 192 for s in plan.selection.values())
    # int4 values (half a byte each) and a bf16 scale per 32 of them, and the shape, per projection
    expert_bytes = 3 * (inter * hidden // 2 + inter * hidden // 32 * 2 + 16)
    dropped = layers * 192 * (expert_bytes + hidden * 2)
    assert plan.output_bytes - sum(len(s.header) for s in plan.shards) == size - sum(
        _header_size(f) for f in src.glob("*.safetensors")) - dropped
    assert plan.estimates.host_peak < 60e9  # one layer's experts, not the checkpoint's 594 GB


@pytest.mark.slow  # (the default run's time: README, set-up)
def test_rewrite_of_a_kimi_k2_thinking_sized_int4_checkpoint(tmp_path):
    """The same 594 GB checkpoint pruned to 16 experts a layer, in a process of its own: the kept experts' packed
    bytes and every other tensor copied, the holes of the sparse input left holes in the output (no disk), the
    peak memory within the plan's estimate, and the output verified."""
    from dern_stream.checkpoint.source import data_extents

    src = _kimi_sized(tmp_path / "kimi")
    with open(next(src.glob("*.safetensors")), "rb") as f:
        if data_extents(f.fileno(), 2**20, 2**20):
            pytest.skip("this file system does not report the holes of a sparse file")
    out, options = tmp_path / "out", dict(experts=16, method="prune", importance="router-norm")
    code = ("import dern_stream;"
            f"dern_stream.rewrite({str(src)!r}, {str(out)!r}, progress=False, **{options!r});"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    measured = int(run.stdout.split()[-1]) * 1024
    plan = dern_stream.plan(src, progress=False, **options)
    assert measured <= plan.estimates.host_peak * 1.1, (measured, plan.estimates.host_peak)
    files = list(out.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) == plan.output_bytes
    assert sum(f.stat().st_blocks * 512 for f in files) < 100e6  # the 40.8 GB output's data: headers, no zeros
    audit = json.loads((out / "dern_stream.json").read_text())
    assert all(rec["kept"] == list(range(16)) for rec in audit["layers"].values())  # (equal router norms: ties)
    result = CliRunner().invoke(main, ["verify", str(out), "--against", str(src)])
    assert result.exit_code == 0 and "OK" in result.output, result.output
