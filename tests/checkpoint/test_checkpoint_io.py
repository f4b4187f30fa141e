"""Reading sharded inputs, writing sharded outputs, side files, Hub repo ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import raw_bytes, read_tensors, shard_metadata
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.checkpoint import Checkpoint, ShardedWriter, TensorSpec
from dern_stream.checkpoint.safetensors_format import DTYPE_NAMES, read_header
from dern_stream.errors import DernError


def test_sharded_input_gives_the_same_output_as_one_file(build, tmp_path):
    single = build("mixtral")
    sharded = build("mixtral", max_shard_size="150KB")
    assert len(Checkpoint(sharded.model_dir).shard_files) >= 3
    a, b = tmp_path / "a", tmp_path / "b"
    dern_stream.rewrite(single.model_dir, a, experts=4, calib=single.calib, alpha=0.2, progress=False)
    dern_stream.rewrite(sharded.model_dir, b, experts=4, calib=sharded.calib, alpha=0.2, progress=False)
    assert raw_bytes(a) == raw_bytes(b)


def test_sharded_output_index_and_shards_agree(build, tmp_path):
    built = build("qwen2_moe")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, max_shard_size="100KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and not (out / "model.safetensors").exists()
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            names = set(f.keys())
            total += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)
        assert names == {n for n, s in index["weight_map"].items() if s == shard}
        assert shard_metadata(out / shard) == {"format": "pt"}
        tensor_bytes = sum(e.nbytes for e in read_header(str(out / shard))[0].values())
        assert tensor_bytes <= 100_000 or len(names) == 1
    assert index["metadata"]["total_size"] == total
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_writer_round_trips_every_dtype_in_place(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.randn(7, dtype=torch.float16),
        "c": torch.randn(2, 2, 2), "d": torch.arange(6, dtype=torch.int64).view(2, 3),
        "e": torch.tensor([True, False, True]), "f": torch.tensor(3.5), "g": torch.empty(0, 4),
    }
    specs = [TensorSpec(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_size=40)
    for name in reversed(list(tensors)):  # any order: every slot is planned in advance
        writer.write(name, tensors[name])
    writer.finish()
    (tmp_path / "config.json").write_text("{}")
    back = read_tensors(tmp_path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].equal(t), name


def test_writer_refuses_to_finish_with_a_tensor_missing(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("x", "F32", (2,)), TensorSpec("y", "F32", (2,))], 10**9)
    writer.write("x", torch.zeros(2))
    with pytest.raises(DernError, match="never written"):
        writer.finish()
    writer.close()


def test_side_files_are_copied_and_foreign_weights_are_not(build, tmp_path):
    built = build("olmoe")
    src = tmp_path / "src"
    shutil.copytree(built.model_dir, src)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "pytorch_model.bin").write_bytes(b"stale full weights")
    (src / "original").mkdir()
    out = tmp_path / "out"
    summary = dern_stream.rewrite(src, out, experts=4, calib=built.calib, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "pytorch_model.bin").exists() and not (out / "original").exists()
    assert any("pytorch_model.bin" in n and "original" in n for n in summary.notes)
    assert sorted(p.name for p in src.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja",
         "pytorch_model.bin", "original"])  # IN is never written to


def test_hub_repo_id_resolves_offline_from_the_cache(build, tmp_path):
    built = build("mixtral")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-mixtral" / "snapshots" / ("a" * 40)
    shutil.copytree(built.model_dir, snapshot)
    (cache / "models--tiny-org--tiny-mixtral" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-mixtral" / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "dern_stream.cli", "rewrite", "tiny-org/tiny-mixtral", str(tmp_path / "out"),
           "--experts", "4", "--calib", str(built.calib), "--quiet"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "experts 8 -> 4" in run.stdout
    missing = subprocess.run(cmd[:4] + ["tiny-org/not-cached"] + cmd[5:], env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: Hugging Face repo tiny-org/not-cached (revision main) is not (completely) in the local cache {cache}, "
        "and HF_HUB_OFFLINE is set")


def test_corrupt_and_truncated_shards_give_clear_errors(build, tmp_path):
    built = build("mixtral")
    src = tmp_path / "src"
    shutil.copytree(built.model_dir, src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DernError, match="truncated"):
        Checkpoint(src)
    (src / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(DernError, match="corrupt safetensors header"):
        Checkpoint(src)


def test_two_identical_runs_give_identical_bytes(build, tmp_path):
    built = build("qwen3_moe")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        dern_stream.rewrite(built.model_dir, out, experts=5, calib=built.calib, alpha=0.2, max_shard_size="120KB",
                            progress=False)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and len(files) > 4
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_prefetch_reads_a_layer_in_spans_and_reports_a_shard_that_shrank(build, tmp_path):
    """The read-ahead covers every byte asked for (at most the gaps between them on top); a shard
    cut short under a running rewrite is a one-line error, not a short read."""
    built = build("mixtral")
    src = tmp_path / "src"
    shutil.copytree(built.model_dir, src)
    ckpt = Checkpoint(src)
    names = [n for n in ckpt.entries if n.startswith("model.layers.1.")]
    entries = [ckpt.entries[n] for n in names]
    first, end = min(e.start for e in entries), max(e.start + e.nbytes for e in entries)
    assert sum(e.nbytes for e in entries) <= ckpt.prefetch(names) <= end - first
    os.truncate(src / "model.safetensors", first + 1)
    shrunk = r"^model.safetensors is truncated: it ends inside the tensors at bytes \d+-\d+$"
    with pytest.raises(DernError, match=shrunk):
        ckpt.prefetch(names)


def test_a_mistyped_local_path_is_said_to_be_missing_before_the_hub_is_asked(build, tmp_path):
    """`demo/mdoel` looks like a Hub repo id; with a `demo/` folder here it is most likely a typo of `demo/model`:
    the message says first that no such directory exists, and names the close ones."""
    built = build("mixtral")
    (tmp_path / "demo").mkdir()
    os.symlink(built.model_dir, tmp_path / "demo" / "model")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-m", "dern_stream.cli", "plan", "demo/mdoel", "--experts", "4", "-q"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("error: input demo/mdoel does not exist: there is no such directory (did you mean "
                           "demo/model?); as a Hugging Face repo id: Hugging Face repo demo/mdoel"), line
    elsewhere = subprocess.run([sys.executable, "-m", "dern_stream.cli", "plan", "someorg/mdoel", "-k", "4", "-q"],
                               env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert elsewhere.stderr.strip().splitlines()[-1].startswith("error: Hugging Face repo someorg/mdoel")
