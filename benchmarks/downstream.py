"""Do rewritten checkpoints load in llama.cpp and predict what transformers predicts?

    python benchmarks/downstream.py [--workdir ~/.cache/dern-stream/downstream] [--families mixtral ...]

Optional and slow (a llama.cpp build on first use); not part of the test suite. Steps:
1. llama.cpp, from the `llama-cpp-python` source package on PyPI (`pip download --no-binary :all:`),
   which vendors llama.cpp with its converter (convert_hf_to_gguf.py, gguf-py). Only the `llama`
   shared library is built (CPU, one job, `nice -n 19`); the Python bindings are used from the
   unpacked source with LLAMA_CPP_LIB_PATH pointing at that library. Everything lands under
   WORKDIR/llama.cpp and a second run reuses it.
2. For each case (CASES: Mixtral, Qwen2-MoE, DeepSeek-V3 with groups kept and with groups collapsed, DeepSeek-V3
   with compressed-tensors int4 experts, dots.llm1):
   a tiny random checkpoint (dern_stream.tiny_models builders, with a GPT-2-style byte-level BPE
   tokenizer), a calibration dump of text, and a DERN rewrite to half the experts.
3. The original and the rewrite are converted with `convert_hf_to_gguf.py --outtype f32` (f32: the
   comparison measures the mapping, not quantization) and one fixed token sequence is scored by
   llama.cpp (all logits, f32 KV cache) and by transformers (float32): max |logit difference|, top-1
   agreement and the perplexity of each. Pass: perplexities within 0.04% and top-1 agreement >= 99%.
   The original is the baseline (a failure there is the converter's or llama.cpp's, not the
   rewrite's); a control run of the rewrite's GGUF with one expert per token must fail, which shows
   the check can see a routing difference.
Exit status 0 when everything passes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-python"


# --- llama.cpp -----------------------------------------------------------------------------------
def _run(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run `cmd`, its output appended to `log`; on failure, show the log's tail and stop."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        done = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if done.returncode:
        tail = log.read_text().splitlines()[-40:]
        sys.exit("\n".join(tail) + f"\nfailed (exit {done.returncode}): {' '.join(map(str, cmd))}  (log: {log})")


def llama_source(work: Path, version: str | None) -> Path:
    """The unpacked llama-cpp-python sdist under WORK (downloaded once)."""
    found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found and version is None:
        return found[-1].parents[2]
    spec = PACKAGE if version is None else f"{PACKAGE}=={version}"
    _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec, "-d", work / "sdist"],
         work / "download.log")
    archives = sorted((work / "sdist").glob("llama_cpp_python-*.tar.gz"))
    archive = archives[-1] if version is None else work / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return work / archive.name.removesuffix(".tar.gz")


def build_llama(source: Path) -> tuple[Path, float, bool]:
    """Build the llama shared library (CPU, one job) once; return its folder, the build's seconds and whether
    it was built by an earlier run."""
    build = source / "build"
    lib = build / "bin"
    stamp = build / ".built"
    if stamp.exists():
        return lib, float(stamp.read_text()), True
    start = time.monotonic()
    build.mkdir(exist_ok=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="1")
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_BLAS=OFF", "-DGGML_OPENMP=OFF",
             "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
    log = build / "build.log"
    _run(["nice", "-n", "19", "cmake", "-S", source / "vendor/llama.cpp", "-B", build, *flags], log, env)
    _run(["nice", "-n", "19", "cmake", "--build", build, "--target", "llama", "-j", "1"], log, env)
    seconds = time.monotonic() - start
    stamp.write_text(f"{seconds:.0f}\n")
    return lib, seconds, False



# The converter names a BPE tokenizer's pre-tokenizer by hashing how it encodes a fixed text and comparing
# with the tokenizers of published models (get_vocab_base_pre), so a freshly trained tokenizer is never
# recognised, whatever its kind. Ours is GPT-2's kind (byte-level, GPT-2's split regex), so an unrecognised
# hash is mapped to llama.cpp's "gpt-2" pre-tokenizer, and nothing else is changed. Both sides are given
# token ids, never text, so the tokenizer cannot move the comparison.
CONVERT = """
import runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.path.insert(0, str(script.parent / "gguf-py"))
sys.path.insert(0, str(script.parent))
from conversion import base
recognised = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        if type(tokenizer.backend_tokenizer.pre_tokenizer).__name__ != "ByteLevel":
            raise
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [str(script), *sys.argv[2:]]
runpy.run_path(str(script), run_name="__main__")
"""

# Runs in its own process: llama.cpp aborts the process on a failed GGML_ASSERT (a config it refuses).
# A fourth argument overrides the GGUF's experts per token (the control run).
LLAMA_EVAL = """
import json, sys
import numpy as np
from llama_cpp import Llama, GGML_TYPE_F32
gguf, tokens_file, out = sys.argv[1:4]
tokens = np.load(tokens_file).tolist()
n = len(tokens)
overrides = None
if len(sys.argv) > 4:
    arch = Llama(gguf, vocab_only=True, verbose=False).metadata["general.architecture"]
    overrides = {arch + ".expert_used_count": int(sys.argv[4])}
