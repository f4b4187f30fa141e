"""Tiny random MoE checkpoints built with transformers' own classes, for tests and the quick start.

    python -m dern_stream.tiny_models DIR [--family mixtral]   # DIR/model, DIR/corpus.txt, DIR/heldout.txt

Needs the `dump` or `test` extra (transformers); the rewrite itself never imports this module.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from .families import FAMILIES

# vocab_size: the byte-level tokenizer's 256 bytes and 3 special tokens, and 125 merges (build_tokenizer).
_COMMON = dict(vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=False)
# Each family's own tiny config (its record: families/catalog/), for the families transformers builds.
FAMILY_CONFIGS: dict[str, dict] = {f.model_type: dict(f.tiny_config) for f in FAMILIES.values() if not f.remote_code}


def build_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised transformers causal LM of `family` (model_type): a multimodal model where the family is
    one (its language model's config takes the shared sizes and `overrides`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMultimodalLM

    from .checkpoint.config_view import lookup, text_section

    common = dict(_COMMON)
    if FAMILIES[family].layers_key != "num_hidden_layers":  # (LongCat-Flash derives num_hidden_layers from its own)
        common[FAMILIES[family].layers_key] = common.pop("num_hidden_layers")
    own = FAMILY_CONFIGS[family]
    composite = FAMILIES[family].multimodal
    if composite:  # (the shared sizes and the overrides go to its language model's section)
        own, section = copy.deepcopy(own), text_section(own)
        text = lookup(own, section)[1]
        text.update({**common, **text, **overrides})
        config = AutoConfig.for_model(family, **own, tie_word_embeddings=False)
    else:
        config = AutoConfig.for_model(family, **{**common, **own, **overrides})
    torch.manual_seed(seed)
    model = (AutoModelForMultimodalLM if composite else AutoModelForCausalLM).from_config(config).eval()
    if dtype != torch.float32:  # (as built: a cast would also drop the imaginary part of Llama 4's vision rotary)
        model = model.to(dtype)
    from .stream.executor import moe_router_weight

    with torch.no_grad():
        # Experts outside the language model's layers (Qwen3-Omni-MoE's talker): transformers leaves them uninitialised
        layers = FAMILIES[family].layers_in_memory + "."
        for name, tensor in model.named_parameters():
            if ".experts." in name and not name.startswith(layers):
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
        # Random inits leave routers near-uniform; widen them so experts differ in importance.
        for layer in model.get_submodule(FAMILIES[family].layers_in_memory):
            router = moe_router_weight(layer)
            if router is not None:
                router.normal_(0.0, 0.5)
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias", "router.bias")):
                tensor.normal_(0.0, 0.1)  # gpt-oss initialises them to zero; the tests need them to matter
            if name.endswith(("router.scale", "router.per_expert_scale", "pre_feedforward_layernorm_2.weight")):
                tensor.uniform_(0.5, 1.5)  # Gemma 4 initialises them to one; the tests need them to matter
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model


def save_model(model, path: str | Path, max_shard_size: str | None = None) -> Path:
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    extra = FAMILIES[model.config.model_type].tiny_config_extra
    if extra:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(extra)
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


DEEPSEEK_MOE_16B_CONFIG = FAMILIES["deepseek"].tiny_config  # its published config.json, scaled down


def save_deepseek_moe_16b(path: str | Path, *, seed: int = 0) -> Path:
    """A random checkpoint with DeepSeek-MoE-16B's on-disk layout (tensor names of its remote
    modeling_deepseek.py: Llama attention, a dense first layer, 64 routed experts + shared experts),
    scaled down. transformers has no class for it, so it is written tensor by tensor."""
    from safetensors.torch import save_file

    c = DEEPSEEK_MOE_16B_CONFIG
    d, h, dense, n = c["hidden_size"], c["moe_intermediate_size"], c["intermediate_size"], c["n_routed_experts"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)

    def mlp(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.gate_proj.weight": rand(width, d), f"{prefix}.up_proj.weight": rand(width, d),
                f"{prefix}.down_proj.weight": rand(d, width)}

    tensors = {"model.embed_tokens.weight": rand(c["vocab_size"], d), "model.norm.weight": rand(d, scale=1.0),
               "lm_head.weight": rand(c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors.update({f"{p}.input_layernorm.weight": rand(d, scale=1.0),
                        f"{p}.post_attention_layernorm.weight": rand(d, scale=1.0),
                        **{f"{p}.self_attn.{x}_proj.weight": rand(d, d) for x in "qkvo"}})
        if i < c["first_k_dense_replace"]:
            tensors.update(mlp(f"{p}.mlp", dense))
            continue
        tensors[f"{p}.mlp.gate.weight"] = rand(n, d, scale=0.5)
        tensors.update(mlp(f"{p}.mlp.shared_experts", h * c["n_shared_experts"]))
        for e in range(n):
            tensors.update(mlp(f"{p}.mlp.experts.{e}", h))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    return path


FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [128, 128]}


def save_fp8_copy(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128),
                  **quantization) -> Path:
    """`src` with its linear projections stored as DeepSeek-V3's FP8 release stores them: float8_e4m3fn weights
    and float32 `weight_scale_inv` per 128x128 block, declared in quantization_config. Embeddings, norms,
    routers, biases and lm_head stay as they were (which is what those releases leave unquantized). `block`
    and `quantization` (e.g. scale_fmt="ue8m0") change the quantization_config written."""
    from .checkpoint import Checkpoint
    from .storage import quantize
    from .storage.formats import SCALE_SUFFIX

    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    config_entry = {**FP8_QUANTIZATION_CONFIG, "weight_block_size": list(block), **quantization}
    pow2 = quantization.get("scale_fmt") == "ue8m0"
    tensors = {}
    for name in ckpt.entries:
        tensor = ckpt.load(name)
        if name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")) and tensor.dim() == 2:
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize(tensor, block, pow2_scales=pow2)
        else:
            tensors[name] = tensor
    return _quantized_copy(src, dst, tensors, config_entry)


def save_compressed_copy(src: str | Path, dst: str | Path, fmt=None, plain=()) -> Path:
    """`src` with its routed experts stored as compressed-tensors stores them (by default Kimi-K2-Thinking's
    pack-quantized int4, symmetric, groups of 32; `fmt` a storage.formats.CompressedWeights), every other Linear
    module named in the config's `ignore` list and left as it was, as that release does. `plain`: (layer, expert)
    pairs left unquantized too, each projection named in `ignore` (as llm-compressor names the experts it skips)."""
    from .checkpoint import Checkpoint
    from .families import family_for
    from .storage.compressed_tensors import compress
    from .storage.formats import CompressedWeights

    fmt = fmt or CompressedWeights("pack-quantized", 4, "int", True, "group", 32)
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    family, plain = family_for(ckpt.config), set(plain)
    experts = {family.expert_name(i, e, p) for i in family.moe_layers(ckpt.entries)
               for e in range(family.num_experts(ckpt.config)) for p in ("gate", "up", "down") if (i, e) not in plain}
    tensors, ignore = {}, []
    for name in ckpt.entries:
        tensor = ckpt.load(name)
        if name in experts:
            scale = torch.float8_e4m3fn if fmt.format == "nvfp4-pack-quantized" else tensor.dtype
            stored = compress(fmt, tensor, {"weight_scale": scale, "weight_shape": torch.int32})
            if fmt.input_scale:  # NVFP4 W4A4: the activations' global scale, as calibration leaves one
                stored["input_global_scale"] = torch.tensor([448.0 * 6.0], dtype=torch.float32)
            tensors.update(zip(fmt.names(name), (stored[p] for p in fmt.params), strict=True))
            continue
        tensors[name] = tensor
        if name.endswith(".weight") and tensor.dim() == 2 and not name.endswith("embed_tokens.weight"):
            ignore.append(name[:-len(".weight")])  # (lm_head among them)
    return _quantized_copy(src, dst, tensors, {
        "quant_method": "compressed-tensors", "format": fmt.format, "quantization_status": "compressed",
        "config_groups": {"group_0": {**fmt.scheme(), "output_activations": None, "format": fmt.format,
                                      "input_activations": {**fmt.scheme()["weights"], "dynamic": False}
                                      if fmt.input_scale else None}},
        "ignore": ignore, "kv_cache_scheme": None})


def save_mxfp4_copy(src: str | Path, dst: str | Path) -> Path:
    """A gpt-oss checkpoint `src` with its experts stored as OpenAI's release stores them: MXFP4
    `*_blocks` [N, rows, cols / 32, 16] and `*_scales` [N, rows, cols / 32] of the transposed projections
    (gate_up [N, 2h, d], down [N, d, h]), declared `quant_method: mxfp4`; biases and the rest as they were."""
    from .checkpoint import Checkpoint
    from .storage import mxfp4
    from .storage.formats import MXFP4_BLOCKS, MXFP4_SCALES

    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    tensors = {}
    for name in ckpt.entries:
        tensor = ckpt.load(name)
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = mxfp4.quantize(tensor.transpose(1, 2))
            tensors[name + MXFP4_BLOCKS], tensors[name + MXFP4_SCALES] = blocks, scales
        else:
            tensors[name] = tensor
    return _quantized_copy(src, dst, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


def _quantized_copy(src: Path, dst: Path, tensors: dict, quantization_config: dict) -> Path:
    """DST: SRC's side files (config, tokenizer...), `tensors` in one shard, and config.json declaring
    `quantization_config`."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa", "gu", "he", "ji", "vo", "ze", "xu")


