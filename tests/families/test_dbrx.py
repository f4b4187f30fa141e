"""DBRX: its config as the Hub release writes it (the experts' keys in ffn_config, d_model, n_layers), read and written
back in place; its fused [N * h, d] experts cut by rows; the routing options it cannot express refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure, load_model
from safetensors.torch import load_file

import dern_stream
from dern_stream.cli import main

# transformers-community/dbrx-instruct's config.json, with the tiny model's sizes
HUB_CONFIG = {
    "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 3,
    "max_seq_len": 128, "vocab_size": 384, "emb_pdrop": 0.0, "resid_pdrop": 0.0, "initializer_range": 0.02,
    "output_router_logits": False, "router_aux_loss_coef": 0.05, "tie_word_embeddings": False, "use_cache": True,
    "torch_dtype": "float32", "transformers_version": "4.38.0.dev0",
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 2, "model_type": "", "rope_theta": 10000.0},
    "ffn_config": {"ffn_hidden_size": 32, "model_type": "", "moe_jitter_eps": 0.01, "moe_loss_weight": 0.05,
                   "moe_num_experts": 8, "moe_top_k": 2},
}


def _hub_copy(built, dst):
    shutil.copytree(built.model_dir, dst)
    (dst / "config.json").write_text(json.dumps(HUB_CONFIG, indent=2))
    return dst


def test_a_hub_config_is_read_and_written_in_place(build, tmp_path):
    built = build("dbrx")
    src = _hub_copy(built, tmp_path / "in")
    out = tmp_path / "out"
    dern_stream.rewrite(src, out, experts=4, calib=built.calib, progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written == {**HUB_CONFIG, "ffn_config": {**HUB_CONFIG["ffn_config"], "moe_num_experts": 4}}
    ids = torch.randint(3, 250, (2, 10))
    model, info = load_model(out, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.isfinite(model(ids).logits).all()
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert after["transformer.blocks.0.ffn.experts.mlp.w1"].shape == (4 * 32, 64)
    result = CliRunner().invoke(main, ["verify", str(out), "--against", str(src)])
    assert result.exit_code == 0 and result.output.rstrip().endswith("OK"), result.output
    # Expert e is rows e*h .. (e+1)*h of w1, v1 and w2: pruning keeps the kept experts' rows, in order
    pruned = tmp_path / "pruned"
    dern_stream.rewrite(src, pruned, experts=4, calib=built.calib, method="prune", progress=False)
    kept = json.loads((pruned / "dern_stream.json").read_text())["layers"]["0"]["kept"]
    after = load_file(pruned / "model.safetensors")
    for part in ("w1", "v1", "w2"):
        name = f"transformer.blocks.0.ffn.experts.mlp.{part}"
        assert after[name].equal(before[name].view(8, 32, 64)[kept].reshape(4 * 32, 64))


@pytest.mark.parametrize(("ffn", "message"), [
    ({"moe_normalize_expert_weights": 2.0}, "moe_normalize_expert_weights is 2.0 (a float); expected 1 (the L1 norm"),
    ({"ffn_act_fn": {"name": "gelu"}}, 'ffn_act_fn is {"name": "gelu"} (an object); expected {"name": "silu"}'),
])
def test_routing_it_cannot_express_is_refused(ffn, message, build, tmp_path):
    built = build("dbrx")
    src = _hub_copy(built, tmp_path / "in")
    config = {**HUB_CONFIG, "ffn_config": {**HUB_CONFIG["ffn_config"], **ffn}}
    (src / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["rewrite", str(src), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib)])
    assert_clean_failure(result, tmp_path / "out", message)


def test_the_experts_keys_are_read_from_ffn_config_alone(build, tmp_path):
    """transformers reads moe_top_k and moe_num_experts from ffn_config: a top-level key of the same name is neither
    read nor rewritten."""
    built = build("dbrx")
    src = _hub_copy(built, tmp_path / "in")
    config = {**HUB_CONFIG, "moe_top_k": 1, "moe_num_experts": 99}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    dern_stream.rewrite(src, out, experts=1, calib=built.calib, method="prune", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert (written["moe_top_k"], written["moe_num_experts"]) == (1, 99)
    assert (written["ffn_config"]["moe_top_k"], written["ffn_config"]["moe_num_experts"]) == (1, 1)  # (top-k clipped)
    assert torch.isfinite(load_model(out)(torch.randint(3, 250, (1, 8))).logits).all()
