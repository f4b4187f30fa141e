"""Capture MoE-block inputs from a model that is already in memory (tests, examples, small models).

Large checkpoints get the layer-by-layer `dump` instead; both write the same store.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.config_view import config_view
from ..families import Family, family_for
from ..stream.executor import moe_block_of, moe_router_weight
from .store import CalibWriter, tensor_sha256


@torch.no_grad()
def dump_from_model(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    path: str | Path,
    *,
    batch_size: int = 8,
    chunk_tokens: int = 4096,
    dtype: str = "float16",
    overwrite: bool = False,
) -> list[int]:
    """Run `model` (a transformers causal LM) on `input_ids` [sequences, seq_len] and store every MoE
    block's input (its experts'; in most families the output of post_attention_layernorm, in LFM2-MoE of ffn_norm, in
    AFMoE of pre_mlp_layernorm, in Gemma 4 of pre_feedforward_layernorm_2, which its router does not read: see
    families/record.RouterInput). Returns the MoE layer indices."""
    config = config_view(model.config.to_dict())
    family = family_for(config)
    routers = moe_routers(model, family)
    layers = sorted(routers)
    writer = CalibWriter(
        path, model_type=family.model_type, hidden_size=config["hidden_size"],
        num_experts=family.num_experts(config), moe_layers=layers,
        dtype=dtype, chunk_tokens=chunk_tokens, overwrite=overwrite,
    )
    writer.write_tokens(input_ids)  # for a sequential rewrite, which runs the forward from them again
    hashes = {i: tensor_sha256(w) for i, w in routers.items()}
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        moe_block_of(model.get_submodule(family.layers_in_memory)[i]).register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0])
        )
        for i in layers
    ]
    try:
        model.eval()
        runner = forward_module(model, family)
        for start in range(0, input_ids.shape[0], batch_size):
            runner(input_ids=input_ids[start:start + batch_size])
            for i in layers:
                writer.append(i, captured.pop(i), router_sha256=hashes[i])
    finally:
        for h in hooks:
            h.remove()
    for i in layers:
        writer.finish_layer(i)
    return layers


def forward_module(model: torch.nn.Module, family: Family) -> torch.nn.Module:
    """The module whose forward runs the language model: `model`, or where it has no forward of its own (Qwen3-Omni-MoE,
    which only generates) its first part on the way to the decoder layers (the thinker)."""
    if type(model).forward is not torch.nn.Module.forward:
        return model
    return model.get_submodule(family.layers_in_memory.split(".", 1)[0])


def moe_routers(model: torch.nn.Module, family: Family) -> dict[int, torch.Tensor]:
    """Decoder layer index -> router weight, for layers whose MLP is a routed MoE block."""
    routers = {i: moe_router_weight(layer) for i, layer in enumerate(model.get_submodule(family.layers_in_memory))}
    return {i: weight for i, weight in routers.items() if weight is not None}
