"""Peak host memory and wall time of lm-eval task scoring: `eval --tasks` (the streamed "dern-stream" lm-eval
model) against lm-eval's own `hf` model (the whole checkpoint loaded), on the same synthetic checkpoints.

    python benchmarks/task_eval_memory.py [--layers 12 24] [--hidden 1024] [--intermediate 2048] [--repeat 2]

For each layer count: writes a synthetic bf16 Mixtral-layout checkpoint with a small byte-level tokenizer, a
local multiple-choice task and a rolling-perplexity task, then scores both tasks in fresh processes with each
model, --repeat times interleaved. Prints the smallest peak RSS (VmHWM) and the fastest wall time of each, their
ratios, and whether the two models' accuracies agree. The streamed model's peak should stay flat as layers are
added (one decoder layer and the hidden states of the requests), the `hf` model's grows with the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dern_stream.synthetic import write_synthetic
from dern_stream.tiny_models import build_tokenizer, example_text

_CHILD = r"""
import json, os, sys, time
os.environ["HF_DATASETS_OFFLINE"] = "1"; os.environ["HF_HUB_OFFLINE"] = "1"
job, ckpt, tasks = sys.argv[1:4]
t0 = time.perf_counter()
import lm_eval
from lm_eval.tasks import TaskManager
manager = TaskManager(include_path=tasks, include_defaults=False)
if job == "streamed":
    from dern_stream.evaluation.lm_eval_model import StreamedLM
    lm = StreamedLM(pretrained=ckpt, device="cpu", batch_size=8, progress=False)
else:
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=ckpt, device="cpu", batch_size=8, dtype="bfloat16")
out = lm_eval.simple_evaluate(model=lm, tasks=["bench_mc", "bench_ppl"], task_manager=manager, log_samples=False)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"hwm": hwm, "seconds": time.perf_counter() - t0, "acc": out["results"]["bench_mc"]["acc,none"],
                  "ppl": out["results"]["bench_ppl"]["word_perplexity,none"]}))
"""


def write_tasks(root: Path, items: int) -> Path:
    words = example_text(40 * items + 4000, seed=3).split()
    data, tasks = root / "data", root / "tasks"
    data.mkdir(parents=True)
    tasks.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for i in range(items):
            context = " ".join(words[i * 30:i * 30 + 40])
            choices = words[-4 * i - 4:len(words) - 4 * i]
            f.write(json.dumps({"q": context, "choices": choices, "label": i % 4}) + "\n")
    with open(data / "ppl.jsonl", "w") as f:
        for i in range(items // 4):
            f.write(json.dumps({"text": " ".join(words[i * 100:i * 100 + 300])}) + "\n")
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (tasks / "bench_mc.yaml").write_text(
        f"task: bench_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "bench_ppl.yaml").write_text(
        f"task: bench_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n")
    return tasks


def measure(job: str, ckpt: Path, tasks: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", _CHILD, job, str(ckpt), str(tasks)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{job} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--items", type=int, default=200, help="multiple-choice items (4 choices); a quarter as many texts")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=".", help="where the synthetic checkpoints go")
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tasks = write_tasks(Path(tmp), a.items)
        tokenizer = build_tokenizer(example_text(20000, seed=1), 2000)
        for layers in a.layers:
            ckpt = write_synthetic(Path(tmp) / f"ck{layers}", layers=layers, hidden=a.hidden,
                                   intermediate=a.intermediate, experts=a.experts)
            tokenizer.save_pretrained(ckpt)
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            runs = {"streamed": [], "hf": []}
            for _ in range(a.repeat):  # interleaved: the machine's load falls on both alike
                for job in runs:
                    runs[job].append(measure(job, ckpt, tasks))
            best = {job: {"hwm": min(r["hwm"] for r in rs), "seconds": min(r["seconds"] for r in rs),
                          "acc": rs[0]["acc"], "ppl": rs[0]["ppl"]} for job, rs in runs.items()}
            s, h = best["streamed"], best["hf"]
            print(f"\n{layers} layers, checkpoint {gb(size)} (bf16), {a.items} items x 4 choices + {a.items // 4} "
                  f"texts; fastest / smallest of {a.repeat} interleaved runs each:")
            print(f"  dern-stream (streamed): peak RSS {gb(s['hwm'])}, {s['seconds']:.1f} s, acc {s['acc']:.4f}, "
                  f"word perplexity {s['ppl']:.2f}")
            print(f"  lm-eval hf (whole model): peak RSS {gb(h['hwm'])}, {h['seconds']:.1f} s, acc {h['acc']:.4f}, "
                  f"word perplexity {h['ppl']:.2f}")
            print(f"  ratio hf / streamed: peak RSS {h['hwm'] / s['hwm']:.2f}x, wall time "
                  f"{h['seconds'] / s['seconds']:.2f}x; same accuracy: {s['acc'] == h['acc']}")
            rows.append({"layers": layers, "checkpoint_bytes": size, "streamed": s, "hf": h})
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
