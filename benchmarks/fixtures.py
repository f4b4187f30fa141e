"""Real, small, trained MoE checkpoints for the quality benchmark, built offline on the CPU.

    python benchmarks/fixtures.py [--root benchmarks/.fixtures] [--only mixtral-scratch]

Builds, once, and reuses afterwards (each step is cached under ROOT and skipped when present):
- a multi-domain corpus from text this machine has or can install: English, German, French and
  Spanish/Italian manual pages (Debian `man-db` plus `manpages-de manpages-fr manpages-es
  manpages-it`), Python sources (the standard library) and C headers (/usr/include). Files are split
  by a hash of their path into train (90%), calib (5%) and heldout (5%): the held-out split is never
  seen by training or calibration;
- a byte-level BPE tokenizer (4096 tokens) trained on the train split;
- four models trained with transformers on the train split (fixed seeds and step counts):
  `mixtral-scratch` (Mixtral-style, 8 experts top-2, from scratch), `qwen2moe-scratch`
  (Qwen2-MoE-style, 16 experts top-4 plus a shared expert, from scratch), `mixtral-upcycled`
  (a dense model trained first, its FFN copied into all 8 experts, then trained as an MoE) and
  `deepseek-scratch` (DeepSeek-V3-style: 16 fine-grained experts top-4 chosen by sigmoid scores in 4 groups of
  which 2 are used, a shared expert, a dense first layer, balanced by its score-correction bias).

Each takes about 10-15 minutes on 2 CPU cores. Output: ROOT/corpus/{train,calib,heldout}.txt,
ROOT/tokenizer/, ROOT/<name>/model (a checkpoint with the tokenizer) and ROOT/<name>/train.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent / ".fixtures"
VOCAB = 4096
SEQ_LEN = 256
DOMAIN_CHARS = 2_500_000  # per domain, so that no language or code dominates
DEBIAN_PACKAGES = "manpages-de manpages-fr manpages-es manpages-it"


# --- corpus ------------------------------------------------------------------------------------
def _man_pages(lang: str | None) -> list[Path]:
    base = Path("/usr/share/man")
    root = base / lang if lang else base
    sections = sorted(p for p in root.glob("man[1-8]") if p.is_dir())
    return sorted(f for s in sections for f in s.glob("*.gz"))


_GROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\*?\((..)"), ""),  # special characters and strings \(co \*(Tm
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^ 0~:c%]"), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
]


def _groff_to_text(source: str) -> str:
    """Man page source -> plain text: comments and layout requests dropped, macro arguments kept."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or len(parts) == 1 or parts[0] in {"ds", "de", "nr", "so", "ta", "tr", "if", "ie", "el"}:
                continue
            line = parts[1].replace('"', "")
        for pattern, repl in _GROFF_ESCAPES:
            line = pattern.sub(repl, line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_man(path: Path) -> str:
    try:
        return _groff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
    except (OSError, EOFError):
        return ""


def _read_plain(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _domains() -> dict[str, tuple[list[Path], callable]]:
    py = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return {
        "english": (_man_pages(None), _read_man),
        "german": (_man_pages("de"), _read_man),
        "french": (_man_pages("fr"), _read_man),
        "spanish-italian": (_man_pages("es") + _man_pages("it"), _read_man),
        "python": (sorted(p for p in py.rglob("*.py") if "site-packages" not in p.parts), _read_plain),
        "c": (sorted(Path("/usr/include").rglob("*.h")), _read_plain),
    }


def _split_of(path: Path) -> str:
    bucket = int(hashlib.sha256(str(path).encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < 5 else "calib" if bucket < 10 else "train"


def build_corpus(root: Path) -> Path:
    """ROOT/corpus/{train,calib,heldout}.txt; documents separated by a blank line and a form feed."""
    out = root / "corpus"
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts = {"train": [], "calib": [], "heldout": []}
    manifest = {"domains": {}, "debian_packages": DEBIAN_PACKAGES}
    for name, (files, read) in _domains().items():
        if len(files) < 20:
            raise SystemExit(f"corpus domain {name!r} has only {len(files)} files here; "
                             f"install them with: apt-get install {DEBIAN_PACKAGES}")
        used = {"train": 0, "calib": 0, "heldout": 0}
        budget = {"train": DOMAIN_CHARS * 0.9, "calib": DOMAIN_CHARS * 0.05, "heldout": DOMAIN_CHARS * 0.05}
        for path in files:
            split = _split_of(path)
            if used[split] >= budget[split]:
                continue
            text = read(path)
            if len(text) < 200:
                continue
            text = text[:40_000]  # long files would crowd out the rest of the domain
            texts[split].append(text)
            used[split] += len(text)
        manifest["domains"][name] = {"files": len(files), "chars": used}
    for split, docs in texts.items():
        (out / f"{split}.txt").write_text("\n\f\n".join(docs) + "\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def documents(path: Path) -> list[str]:
    return [d.strip("\n") for d in path.read_text().split("\n\f\n") if d.strip()]


# --- tokenizer ---------------------------------------------------------------------------------
def build_tokenizer(root: Path, corpus: Path):
    from transformers import PreTrainedTokenizerFast

    out = root / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(documents(corpus / "train.txt"), trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream, each starting with BOS and ending with EOS."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


# --- models ------------------------------------------------------------------------------------
_BASE = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=SEQ_LEN, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
             rope_theta=10000.0)


@dataclass
class Recipe:
    name: str
    model_type: str
    config: dict
    steps: int
    dense_steps: int = 0  # > 0: upcycled from a dense model trained this many steps first
    batch: int = 16
    lr: float = 3e-3
    seed: int = 0
    extra: dict = field(default_factory=dict)


RECIPES = {
    r.name: r for r in (
        Recipe("mixtral-scratch", "mixtral",
               dict(_BASE, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                    output_router_logits=True, router_aux_loss_coef=0.01), steps=1000),
        Recipe("qwen2moe-scratch", "qwen2_moe",
               dict(_BASE, moe_intermediate_size=128, intermediate_size=512, shared_expert_intermediate_size=256,
                    num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
                    output_router_logits=True, router_aux_loss_coef=0.01), steps=1000),
        Recipe("mixtral-upcycled", "mixtral",
               dict(_BASE, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                    output_router_logits=True, router_aux_loss_coef=0.01), steps=600, dense_steps=500),
        # DeepSeek-V3-style: fine-grained experts with sigmoid routing in groups, a shared expert, a dense first
        # layer, MLA attention; balanced without an auxiliary loss, by its score-correction bias (_BiasBalancer).
        Recipe("deepseek-scratch", "deepseek_v3",
               dict(_BASE, moe_intermediate_size=64, intermediate_size=512, n_routed_experts=16,
                    num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                    routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=64, kv_lora_rank=32,
                    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, head_dim=16), steps=400),
    )
}


def _batches(stream: torch.Tensor, batch: int, seed: int):
    """Endless random windows of SEQ_LEN tokens (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, stream.numel() - SEQ_LEN - 1, (batch,), generator=gen)
        yield torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()])


class _BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: after every step, each router's score-correction bias moves by
    `rate` towards the experts chosen less than average (up for them, down for the others)."""

    def __init__(self, model, rate: float = 1e-3):
        self.rate, self.gates, self.loads, self.hooks = rate, [], {}, []
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if hasattr(gate, "e_score_correction_bias"):
                self.gates.append(gate)
                self.hooks.append(gate.register_forward_hook(self._count))

    def _count(self, gate, _args, out) -> None:
        idx = out[2]
        self.loads[gate] = self.loads.get(gate, 0) + torch.bincount(idx.reshape(-1), minlength=gate.num_experts)

    def step(self) -> None:
        with torch.no_grad():
            for gate in self.gates:
                load = self.loads.pop(gate, None)
                if load is not None:
                    gate.e_score_correction_bias += self.rate * torch.sign(load.float().mean() - load.float())

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _train(model, stream: torch.Tensor, steps: int, batch: int, lr: float, seed: int, label: str) -> list[float]:
    """AdamW with warmup and cosine decay; returns the loss every 50 steps."""
    balancer = _BiasBalancer(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses, start = [], time.perf_counter()
    for step, ids in zip(range(steps), _batches(stream, batch, seed), strict=False):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        balancer.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
            print(f"  {label} step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    balancer.close()
    model.eval()
    return losses


def _dense_config(recipe: Recipe) -> dict:
    keep = {k: v for k, v in recipe.config.items()
            if k not in {"num_local_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef"}}
    return keep


def _upcycle(dense, moe) -> None:
    """Copy the dense model into the MoE: every expert gets the dense FFN, the router starts small."""
    moe_state = moe.state_dict()
    dense_state = dense.state_dict()
    with torch.no_grad():
        for name, value in dense_state.items():
            if ".mlp." in name:
                continue
            moe_state[name].copy_(value)
        for i in range(dense.config.num_hidden_layers):
            mlp = dense.model.layers[i].mlp
            experts = moe.model.layers[i].mlp.experts
            experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).expand_as(
                experts.gate_up_proj))
            experts.down_proj.copy_(mlp.down_proj.weight.expand_as(experts.down_proj))
            moe.model.layers[i].mlp.gate.weight.normal_(0.0, 0.02)


def build_model(root: Path, recipe: Recipe, tokenizer, train_ids: torch.Tensor) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dern_stream.tiny_models import save_model

    out = root / recipe.name
    if (out / "train.json").exists():
        return out / "model"
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    record: dict = {"recipe": {k: v for k, v in recipe.__dict__.items()}}
    config = AutoConfig.for_model(recipe.model_type, **recipe.config)
    model = AutoModelForCausalLM.from_config(config)
    if recipe.dense_steps:
        dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("mistral", **_dense_config(recipe)))
        record["dense_losses"] = _train(dense, train_ids, recipe.dense_steps, recipe.batch, recipe.lr, recipe.seed,
                                        f"{recipe.name} (dense)")
        _upcycle(dense, model)
        del dense
        # The upcycled phase continues a trained model: lower peak rate, as upcycling recipes do.
        lr = recipe.lr / 3
    else:
        lr = recipe.lr
    record["losses"] = _train(model, train_ids, recipe.steps, recipe.batch, lr, recipe.seed + 1, recipe.name)
    model.config.output_router_logits = False
    model_dir = save_model(model, out / "model")
    if recipe.model_type == "deepseek_v3":  # what vLLM and this tool's loaders read beside DeepseekV3Config's keys
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg.update(scoring_func="sigmoid", topk_method="noaux_tc")
        (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer.save_pretrained(model_dir)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return model_dir


def build_all(root: Path = ROOT, only: list[str] | None = None) -> dict[str, Path]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = build_corpus(root)
    tokenizer = build_tokenizer(root, corpus)
    train_ids = None
    paths = {}
    for name, recipe in RECIPES.items():
        if only and name not in only:
            continue
        if not (root / name / "train.json").exists() and train_ids is None:
            train_ids = token_stream(tokenizer, documents(corpus / "train.txt"))
            print(f"train split: {train_ids.numel()} tokens", flush=True)
        paths[name] = build_model(root, recipe, tokenizer, train_ids)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--only", nargs="*", choices=sorted(RECIPES))
    args = parser.parse_args()
    for name, path in build_all(args.root, args.only).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
