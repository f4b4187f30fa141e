"""`dern-stream verify`: a real rewrite passes; each kind of damage to a copy of it is reported."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from click.testing import CliRunner
from helpers import read_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main
from dern_stream.publish.verify import verify as verify_output


@pytest.fixture(scope="module")
def rewritten(build, tmp_path_factory):
    built = build("qwen3_moe")
    out = tmp_path_factory.mktemp("verify") / "out"
    dern_stream.rewrite(built.model_dir, out, experts=5, calib=built.calib, alpha=0.2, max_shard_size="120KB",
                        progress=False)
    return built, out


def verify(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args), "-q"])


def test_a_rewrite_verifies_against_its_input(rewritten):
    built, out = rewritten
    result = verify(out, "--against", built.model_dir)
    assert result.exit_code == 0, result.output
    audit = json.loads((out / "dern_stream.json").read_text())
    unchanged = [e for rec in audit["layers"].values() for e in rec["kept"] if e not in rec["rebuilt_experts"]]
    moe_names = {n for n in Checkpoint(out).entries if ".mlp.experts." in n or ".mlp.gate." in n}
    expected = len(Checkpoint(out).entries) - len(moe_names) + 3 * len(unchanged)
    assert f"{expected} tensors the rewrite does not change are byte-identical" in result.stdout
    assert result.stdout.strip().endswith("OK")


def test_pass_through_is_byte_identical_everywhere_it_can_be(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=8, calib=built.calib, alpha=1.0, progress=False)
    result = verify(out, "--against", built.model_dir)
    assert result.exit_code == 0, result.output
    routers = 3  # the only tensors verify does not compare by bytes
    assert f"{len(Checkpoint(out).entries) - routers} tensors the rewrite does not change" in result.stdout


def overwrite_tensor(ckpt_dir, name, data: bytes) -> None:
    entry = Checkpoint(ckpt_dir).entries[name]
    with open(entry.file, "r+b") as f:
        f.seek(entry.start)
        f.write(data)


def nan_in_expert(d):
    overwrite_tensor(d, "model.layers.1.mlp.experts.0.down_proj.weight", struct.pack("<f", float("nan")))


def zero_embedding(d):
    overwrite_tensor(d, "model.embed_tokens.weight", b"\0" * 16)


def stray_shard(d):
    first = sorted(d.glob("model-*.safetensors"))[0]
    shutil.copy(first, d / "model-extra.safetensors")


def wrong_total_size(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 2
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def config_disagrees(d):
    config = json.loads((d / "config.json").read_text())
    key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    (d / "config.json").write_text(json.dumps({**config, key: 6}))


def flip_byte(d, name) -> None:
    """XOR the lowest bit of a tensor's first byte (a mantissa bit: the value stays finite)."""
    entry = Checkpoint(d).entries[name]
    with open(entry.file, "r+b") as f:
        f.seek(entry.start)
        byte = f.read(1)[0]
        f.seek(entry.start)
        f.write(bytes([byte ^ 1]))


def rebuilt_expert(d) -> str:
    layer, record = next((i, r) for i, r in json.loads((d / "dern_stream.json").read_text())["layers"].items()
                         if r["rebuilt_experts"])
    return f"model.layers.{layer}.mlp.experts.{record['kept'].index(record['rebuilt_experts'][0])}.down_proj.weight"


def flip_in_rebuilt_expert(d):
    flip_byte(d, rebuilt_expert(d))


def flip_in_router(d):
    flip_byte(d, "model.layers.1.mlp.gate.weight")


def shard_header_changed(d):
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    assert data.count(b'"format":"pt"') == 1
    shard.write_bytes(data.replace(b'"format":"pt"', b'"format":"PT"'))  # same length, still a valid file


def config_reformatted(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config))  # same values, other bytes


def file_added(d):
    (d / "notes.txt").write_text("mine")


def side_file_removed(d):
    (d / "tokenizer.json").unlink()


def record_newline_dropped(d):
    (d / "dern_stream.json").write_bytes((d / "dern_stream.json").read_bytes().rstrip(b"\n"))


def audit_disagrees(d):
    audit = json.loads((d / "dern_stream.json").read_text())
    (d / "dern_stream.json").write_text(json.dumps({**audit, "intermediate_size": 7}))


def no_audit(d):
    (d / "dern_stream.json").unlink()