llm = Llama(gguf, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=1, n_threads_batch=1, logits_all=True,
            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, kv_overrides=overrides, verbose=False)
llm.eval(tokens)
np.save(out, np.array(llm.scores[:n], dtype=np.float32))
meta = {k: v for k, v in llm.metadata.items() if ".expert" in k or k == "general.architecture"}
print(json.dumps(meta))
"""


# --- models ---------------------------------------------------------------------------------------
VOCAB = 384
# Weights drawn 10x wider than transformers' default 0.02, so the logits spread (std about 1.6, not 0.16): at
# 0.02 a random model's perplexity sits at the vocabulary size and hardly moves, and routing every token to
# one expert instead of two moved it by only 0.01-0.05%, about the tolerance (top-1 agreement still saw it).
INIT_RANGE = 0.2
SEQ = 128  # the tiny models' max_position_embeddings
# Sizes llama.cpp accepts. DeepSeek: the converter splits kv_b_proj into num_key_value_heads heads (in
# DeepSeek's releases num_key_value_heads == num_attention_heads); the test config's 2 KV heads for 4 heads,
# which transformers' MLA ignores, make it fail an assertion, so the heads are made equal here.
# "deepseek_v3-4groups" has 2 experts per group, so at half the experts its groups collapse (docs/formats.md,
# "Family rules"), where "deepseek_v3" keeps 2 groups of 2.
_DEEPSEEK = {"num_key_value_heads": 4}
_LFM2 = {"tie_word_embeddings": True}  # as LFM2's releases are: the converter maps no separate lm_head
# "deepseek_v3-int4": the original stored as Kimi-K2-Thinking stores its experts (compressed-tensors pack-quantized
# int4, groups of 32), rewritten in that format; "dots1" and "lfm2_moe": families added in 2026 that llama.cpp has
# (dots1's loader, too, wants as many KV heads as attention heads).
CASES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {}), "qwen2_moe": ("qwen2_moe", {}), "deepseek_v3": ("deepseek_v3", _DEEPSEEK),
    "deepseek_v3-4groups": ("deepseek_v3", {**_DEEPSEEK, "n_group": 4, "topk_group": 2}),
    "deepseek_v3-int4": ("deepseek_v3", _DEEPSEEK), "dots1": ("dots1", _DEEPSEEK), "lfm2_moe": ("lfm2_moe", _LFM2)}
COMPRESSED_CASES = ("deepseek_v3-int4",)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "n_group",
               "topk_group", "n_shared_experts", "scoring_func", "topk_method", "norm_topk_prob")


def gpt2_tokenizer(text: str, vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer trained on `text` (id 0: <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def make_models(case: str, root: Path) -> tuple[Path, Path, Path, list[int]]:
    """ROOT/original (random checkpoint of `case` with a GPT-2-style tokenizer), ROOT/calib.zarr (its dump
    of calibration text) and ROOT/rewritten (DERN, half the experts); and the evaluation tokens."""
    import dern_stream
    from dern_stream.tiny_models import FAMILY_CONFIGS, build_model, example_text, save_model

    if root.exists():
        shutil.rmtree(root)  # this script's own earlier output
    root.mkdir(parents=True)
    corpus, heldout = example_text(20000, seed=1), example_text(3000, seed=2)
    (root / "corpus.txt").write_text(corpus)
    tokenizer = gpt2_tokenizer(corpus, VOCAB)
    family, overrides = CASES[case]
    model = build_model(family, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, initializer_range=INIT_RANGE,
                        **overrides)
    original = save_model(model, root / "original")
    tokenizer.save_pretrained(original)
    if case in COMPRESSED_CASES:
        from dern_stream.tiny_models import save_compressed_copy

        original = save_compressed_copy(original, root / "original-int4")
    experts = next(FAMILY_CONFIGS[family][k] for k in ("num_local_experts", "num_experts", "n_routed_experts")
                   if k in FAMILY_CONFIGS[family])
    calib = root / "calib.zarr"
    dern_stream.dump(original, calib, text=root / "corpus.txt", num_tokens=8192, seq_len=SEQ, progress=False)
    rewritten = root / "rewritten"
    dern_stream.rewrite(original, rewritten, experts=experts // 2, calib=calib, progress=False)
    tokens = tokenizer(heldout)["input_ids"][:SEQ]
    return original, rewritten, calib, tokens


def transformers_logits(checkpoint: Path, tokens: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _last_error(text: str) -> str:
    """The line that says why a converter or llama.cpp run failed."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "GGML_ASSERT" in line or "error" in line.lower() or line.split(":")[0].endswith(("Error", "Exception")):
            return line[:200]
    return lines[-1][:200] if lines else "(no output)"


