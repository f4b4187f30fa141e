"""Synthetic MoE checkpoints of any size, in Mixtral's on-disk layout, written one layer at a time.

    python -m dern_stream.synthetic OUT --size 2GB --layers 24 [--hidden 1024 --experts 8] [--dump DUMP]
    python -m dern_stream.synthetic OUT --layers 24 --hidden 1024 --intermediate 2048 --experts 8
    python -m dern_stream.synthetic OUT --size 30GB --layers 640 --upcycled 0.3 --dump DUMP --tokens 1024
        # larger than the development machine's 24.7 GB of RAM (docs/performance.md)

`--size` picks the experts' intermediate size (a multiple of 64) so the checkpoint comes out at about
that size; the generator itself holds one layer at a time, so any size can be written.

`--upcycled S` makes every expert the same base FFN plus noise of relative size S (as in
upcycled models such as Mixtral), so DERN has aligned segments to reassign; 0 gives independent experts.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .calib import CalibWriter, tensor_sha256
from .runtime.arguments import parse_size
from .storage import quantize

# fp8: projections stored as DeepSeek-V3's FP8 release stores them (float8_e4m3fn + float32 scales per 128x128
# block, declared in quantization_config); embeddings, norms and routers in bf16.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
_FP8_BLOCK = (128, 128)


def intermediate_for(size: int, *, layers: int, hidden: int, experts: int, vocab: int = 32000,
                     dtype: str = "bf16") -> int:
    """The expert intermediate size (multiple of 64) that makes the checkpoint about `size` bytes."""
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    fixed = (2 * vocab * hidden + layers * (2.5 * hidden * hidden + experts * hidden)) * elem
    per_unit = layers * experts * 3 * hidden * elem
    inter = int((size - fixed) // per_unit) // 64 * 64
    if inter < 64:
        raise SystemExit(f"{size} bytes is too small for {layers} layers of hidden size {hidden}")
    return inter


def write_synthetic(path: str | Path, *, layers: int, hidden: int = 1024, intermediate: int | None = None,
                    experts: int = 8, top_k: int = 2, vocab: int = 32000, dtype: str = "bf16",
                    upcycled: float = 0.0, seed: int = 0, size: int | None = None) -> Path:
    """`intermediate` or `size` (bytes) sets the experts' size."""
    if intermediate is None:
        intermediate = intermediate_for(size, layers=layers, hidden=hidden, experts=experts, vocab=vocab, dtype=dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    fp8 = dtype == "fp8"
    dt = torch.bfloat16 if fp8 else DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen) * scale).to(dt)

    total = layers + 1  # shard 1: embeddings and head; shard i + 2: layer i
    weight_map: dict[str, str] = {}

    def flush(index: int, tensors: dict[str, torch.Tensor]) -> None:
        if fp8:
            for key in [k for k in tensors if k.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))]:
                tensors[key], tensors[key + "_scale_inv"] = quantize(tensors[key], _FP8_BLOCK)
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    flush(0, {name: rand(*shape) if name != "model.norm.weight" else torch.ones(hidden, dtype=dt)
              for name, shape in _head_shapes(vocab, hidden).items()})
    for i in range(layers):
        t = {}
        for name, shape in _layer_shapes(i, hidden, experts, intermediate, with_experts=False).items():
            t[name] = (torch.ones(hidden, dtype=dt) if name.endswith("norm.weight")
                       else rand(*shape, scale=0.5 if name.endswith("gate.weight") else 0.02))
        shapes = {"w1": (intermediate, hidden), "w3": (intermediate, hidden), "w2": (hidden, intermediate)}
        base = {k: torch.randn(*s, generator=gen) * 0.02 for k, s in shapes.items()}
        for e in range(experts):
            for name, b in base.items():
                noise = torch.randn(b.shape, generator=gen) * 0.02
                w = b + noise * upcycled if upcycled else noise
                t[f"model.layers.{i}.block_sparse_moe.experts.{e}.{name}.weight"] = w.to(dt)
        flush(i + 1, t)  # written as we go: the generator never holds more than one layer
    return _finish(path, _config(hidden, intermediate, layers, experts, top_k, vocab, dtype), weight_map)