DAMAGE = {
    "NaN": (nan_in_expert, False, "problem: model.layers.1.mlp.experts.0.down_proj.weight holds NaN or Inf"),
    "changed untouched tensor": (zero_embedding, True, "problem: model.embed_tokens.weight differs from model's "
                                                       "model.embed_tokens.weight, but the rewrite leaves it "
                                                       "unchanged"),
    "stray shard": (stray_shard, False, "problem: shard files not named by the index: model-extra.safetensors"),
    "index total_size": (wrong_total_size, False, "model.safetensors.index.json says total_size"),
    "config disagrees": (config_disagrees, False, "problem: layer 0 router has shape [5, 64], config implies [6, 64]"),
    "audit disagrees": (audit_disagrees, False, "problem: dern_stream.json intermediate_size is 7, the checkpoint has"),
    "no audit": (no_audit, False, "problem: no dern_stream.json"),
    # Checksums recorded when the bytes were written: any later change is found, with or without IN.
    "flipped bit in a rebuilt expert": (flip_in_rebuilt_expert, False, "bytes differ from what the rewrite wrote"),
    "flipped bit in a rebuilt expert, against IN": (flip_in_rebuilt_expert, True,
                                                    "bytes differ from what the rewrite wrote"),
    "flipped bit in a router": (flip_in_router, True, "problem: model.layers.1.mlp.gate.weight's bytes differ from "
                                                      "what the rewrite wrote (checksum mismatch)"),
    "shard header changed": (shard_header_changed, False, "'s header differs from the one the rewrite wrote"),
    "config.json reformatted": (config_reformatted, False, "problem: config.json differs from the file the rewrite "
                                                           "wrote"),
    "file added": (file_added, False, "problem: notes.txt was not written by the rewrite"),
    "record's last byte removed": (record_newline_dropped, False, "problem: dern_stream.json's bytes differ from "
                                                                  "what the rewrite wrote"),
    "side file removed": (side_file_removed, False, "problem: tokenizer.json, written by the rewrite, is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_reported(case, rewritten, tmp_path):
    built, out = rewritten
    damage, against, message = DAMAGE[case]
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    damage(copy)
    result = verify(copy, *(["--against", built.model_dir] if against else []))
    assert result.exit_code == 1, result.output
    assert message in result.stdout and "FAILED" in result.stdout, result.stdout
    assert "Traceback" not in result.output


def test_unreadable_checkpoint_is_one_line(rewritten, tmp_path):
    _, out = rewritten
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    sorted(copy.glob("model-*.safetensors"))[-1].unlink()
    result = verify(copy)
    assert result.exit_code == 2 and result.stderr.startswith("error: shard model-") and "is missing" in result.stderr


def _linked_copy(out, tmp):
    """OUT's files as symbolic links, but for `dern_stream.json` and the index, which are copied."""
    tmp.mkdir()
    for f in out.iterdir():
        if f.name in ("dern_stream.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
        else:
            (tmp / f.name).symlink_to(f)
    return tmp


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list positions)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(value, path, new):
    if not path:
        return new
    value[path[0]] = _replace(value[path[0]], path[1:], new)
    return value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tampered_record_or_index_gives_problem_lines(rewritten, tmp_path_factory, data):
    """Any field of dern_stream.json or of the index replaced by any JSON value: verify reports problems
    (or, for a field it does not read, passes), never a traceback."""
    built, out = rewritten
    copy = _linked_copy(out, tmp_path_factory.mktemp("tamper") / "out")
    name = data.draw(st.sampled_from(["dern_stream.json", "model.safetensors.index.json"]))
    original = json.loads((copy / name).read_text())
    record = json.loads((copy / name).read_text())
    path = data.draw(st.sampled_from(sorted(_paths(record), key=str)))
    record = _replace(record, path, data.draw(_JSON))
    (copy / name).write_text(json.dumps(record))
    result = verify(copy, *(["--against", built.model_dir] if data.draw(st.booleans()) else []))
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    if result.exit_code == 2:  # an index too broken to open the checkpoint: one line, as for any bad input
        assert name != "dern_stream.json" and result.stderr.startswith("error: ")
        assert len(result.stderr.splitlines()) == 1
    else:
        last = result.stdout.strip().splitlines()[-1]
        assert (result.exit_code, last == "OK") in ((0, True), (1, False)) and (last == "OK" or "FAILED" in last)
        assert result.exit_code == 1 or record == original  # every change of either file is found


def test_against_a_checkpoint_that_is_not_the_input_is_one_line(rewritten, tmp_path):
    """IN's config or tensor names, dtypes and shapes differ from those of the input, whose fingerprint
    dern_stream.json records: one line, before any tensor is compared (once, this was 30-odd problem lines)."""
    built, out = rewritten
    for other in (out, tmp_path / "other"):
        if other != out:  # the input with one tensor's dtype changed: same names and values, other bytes
            shutil.copytree(built.model_dir, other)
            save_file({n: t.half() if n == "model.norm.weight" else t for n, t in read_tensors(other).items()},
                      other / "model.safetensors", metadata={"format": "pt"})
        result = verify(out, "--against", other)
        assert result.exit_code == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.output
        assert result.stderr.startswith(f"error: --against {other} is not the checkpoint out was rewritten from: ")
        assert f"differ from those of the input ({built.model_dir.name})" in result.stderr


def _changed_in_place(model_dir, copy, names) -> None:
    """A copy of the input with the bytes of `names` changed (same names, dtypes and shapes: same fingerprint)."""
    shutil.copytree(model_dir, copy)
    for name in names:
        flip_byte(copy, name)


def test_an_input_changed_in_place_since_the_rewrite_is_found(rewritten, tmp_path):
    """The fingerprint covers no values: with the same one, each tensor the rewrite left unchanged is still
    compared byte for byte; one that differs is named, several are counted on one line."""
    built, out = rewritten
    _changed_in_place(built.model_dir, tmp_path / "one", ["model.embed_tokens.weight"])
    result = verify(out, "--against", tmp_path / "one")
    assert result.exit_code == 1 and "FAILED: 1 problem(s)" in result.stdout, result.output
    assert "problem: model.embed_tokens.weight differs from one's model.embed_tokens.weight" in result.stdout

    names = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"]
    _changed_in_place(built.model_dir, tmp_path / "three", names)
    result = verify(out, "--against", tmp_path / "three")
    assert result.exit_code == 1 and "FAILED: 1 problem(s)" in result.stdout, result.output
    assert (f"problem: 3 tensors the rewrite leaves unchanged differ from {tmp_path / 'three'}'s (e.g. lm_head.weight)"
            ": it holds other weights than this checkpoint's input") in result.stdout


def test_without_a_recorded_fingerprint_tensors_are_compared_one_by_one(build, tmp_path):
    """A record that no longer holds the fingerprint (changed, hence reported) gives nothing to go by:
    verify compares the tensors, and a kept-experts record that does not fit IN is a problem, not a traceback."""
    built = build("deepseek_v3")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    del audit["source"]["fingerprint"]
    (out / "dern_stream.json").write_text(json.dumps(audit, indent=2) + "\n")
    result = verify(out, "--against", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "dern_stream.json was changed after the rewrite wrote it" in result.output
    assert "is it the rewrite's input?" in result.output


def _with_tensors(model, dest, **extra):
    """A copy of checkpoint `model` (one shard) with `extra` tensors added."""
    import torch

    shutil.copytree(model, dest)
    tensors = read_tensors(dest)
    tensors.update({name.replace("__", "."): torch.full(shape, 0.5) for name, shape in extra.items()})
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_tensors_the_config_does_not_imply_are_copied_and_verified_or_refused_up_front(build, tmp_path):
    """A tensor of a MoE block with one entry per expert that the family has no name for cannot be cut to K:
    refused before any work. Any other tensor the config does not imply is copied as it is, and verify accepts it
    as the rewrite recorded it (transformers ignores it when it loads the output)."""
    from transformers import AutoModelForCausalLM

    built = build("mixtral")
    per_expert = _with_tensors(built.model_dir, tmp_path / "per_expert",
                               model__layers__0__block_sparse_moe__gate__bias=(8,))
    result = CliRunner().invoke(main, ["rewrite", str(per_expert), str(tmp_path / "o1"), "-k", "4", "--calib",
                                       str(built.calib)])
    assert result.exit_code == 2 and not (tmp_path / "o1").exists() and not list(tmp_path.glob(".o1*"))
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model.layers.0.block_sparse_moe.gate.bias [8] has one entry per expert, but mixtral has no such "
        "tensor, so it cannot be cut to fewer experts with the rest of the layer: remove it from the checkpoint to "
        "rewrite it")
    other = _with_tensors(built.model_dir, tmp_path / "other", model__layers__1__extra_norm__weight=(64,),
                          model__layers__2__block_sparse_moe__temperature=(1,))
    out = tmp_path / "o2"
    dern_stream.rewrite(other, out, experts=4, calib=built.calib, progress=False)
    report = verify_output(out, against=other, progress=False)
    assert report.ok and report.notes == ["2 tensors the config does not imply, copied from the input as the rewrite "
                                          "recorded them (transformers does not load them), e.g. "
                                          "model.layers.1.extra_norm.weight"], report
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4
    tensors = read_tensors(out)  # a tensor added afterwards, not recorded by the rewrite, is a problem
    tensors["model.layers.0.stray.weight"] = tensors["model.layers.1.extra_norm.weight"].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    report = verify_output(out, progress=False)
    assert any("1 tensors the config does not imply, e.g. model.layers.0.stray.weight" in p for p in report.problems)
