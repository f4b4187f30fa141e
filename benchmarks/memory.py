"""Peak host memory of a rewrite (or a dump) against one layer, the whole checkpoint, and the load-everything approach.

    python benchmarks/memory.py [--layers 12 24] [--hidden 1024] [--intermediate 512] [--experts 64]
    python benchmarks/memory.py --job dump [--dump-tokens 8192]

For each layer count: writes a synthetic bf16 Mixtral-layout checkpoint (upcycled experts, so DERN
reassigns and clusters) and a calibration dump, then runs in fresh processes (a) `dern_stream.rewrite`
to half the experts and (b) transformers `from_pretrained` + drop experts + `save_pretrained`.
Prints each one's peak RSS (VmHWM) and peak anonymous RSS (sampled every 5 ms), and the ratios.

With `--job dump` the same comparison is made for the calibration dump: the streamed
`dern_stream.dump` (one decoder layer materialised at a time) against `from_pretrained` +
`dump_from_model` (the whole model in memory), on the same random token ids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dern_stream.synthetic import write_synthetic, write_synthetic_dump

# Runs in the measured child process: a sampler thread tracks RssAnon, VmHWM is the kernel's exact peak.
_CHILD = r"""
import json, sys, threading, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmHWM", "RssAnon"):
            out[k] = int(v.split()[0]) * 1024
    return out
peak = {"anon": 0}
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak["anon"] = max(peak["anon"], status()["RssAnon"])
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
job, src, out, dump, keep = sys.argv[1:6]
keep = int(keep)
t0 = time.perf_counter()
if job == "dern":
    import dern_stream
    dern_stream.rewrite(src, out, experts=keep, calib=dump, kmeans_iters=int(sys.argv[6]), recipe="paper",
                        progress=False)
elif job == "load-all":
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.data[:keep].clone())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.data[:keep].clone())
        experts.num_experts = keep
        layer.mlp.gate.weight = torch.nn.Parameter(layer.mlp.gate.weight.data[:keep].clone())
    model.config.num_local_experts = keep
    model.save_pretrained(out)