def convert(source: Path, checkpoint: Path, gguf: Path, log: Path) -> str | None:
    """convert_hf_to_gguf.py --outtype f32; None when it worked, else why not."""
    cmd = [sys.executable, "-c", CONVERT, source / "vendor/llama.cpp/convert_hf_to_gguf.py", checkpoint,
           "--outtype", "f32", "--outfile", gguf]
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    return None if done.returncode == 0 and gguf.exists() else f"converter: {_last_error(done.stderr)}"


def llama_logits(source: Path, lib: Path, gguf: Path, tokens: list[int], work: Path, top_k: int | None = None):
    """(logits [n, vocab], the GGUF's expert metadata) from llama.cpp, or (None, why not). `top_k`: experts
    per token instead of the GGUF's."""
    import json

    import numpy as np

    np.save(work / "tokens.npy", np.array(tokens, dtype=np.int64))
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib), PYTHONPATH=str(source))
    cmd = [sys.executable, "-c", LLAMA_EVAL, gguf, work / "tokens.npy", work / "llama_logits.npy"]
    cmd += [] if top_k is None else [top_k]
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env)
    (work / "llama.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        return None, f"llama.cpp (exit {done.returncode}): {_last_error(done.stderr)}"
    return np.load(work / "llama_logits.npy"), json.loads(done.stdout.strip().splitlines()[-1])


def compare(reference, candidate, tokens: list[int]) -> dict:
    """Max |logit difference|, top-1 agreement and the perplexity of each on `tokens` (next-token)."""
    import numpy as np

    def perplexity(logits) -> float:
        logits = logits[:-1].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        return float(np.exp(-logp[np.arange(len(tokens) - 1), tokens[1:]].mean()))

    ppl_ref, ppl_cand = perplexity(reference), perplexity(candidate)
    return {"max_abs_diff": float(np.abs(reference - candidate).max()),
            "top1": float((reference.argmax(1) == candidate.argmax(1)).mean()),
            "ppl_hf": ppl_ref, "ppl_llama": ppl_cand, "ppl_rel_pct": 100 * (ppl_cand - ppl_ref) / ppl_ref}


PPL_TOLERANCE_PCT = 0.04
TOP1_MIN = 0.99


def evaluate(name: str, checkpoint: Path, source: Path, lib: Path, tokens: list[int], work: Path,
             gguf: Path | None = None, top_k: int | None = None) -> dict:
    """Convert `checkpoint` (unless `gguf` is given) and compare llama.cpp's logits with transformers'."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    row = {"model": name, "config": {k: config[k] for k in EXPERT_KEYS if k in config}}
    if top_k is not None:
        row["config"]["num_experts_per_tok"] = top_k  # as llama.cpp ran it
    start = time.monotonic()
    error = None
    if gguf is None:
        gguf = work / f"{name}-f32.gguf"
        error = convert(source, checkpoint, gguf, work / "convert.log")
    row["gguf_path"] = str(gguf)
    if error is None:
        logits, meta = llama_logits(source, lib, gguf, tokens, work, top_k)
        if logits is None:
            error = meta
        else:
            row["gguf"] = meta
            row.update(compare(transformers_logits(checkpoint, tokens), logits, tokens))
            row["pass"] = abs(row["ppl_rel_pct"]) <= PPL_TOLERANCE_PCT and row["top1"] >= TOP1_MIN
    if error is not None:
        row.update(error=error, **{"pass": False})
    row["seconds"] = time.monotonic() - start
    return row


# --- report ---------------------------------------------------------------------------------------
def _experts(row: dict) -> str:
    c = row["config"]
    n = next((c[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in c), "?")
    groups = f", groups {c['n_group']}/{c['topk_group']}" if "n_group" in c else ""
    return f"{n} top-{c.get('num_experts_per_tok', '?')}{groups}"


def table(rows: list[dict]) -> str:
    head = ("| case | model | experts | max abs logit diff | top-1 agree | ppl transformers | ppl llama.cpp "
            "| ppl diff % | verdict |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        verdict = ("pass" if r["pass"] else "FAIL") if "control" not in r["model"] else \
            ("detected" if not r["pass"] else "MISSED")
        if "error" in r:
            lines.append(f"| {r['case']} | {r['model']} | {_experts(r)} | - | - | - | - | - | FAIL: {r['error']} |")
            continue
        lines.append(f"| {r['case']} | {r['model']} | {_experts(r)} | {r['max_abs_diff']:.2e} | "
                     f"{100 * r['top1']:.1f}% | {r['ppl_hf']:.4f} | {r['ppl_llama']:.4f} | "
                     f"{r['ppl_rel_pct']:+.5f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache/dern-stream/downstream")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--llama-cpp-python", dest="version", help="sdist version (default: newest on PyPI)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)
    work = args.workdir.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    source = llama_source(work, args.version)
    lib, built, cached = build_llama(source)
    print(f"llama.cpp: {source.name}, library in {lib} (build {built:.0f} s{', by an earlier run' if cached else ''})",
          flush=True)
    if args.build_only:
        return 0
    sys.path.insert(0, str(REPO))
    rows = []
    for case in args.cases:
        t0 = time.monotonic()
        original, rewritten, _, tokens = make_models(case, work / "runs" / case)
        made = time.monotonic() - t0
        for name, checkpoint in (("original", original), ("rewritten", rewritten)):
            row = evaluate(name, checkpoint, source, lib, tokens, work / "runs" / case / f"{name}-gguf")
            rows.append({"case": case, **row})
            print(f"{case} {name}: {'error: ' + row['error'] if 'error' in row else 'done'} "
                  f"({row['seconds']:.0f} s; models, dump and rewrite {made:.0f} s)", flush=True)
        if "error" not in row:
            # Control: the same GGUF with one expert per token must fail the check, else it is blind.
            rows.append({"case": case, **evaluate("control: top-1 routing", rewritten, source, lib, tokens,
                                                  work / "runs" / case / "control", Path(row["gguf_path"]), 1)})
    print()
    print(table(rows))
    print(f"\n{len(tokens)} tokens; pass: |ppl diff| <= {PPL_TOLERANCE_PCT}% and top-1 agreement >= "
          f"{100 * TOP1_MIN:.0f}%. Configs of the rewrites:")
    for r in rows:
        if r["model"] == "rewritten":
            print(f"  {r['case']}: {json.dumps(r['config'])}  gguf: {json.dumps(r.get('gguf', {}))}")
    blind = [r for r in rows if "control" in r["model"] and (r["pass"] or "error" in r)]
    checks = [r for r in rows if "control" not in r["model"]]
    failures = [r for r in checks if not r["pass"]]
    rewrite_only = [r for r in failures if r["model"] == "rewritten" and not any(
        o["case"] == r["case"] and o["model"] == "original" and not o["pass"] for o in checks)]
    verdict = (f"FAIL: {len(rewrite_only)} rewrite(s) fail where the original passes" if rewrite_only else
               "FAIL: the originals fail too (a converter or llama.cpp limitation, not the rewrite)" if failures else
               f"INCONCLUSIVE: {len(blind)} control(s) passed or did not run, so the check may be blind" if blind
               else "PASS")
    print(f"\nverdict: {verdict}; build {built:.0f} s{' (earlier run)' if cached else ''}, "
          f"total {time.monotonic() - start:.0f} s")
    if args.json:
        kept = [{k: v for k, v in r.items() if k != "gguf_path"} for r in rows]
        record = {"llama_cpp_python": source.name, "build_s": built, "rows": kept}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if not failures and not blind else 1


if __name__ == "__main__":
    sys.exit(main())
