"""`dern-stream verify`: a real rewrite passes; each kind of damage to a copy of it is reported."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from click.testing import CliRunner

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main


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