elif job in ("dump", "dump-load-all"):
    import json as _json, torch
    vocab = _json.load(open(src + "/config.json"))["vocab_size"]
    ids = torch.randint(0, vocab, (keep // 512, 512), generator=torch.Generator().manual_seed(0))
    if job == "dump":
        import dern_stream
        dern_stream.dump(src, out, tokens=ids, batch_size=4, progress=False)
    else:
        from transformers import AutoModelForCausalLM
        from dern_stream.calib import dump_from_model
        dump_from_model(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16), ids, out, batch_size=4)
else:
    import dern_stream  # noqa: F401  - the interpreter + torch baseline
stop.set()
peak["anon"] = max(peak["anon"], status()["RssAnon"])
print(json.dumps({"hwm": status()["VmHWM"], "anon": peak["anon"], "seconds": time.perf_counter() - t0}))
"""


def measure(job: str, src: Path, out: Path, dump: Path, keep: int, iters: int) -> dict:
    run = subprocess.run([sys.executable, "-c", _CHILD, job, str(src), str(out), str(dump), str(keep), str(iters)],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--hidden", type=int, default=1024)
    # 64 experts of 512 neurons: the shape of OLMoE / Qwen3-30B-A3B-like models, 5.1 GB at 24 layers
    # (docs/performance.md, "Memory", also gives 8 experts of 1472: 2 GB, where torch's own 0.28 GB weighs more).
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--kmeans-iters", type=int, default=20)
    ap.add_argument("--skip-load-all", action="store_true")
    ap.add_argument("--workdir", default=".", help="where the synthetic checkpoints and outputs go")
    ap.add_argument("--job", choices=["rewrite", "dump"], default="rewrite")
    ap.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16",
                    help="fp8: block-scaled FP8 projections (load-everything is then skipped)")
    ap.add_argument("--dump-tokens", type=int, default=8192, help="--job dump: tokens (sequences of 512)")
    a = ap.parse_args()
    keep = a.experts // 2
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        base = measure("import", Path(tmp), Path(tmp), Path(tmp), keep, 0)
        print(f"baseline: python + torch + dern_stream imported, peak RSS {gb(base['hwm'])}")
        for layers in a.layers:
            src = write_synthetic(Path(tmp) / f"ck{layers}", layers=layers, hidden=a.hidden,
                                  intermediate=a.intermediate, experts=a.experts, upcycled=0.3, dtype=a.dtype)
            if a.job == "dump":
                measure_dump(a, src, Path(tmp), layers, base)
                continue
            dump = write_synthetic_dump(src, Path(tmp) / f"calib{layers}.zarr", tokens=4096)
            total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            # one layer's routed experts as stored: bf16, or FP8 bytes + float32 scales per 128x128 block
            layer_bytes = 3 * a.experts * a.hidden * a.intermediate * (1 if a.dtype == "fp8" else 2)
            if a.dtype == "fp8":
                layer_bytes += 3 * a.experts * -(-a.hidden // 128) * -(-a.intermediate // 128) * 4
            dern = measure("dern", src, Path(tmp) / f"out{layers}", dump, keep, a.kmeans_iters)
            audit = json.loads((Path(tmp) / f"out{layers}" / "dern_stream.json").read_text())
            moved = sum(r["segments_reassigned"] for r in audit["layers"].values())
            pooled = layers * (a.experts - keep) * a.intermediate
            print(f"\n{layers} layers: checkpoint {gb(total)}, one MoE layer's experts {gb(layer_bytes)}")
            print(f"  dern rewrite {a.experts}->{keep}: peak RSS {gb(dern['hwm'])}, peak anon {gb(dern['anon'])}, "
                  f"{dern['seconds']:.1f} s, segments reassigned {moved}/{pooled}")
            bound = 2 * layer_bytes + 0.5e9
            print(f"    target peak <= 2 x one layer + 0.5 GB = {gb(bound)}: "
                  f"{'met' if dern['hwm'] <= bound else 'NOT met'} ({dern['hwm'] / bound:.2f} of it)")
            print(f"    peak RSS - baseline = {gb(dern['hwm'] - base['hwm'])} = "
                  f"{(dern['hwm'] - base['hwm']) / layer_bytes:.2f} x one layer; "
                  f"peak RSS / checkpoint = {dern['hwm'] / total:.2f}")
            if not a.skip_load_all and a.dtype == "bf16":
                full = measure("load-all", src, Path(tmp) / f"full{layers}", dump, keep, 0)
                print(f"  load-everything (from_pretrained + drop + save_pretrained): peak RSS {gb(full['hwm'])}, "
                      f"{full['seconds']:.1f} s; ratio load-everything / dern = {full['hwm'] / dern['hwm']:.2f}x "
                      f"(target >= 10x at 24 layers)")


def measure_dump(a, src: Path, tmp: Path, layers: int, base: dict) -> None:
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    layer_bytes = total / (layers + 1)  # one decoder layer, all of its weights (shard per layer)
    hidden_bytes = a.dump_tokens * a.hidden * 2  # the bf16 hidden states of every token, kept between layers
    streamed = measure("dump", src, tmp / f"dump{layers}.zarr", tmp, a.dump_tokens, 0)
    print(f"\n{layers} layers: checkpoint {gb(total)}, one decoder layer {gb(layer_bytes)}, "
          f"hidden states of {a.dump_tokens} tokens {gb(hidden_bytes)}")
    print(f"  streamed dump: peak RSS {gb(streamed['hwm'])}, peak anon {gb(streamed['anon'])}, "
          f"{streamed['seconds']:.1f} s; peak RSS - baseline = {gb(streamed['hwm'] - base['hwm'])}")
    if not a.skip_load_all:
        full = measure("dump-load-all", src, tmp / f"dumpfull{layers}.zarr", tmp, a.dump_tokens, 0)
        print(f"  from_pretrained + dump_from_model: peak RSS {gb(full['hwm'])}, {full['seconds']:.1f} s; "
              f"ratio whole-model / streamed = {full['hwm'] / streamed['hwm']:.2f}x")


if __name__ == "__main__":
    main()