def write_sparse(path: str | Path, *, layers: int, hidden: int, intermediate: int, experts: int, top_k: int = 2,
                 vocab: int = 32000, compressed=None) -> Path:
    """A bf16 checkpoint of the same layout whose shards are headers and holes (`ftruncate`): any size in
    no time and almost no disk, every weight zero. For what reads only headers and routers (`plan`). `compressed`
    (a storage.formats.CompressedWeights): the experts stored in that compressed-tensors format instead (all-zero
    scales and values: their headers only are meant to be read)."""
    from .checkpoint.safetensors_format import SIZES

    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    total, weight_map = layers + 1, {}
    for index in range(total):
        shapes = _head_shapes(vocab, hidden) if index == 0 else _layer_shapes(index - 1, hidden, experts, intermediate)
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, shape in _stored(shapes, compressed):
            dtype = shape[1]
            size = SIZES[dtype] * math.prod(shape[0])
            header[tensor] = {"dtype": dtype, "shape": list(shape[0]), "data_offsets": [offset, offset + size]}
            offset += size
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        with open(path / name, "wb") as f:
            f.write(struct.pack("<Q", len(body)) + body)
            f.truncate(8 + len(body) + offset)
        weight_map.update(dict.fromkeys((k for k in header if k != "__metadata__"), name))
    config = _config(hidden, intermediate, layers, experts, top_k, vocab, "bf16")
    if compressed is not None:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": compressed.format, "quantization_status": "compressed",
            "config_groups": {"group_0": {**compressed.scheme(), "format": compressed.format}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*block_sparse_moe.gate$"]}
    return _finish(path, config, weight_map)


def _stored(shapes: dict[str, tuple[int, ...]], compressed) -> list[tuple[str, tuple[tuple[int, ...], str]]]:
    """(name, (shape, dtype)) of every stored tensor: bf16, or the experts' compressed-tensors tensors."""
    out = []
    for name, shape in shapes.items():
        if compressed is None or ".experts." not in name:
            out.append((name, (shape, "BF16")))
            continue
        dtypes = {"weight_scale": "BF16", "weight_shape": "I64", "weight_zero_point": "I32",
                  "weight": compressed.stored_dtype(), "weight_packed": compressed.stored_dtype()}
        for stored, (suffix, stored_shape) in zip(compressed.names(name),
                                                  compressed.stored_shapes(*shape).items(), strict=True):
            out.append((stored, (stored_shape, dtypes[suffix])))
    return out


def _head_shapes(vocab: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
            "lm_head.weight": (vocab, hidden)}


def _layer_shapes(i: int, hidden: int, experts: int, intermediate: int,
                  with_experts: bool = True) -> dict[str, tuple[int, ...]]:
    """Decoder layer i's tensors in Mixtral's on-disk layout (4 key/value heads of hidden / 16)."""
    p, kv = f"model.layers.{i}.", hidden // 4
    shapes = {
        p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "block_sparse_moe.gate.weight": (experts, hidden),
    }
    if with_experts:
        for e in range(experts):
            for w, shape in (("w1", (intermediate, hidden)), ("w2", (hidden, intermediate)),
                             ("w3", (intermediate, hidden))):
                shapes[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = shape
    return shapes


def _config(hidden: int, intermediate: int, layers: int, experts: int, top_k: int, vocab: int, dtype: str) -> dict:
    fp8 = dtype == "fp8"
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": hidden // 16, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False,
        "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}[dtype],
        **({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(_FP8_BLOCK)}} if fp8 else {}),
    }


def _finish(path: Path, config: dict, weight_map: dict[str, str]) -> Path:
    (path / "config.json").write_text(json.dumps(config, indent=2))
    size = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    return path


def write_synthetic_dump(checkpoint: str | Path, dump: str | Path, tokens: int = 4096, seed: int = 1) -> Path:
    """Random MoE inputs (unit-RMS, like a post-attention RMSNorm output) for every layer, with router hashes."""
    from .checkpoint import Checkpoint
    from .families import family_for

    ckpt = Checkpoint(Path(checkpoint))
    fam = family_for(ckpt.config)
    layers = fam.moe_layers(ckpt.entries)
    hidden = ckpt.config["hidden_size"]
    writer = CalibWriter(dump, model_type=fam.model_type, hidden_size=hidden, num_experts=fam.num_experts(ckpt.config),
                         moe_layers=layers, chunk_tokens=1024)
    gen = torch.Generator().manual_seed(seed)
    for i in layers:
        writer.append(i, torch.randn(tokens, hidden, generator=gen), router_sha256=tensor_sha256(
            ckpt.load(fam.router_name(i))))
        writer.finish_layer(i)
    return Path(dump)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, help="experts' intermediate size (default: from --size)")
    ap.add_argument("--size", default="2GB", help="about this many bytes in all, when --intermediate is not given")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--upcycled", type=float, default=0.0)
    ap.add_argument("--dump", help="also write a calibration dump here")
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    path = write_synthetic(a.out, layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, experts=a.experts,
                           dtype=a.dtype, upcycled=a.upcycled, size=parse_size(a.size))
    if a.dump:
        write_synthetic_dump(path, a.dump, a.tokens)
    total = sum(f.stat().st_size for f in path.iterdir())
    inter = json.loads((path / "config.json").read_text())["intermediate_size"]
    print(f"wrote {path}: {total / 1e9:.2f} GB, intermediate size {inter}")


if __name__ == "__main__":
    main()