def example_text(words: int, seed: int = 0) -> str:
    """Deterministic pseudo-text in three 'domains' with their own vocabularies (so that routing has
    something to tell apart), in lines and paragraphs."""
    import random

    rng = random.Random(seed)
    domains = [[rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(("", "n", "s")) for _ in range(60)]
               for _ in range(3)]
    lines, line, domain = [], [], domains[0]
    for n in range(words):
        if n % 200 == 0:
            domain = rng.choice(domains)
        line.append(rng.choice(domain))
        if len(line) == 12:
            lines.append(" ".join(line) + ".")
            line = []
            if rng.random() < 0.2:
                lines.append("")
    return "\n".join(lines) + "\n"


def build_tokenizer(text: str, vocab_size: int):
    """A small byte-level BPE tokenizer (GPT-2's scheme) trained on `text`, as transformers loads it:
    <unk>, <s>, </s> = ids 0, 1, 2, then all 256 bytes, so that any text encodes and decodes back
    unchanged (<unk> never occurs), then merges up to `vocab_size` (at least 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    # No clean-up of spaces before punctuation on decoding: the text comes back as it was.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


def calibration_tokens(vocab_size: int = _COMMON["vocab_size"], sequences: int = 8, length: int = 32,
                       seed: int = 1) -> torch.Tensor:
    """The random token ids the example dumps are made from (ids 0-2 are special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (sequences, length), generator=gen)


