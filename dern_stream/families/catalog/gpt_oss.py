"""gpt-oss: experts fused into `gate_up_proj` [N, d, 2h] (gate and up alternating) and `down_proj` [N, h, d], with
biases that are part of each neuron's segment; the router's bias is part of its logits; a clamped SwiGLU."""

from __future__ import annotations

from ..activations import ClampedSwiGLU
from ..record import Family, FusedExperts, never
from ..routing import SoftmaxOverTopLogits


def gpt_oss_router(config: dict) -> SoftmaxOverTopLogits:
    return SoftmaxOverTopLogits(config["num_experts_per_tok"])


def gpt_oss_glu(config: dict) -> ClampedSwiGLU:
    return ClampedSwiGLU(float(config.get("swiglu_alpha", 1.702)), float(config.get("swiglu_limit", 7.0)))


FAMILIES = (
    Family(
        model_type="gpt_oss",
        architectures=("GptOssForCausalLM",),
        expert_count_keys=("num_local_experts", "num_experts"),
        intermediate_key="intermediate_size",
        make_router=gpt_oss_router,
        router="mlp.router.weight",
        bias="mlp.router.bias",
        bias_in_logits=True,
        fused=FusedExperts("mlp.experts.", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", gate_up_cols=True,
                           down_cols=True, interleaved=True, gate_up_bias="mlp.experts.gate_up_proj_bias",
                           down_bias="mlp.experts.down_proj_bias"),
        make_glu=gpt_oss_glu,
        renormalises=never,  # the softmax over the top-k logits sums to 1 already
        tiny_config=dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                         sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    ),
)
