"""DeepSeek-MoE-16B (`model_type` "deepseek", the DERN paper's third model) has no transformers class, so it
is tested on its on-disk layout: the published config.json and tensor names (tiny_models), routed as its
remote modeling_deepseek.py routes (softmax, top-k, no renormalisation: the reference below)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import raw_bytes, read_tensors

import dern_stream
from dern_stream.calib.store import CalibWriter, tensor_sha256
from dern_stream.cli import main
from dern_stream.publish.verify import verify
from dern_stream.tiny_models import DEEPSEEK_MOE_16B_CONFIG, save_deepseek_moe_16b

N, TOP_K, LAYERS = 8, 3, (1, 2)


@pytest.fixture(scope="module")
def model_and_dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek16b")
    model = save_deepseek_moe_16b(root / "model")
    tensors = read_tensors(model)
    writer = CalibWriter(root / "calib.zarr", model_type="deepseek", hidden_size=64, num_experts=N,
                         moe_layers=list(LAYERS), dtype="float32", chunk_tokens=64)
    inputs = {i: torch.randn(300, 64, generator=torch.Generator().manual_seed(i)) for i in LAYERS}
    for i in LAYERS:
        writer.append(i, inputs[i], router_sha256=tensor_sha256(tensors[f"model.layers.{i}.mlp.gate.weight"]))
        writer.finish_layer(i)
    return model, root / "calib.zarr", inputs, tensors


def _reference_importance(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """modeling_deepseek.MoEGate (softmax, topk, norm_topk_prob false), then Eq. 1."""
    scores = torch.softmax(x.double() @ router.double().T, dim=-1)
    weight, idx = torch.topk(scores, TOP_K, dim=-1)
    share = weight / weight.sum(-1, keepdim=True)
    return torch.zeros(N, dtype=torch.float64).index_add_(0, idx.reshape(-1), share.reshape(-1)) / x.shape[0]


def test_half_the_experts_with_the_routing_of_the_remote_code(model_and_dump, tmp_path):
    model, calib, inputs, src = model_and_dump
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=calib, alpha=1.0, recipe="paper", progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    dst = read_tensors(out)
    for i in LAYERS:
        reference = _reference_importance(inputs[i], src[f"model.layers.{i}.mlp.gate.weight"])
        torch.testing.assert_close(torch.tensor(audit["layers"][str(i)]["importance"], dtype=torch.float64),
                                   reference, rtol=0, atol=1e-5)
        kept = sorted(torch.topk(reference, 4).indices.tolist())
        assert audit["layers"][str(i)]["kept"] == kept
        assert dst[f"model.layers.{i}.mlp.gate.weight"].equal(src[f"model.layers.{i}.mlp.gate.weight"][kept])
        for new, old in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert dst[f"model.layers.{i}.mlp.experts.{new}.{proj}.weight"].equal(
                    src[f"model.layers.{i}.mlp.experts.{old}.{proj}.weight"])
        assert f"model.layers.{i}.mlp.experts.4.up_proj.weight" not in dst
    untouched = [n for n in src if "experts." not in n or "shared_experts" in n]
    untouched = [n for n in untouched if not n.endswith("mlp.gate.weight")]
    assert any("shared_experts" in n for n in untouched) and "model.layers.0.mlp.gate_proj.weight" in untouched
    for name in untouched:
        assert dst[name].equal(src[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config == {**DEEPSEEK_MOE_16B_CONFIG, "n_routed_experts": 4}
    report = verify(out, model, progress=False)
    assert not report.problems, report.problems


def test_all_experts_with_alpha_one_is_byte_identical(model_and_dump, tmp_path):
    model, calib, _, _ = model_and_dump
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=N, calib=calib, alpha=1.0, progress=False)
    assert raw_bytes(out) == raw_bytes(model)


def test_dern_merges_and_keeps_the_shared_experts_width(model_and_dump, tmp_path):
    model, calib, _, src = model_and_dump
    out = tmp_path / "out"
    summary = dern_stream.rewrite(model, out, experts=4, calib=calib, alpha=0.2, intermediate_size=16,
                                  progress=False)
    assert summary.segments_reassigned > 0
    config = json.loads((out / "config.json").read_text())
    assert (config["moe_intermediate_size"], config["n_shared_experts"]) == (16, 4)  # 2 * 32 = 4 * 16
    dst = read_tensors(out)
    assert dst["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 16)
    shared = "model.layers.1.mlp.shared_experts.up_proj.weight"
    assert dst[shared].equal(src[shared])


def test_dump_and_eval_say_why_they_cannot_run_remote_code(model_and_dump, tmp_path):
    model, _, _, _ = model_and_dump
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 20)
    for args in (["dump", str(model), str(tmp_path / "d.zarr"), "--text", str(text)],
                 ["eval", str(model), "--text", str(text)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert "remote code" in result.output.strip().splitlines()[-1], result.output