def build_example(directory: str | Path, family: str = "mixtral", *, seed: int = 0,
                  dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                  chunk_tokens: int = 64, **overrides) -> tuple[Path, Path]:
    """DIR/model (checkpoint) and DIR/calib.zarr (its dump). Returns both paths."""
    from .calib import dump_from_model

    directory = Path(directory)
    model = build_model(family, seed=seed, dtype=dtype, **overrides)
    model_dir = save_model(model, directory / "model", max_shard_size)
    vocab_size = model.config.get_text_config().vocab_size
    write_texts(directory, vocab_size, model_dir)
    calib = directory / "calib.zarr"
    ids = calibration_tokens(vocab_size)
    dump_from_model(model, ids, calib, chunk_tokens=chunk_tokens, overwrite=True)
    return model_dir, calib


def write_texts(directory: Path, vocab_size: int, model_dir: Path) -> None:
    """DIR/corpus.txt (calibration), DIR/heldout.txt (evaluation) and the tokenizer in `model_dir`."""
    corpus, heldout = example_text(20000, seed=1), example_text(6000, seed=2)
    (directory / "corpus.txt").write_text(corpus)
    (directory / "heldout.txt").write_text(heldout)
    build_tokenizer(corpus, vocab_size).save_pretrained(model_dir)


def build_demo(directory: str | Path, family: str = "mixtral") -> Path:
    """What `python -m dern_stream.tiny_models DIR` builds: DIR/model (with its tokenizer), DIR/corpus.txt
    and DIR/heldout.txt. Returns DIR/model."""
    directory = Path(directory)
    model = build_model(family)
    model_dir = save_model(model, directory / "model")
    write_texts(directory, model.config.get_text_config().vocab_size, model_dir)
    return model_dir


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--family", default="mixtral", choices=sorted(FAMILY_CONFIGS))
    args = parser.parse_args()
    directory = Path(args.directory)
    model_dir = build_demo(directory, args.family)
    print(f"checkpoint (with tokenizer): {model_dir}\ntexts: {directory / 'corpus.txt'}, {directory / 'heldout.txt'}")


if __name__ == "__main__":
    _main()
