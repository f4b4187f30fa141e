"""DBRX: softmax over all experts, top `moe_top_k`, renormalised (`moe_normalize_expert_weights` 1, its L1 norm;
null: not renormalised). Its own layout throughout: the decoder layers are `transformer.blocks.{i}`, the embedding
`transformer.wte`, the MoE block `ffn` with router `ffn.router.layer`; the experts are fused as three [N * h, d]
tensors, `ffn.experts.mlp.w1` (gate), `v1` (up) and `w2` (the down projection transposed), expert e rows e * h to
(e + 1) * h; the expert count, top-k and width sit in config.json's `ffn_config`, the hidden size is `d_model` and
the layer count `n_layers` (config_view.py reads them as every family's keys)."""

from __future__ import annotations

from ..config_rules import POS_INT, Kind, exactly, opt
from ..record import Family, FusedExperts
from ..routing import SoftmaxTopK


def dbrx_router(config: dict) -> SoftmaxTopK:
    return SoftmaxTopK(config["moe_top_k"])


def dbrx_renormalises(config: dict) -> bool:
    """Scores divided by their L1 norm over A(x) (moe_normalize_expert_weights 1, the default), or left (null)."""
    return config.get("moe_normalize_expert_weights", 1.0) is not None


def _is_one(value: object) -> bool:
    return type(value) in (int, float) and value == 1


ONE = Kind("1 (the L1 norm; DBRX's other p-norms are not supported)", _is_one)
SILU = exactly({"name": "silu"}, '{"name": "silu"} (other expert activations are not supported)')

DBRX = Family(
    model_type="dbrx",
    architectures=("DbrxForCausalLM",),
    layers="transformer.blocks",
    embed="wte",
    layers_key="n_layers",
    config_sections=("ffn_config",),
    config_aliases=(("hidden_size", "d_model"),),
    expert_count_keys=("moe_num_experts",),
    top_k_keys=("moe_top_k",),
    intermediate_key="ffn_hidden_size",
    make_router=dbrx_router,
    router="ffn.router.layer.weight",
    fused=FusedExperts("ffn.experts.", "ffn.experts.mlp.w1", "ffn.experts.mlp.w2", gate_up_cols=False, down_cols=True,
                       up="ffn.experts.mlp.v1", flat=True),
    renormalises=dbrx_renormalises,
    config_rules={
        "d_model": opt(POS_INT),
        "n_heads": opt(POS_INT),
        "moe_normalize_expert_weights": opt(ONE, nullable=True),
        "ffn_act_fn": opt(SILU, nullable=True),
    },
    tiny_config=dict(d_model=64, n_heads=4, max_seq_len=128,
                     attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                     ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2)),
)

FAMILIES = (DBRX,)
