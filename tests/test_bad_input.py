"""Bad input: one clear line on stderr, exit status 2, the input untouched, no complete-looking output.

One table, one row per case (the list of the trust issue and a few more). Each row breaks a private
copy of a tiny real checkpoint (or of its calibration dump) and names the message it must give.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, file_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from dern_stream.cli import main


def edit_json(path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def first_shard(src):
    return sorted(src.glob("model-*.safetensors"))[0]


def truncate(src, _calib, _tmp):
    shard = first_shard(src)
    shard.write_bytes(shard.read_bytes()[:-100])


def corrupt_header(src, _calib, _tmp):
    shard = first_shard(src)
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    shard.write_bytes(data[:8] + b"{" + b"\x00" * (n - 1) + data[8 + n:])


def missing_shard(src, _calib, _tmp):
    sorted(src.glob("model-*.safetensors"))[-1].unlink()


def ghost_tensor(src, _calib, _tmp):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = first_shard(src).name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def wrong_config_shape(src, _calib, _tmp):
    edit_json(src / "config.json", intermediate_size=48)


def unsupported_family(src, _calib, _tmp):
    # (a model_type of its own naming a supported class is handled as that class's family: test_compressed_tensors)
    edit_json(src / "config.json", model_type="jetmoe", architectures=["JetMoeForCausalLM"])


def dense_model(src, _calib, _tmp):
    shutil.rmtree(src)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(src)


def no_config(src, _calib, _tmp):
    (src / "config.json").unlink()


def dump_with(value):
    def poison(_src, calib, _tmp):
        """Damage the dump on disk: one bad value in layer 1 (found after layer 0 is written). The
        writer refuses non-finite inputs, so the value goes straight into the stored array."""
        import zarr

        zarr.open_array(str(calib / "moe_inputs" / "1"), mode="r+")[100, 3] = value
    return poison


def not_a_dump(_src, calib, _tmp):
    shutil.rmtree(calib)
    calib.mkdir()
    (calib / "notes.txt").write_text("not zarr")


def out_exists(_src, _calib, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("user data")


CASES = {
    # name: (break the copies, extra arguments, OUT relative to tmp, expected message)
    "missing shard": (missing_shard, [], "out",
                      "shard {last} named in model.safetensors.index.json is missing from"),
    "truncated shard": (truncate, [], "out", "{first} is truncated: tensor"),
    "corrupt header": (corrupt_header, [], "out", "{first} has a corrupt safetensors header (not a JSON object)"),
    "index names a tensor no shard has": (
        ghost_tensor, [], "out",
        "model.safetensors.index.json places tensor 'model.layers.0.mlp.ghost.weight' in {first}, "
        "which does not hold it"),
    "config and shapes disagree": (wrong_config_shape, [], "out",
                                   "has shape [32, 64], config implies [48, 64]"),
    "more layers in config than in the shards": (
        lambda src, _c, _t: edit_json(src / "config.json", num_hidden_layers=5), [], "out",
        "config.json says num_hidden_layers 5, but the shards hold no tensor of layer 3"),
    "a billion layers in config": (
        lambda src, _c, _t: edit_json(src / "config.json", num_hidden_layers=10**9), [], "out",
        "config.json says num_hidden_layers 1000000000, but the shards hold no tensor of layer 3"),
    "fewer layers in config than in the shards": (
        lambda src, _c, _t: edit_json(src / "config.json", num_hidden_layers=2), [], "out",
        "the shards hold layer 2, past config.json's num_hidden_layers 2"),
    "vocab_size disagrees with the embedding": (
        lambda src, _c, _t: edit_json(src / "config.json", vocab_size=10**9), [], "out",
        "model.embed_tokens.weight has shape [384, 64], config.json implies [vocab_size 1000000000"),
    "no config.json": (no_config, [], "out", "has no config.json; is it a Hugging Face checkpoint directory?"),
    "unsupported model_type": (unsupported_family, [], "out", "model_type 'jetmoe' is not supported (nor is a class "
                                                              "its config.json names); supported families: "),
    "not an MoE model": (dense_model, [], "out",
                         "model_type 'llama' is not a Mixture-of-Experts model (config.json has no expert count)"),
    "K < 1": (None, ["--experts", 0], "out", "--experts must be a positive integer, got 0"),
    "K > N": (None, ["--experts", 9], "out", "--experts 9 exceeds the model's 8 experts per layer"),
    "dump from a different model": (None, ["--calib", "OTHER"], "out",
                                    "was made from another model (layer 0 router weights differ)"),
    "dump with NaN": (dump_with(np.nan), [], "out", "layer 1 holds NaN or Inf values"),
    "dump with Inf": (dump_with(np.inf), [], "out", "layer 1 holds NaN or Inf values"),
    "dump is not a dump": (not_a_dump, [], "out", "calibration dump"),
    "OUT equal to IN": (None, [], "src", "is the input checkpoint; choose another path"),
    "OUT inside IN": (None, [], "src/out", "lies inside the input checkpoint"),
    "IN inside OUT": (None, ["--overwrite"], ".", "contains the input checkpoint"),
    "OUT exists": (out_exists, [], "out", "exists and is not empty; pass --overwrite to replace it"),
    "alpha above 1": (None, ["--alpha", 1.5], "out", "--alpha must lie in [0, 1], got 1.5"),
    "alpha below 0": (None, ["--alpha", -0.1], "out", "--alpha must lie in [0, 1], got -0.1"),
    "unknown --sim-components": (None, ["--sim-components", "up,left"], "out",
                                 "--sim-components must be a non-empty subset of gate,up,down"),
    "unknown --method": (None, ["--method", "magic"], "out", "Invalid value for '--method'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, build, tmp_path):
    breaker, extra, out_rel, message = CASES[case]
    built = build("mixtral", max_shard_size="100KB")
    src, calib = tmp_path / "src", tmp_path / "calib.zarr"
    shutil.copytree(built.model_dir, src)
    shutil.copytree(built.calib, calib)
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 2
    message = message.format(first=shards[0], last=shards[-1])
    if breaker is not None:
        breaker(src, calib, tmp_path)
    extra = [build("mixtral", seed=7).calib if a == "OTHER" else a for a in extra]
    args = ["--experts", 4, "--calib", calib, "-q", "--alpha", 0.2, *extra]
    before = {"src": file_bytes(src), "calib": file_bytes(calib)}
    out = (tmp_path / out_rel).resolve()

    result = CliRunner().invoke(main, ["rewrite", str(src), str(out), *map(str, args)])

    if case.startswith("unknown --method"):  # click's own usage error: exit 2, its usual two lines
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    elif case in ("OUT equal to IN", "IN inside OUT", "OUT exists"):  # OUT is there already: it must stay as it was
        assert result.exit_code == 2 and message in result.stderr.strip().splitlines()[-1], result.output
        assert "Traceback" not in result.output
        if case == "OUT exists":
            assert (out / "keep.txt").read_text() == "user data" and len(list(out.iterdir())) == 1
    else:
        assert_clean_failure(result, out, message)
    assert {"src": file_bytes(src), "calib": file_bytes(calib)} == before  # the input is untouched


@pytest.mark.parametrize(("call", "succeed"), [("pwrite", 3), ("fdatasync", 1)])
def test_disk_full_while_writing(call, succeed, build, tmp_path, monkeypatch):
    """Every tensor is written with pwrite and flushed with fdatasync (a layer is journaled after it):
    fail either. The message names the output file, not an input; the finished layers are kept for a
    resume, OUT does not appear, and the same command then completes once there is space again."""
    built = build("mixtral")
    real, calls = getattr(os, call), []

    def fail_after_three(*args):
        calls.append(args)
        if len(calls) > succeed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, call, fail_after_three)
    out = tmp_path / "out"
    args = ["rewrite", str(built.model_dir), str(out), "--experts", "4", "--calib", str(built.calib), "-q",
            "--alpha", "0.2"]
    result = CliRunner().invoke(main, args)
    assert len(calls) > succeed
    assert_clean_failure(result, out, "No space left on device: " + str(tmp_path / ".out.dern-partial" / "model"))
    monkeypatch.setattr(os, call, real)
    assert CliRunner().invoke(main, args).exit_code == 0 and (out / "config.json").exists()


def test_disk_full_while_journaling_names_the_journal_and_counts_only_what_it_holds(build, tmp_path, monkeypatch):
    """The journal of finished layers cannot be saved (a full disk): the message names the journal, counts the
    layers it holds (not the one it failed to add), and leaves no temporary file; the same command resumes."""
    built = build("mixtral")
    real, saves = os.replace, []

    def full_from_the_third_save(src, dst):
        if str(dst).endswith(".dern-progress.json"):
            saves.append(dst)
            if len(saves) >= 3:  # the empty journal, layer 0, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_from_the_third_save)
    out, staging = tmp_path / "out", tmp_path / ".out.dern-partial"
    args = ["rewrite", str(built.model_dir), str(out), "--experts", "4", "--calib", str(built.calib), "-q"]
    result = CliRunner().invoke(main, args)
    assert_clean_failure(result, out, f"No space left on device: {staging / '.dern-progress.json'} (1 of 3 MoE "
                                      f"layers are done and kept in {staging}")
    assert not (staging / ".dern-progress.tmp").exists()
    monkeypatch.setattr(os, "replace", real)
    assert CliRunner().invoke(main, args).exit_code == 0 and (out / "config.json").exists()
