"""`eval --tasks`: lm-evaluation-harness tasks scored with the streamed forward give lm-eval's own `hf` model's
numbers (docs/evaluation.md): per-request log-likelihoods within 1e-4 in float32, the same accuracies, on local
tasks built here (multiple choice with contexts longer than the model's window, an empty context, and rolling
perplexity over texts of several windows)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="dern-datasets-"))

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import cli_without  # noqa: E402

from dern_stream.cli import main  # noqa: E402
from dern_stream.tiny_models import build_model, example_text, save_fp8_copy, save_model, write_texts  # noqa: E402

WORDS = example_text(3000, seed=5).split()


def write_tasks(root: Path) -> Path:
    """Two local tasks: multiple choice (some contexts longer than the models' 128 positions, one empty) and
    rolling perplexity (texts of one to three windows)."""
    data, tasks = root / "data", root / "tasks"
    data.mkdir(parents=True)
    tasks.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for i in range(10):
            length = [0, 3, 8, 20, 60, 150][i % 6]  # words: 150 words are well over 128 tokens
            question = " ".join(WORDS[i * 7:i * 7 + length])
            choices = [WORDS[100 + i + 3 * c] + (" " + WORDS[200 + i] if c == 1 else "") for c in range(3)]
            f.write(json.dumps({"question": question, "choices": choices, "label": i % 3}) + "\n")
    with open(data / "ppl.jsonl", "w") as f:
        for i, length in enumerate([5, 40, 120, 300]):
            f.write(json.dumps({"text": " ".join(WORDS[500 + 40 * i:500 + 40 * i + length])}) + "\n")
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
fewshot_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (tasks / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'ppl.jsonl'}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""")
    (tasks / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'ppl.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "{{{{text}}}}"
doc_to_target: "x"
generation_kwargs:
  until: ["."]
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""")
    return tasks


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def checkpoint(root: Path, family: str, *, bos: bool = False, fp8: bool = False, seed: int = 0) -> Path:
    model = build_model(family, seed=seed)
    path = save_model(model, root / "model")
    write_texts(root, model.config.vocab_size, path)
    if bos:  # a tokenizer that adds BOS, as Llama's and Mixtral's do
        from tokenizers.processors import TemplateProcessing
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tok.save_pretrained(path)
    return save_fp8_copy(path, root / "fp8") if fp8 else path


def hf_model(path: Path, fp8: bool):
    """lm-eval's own `hf` model on the checkpoint, in float32 (an FP8 checkpoint dequantized by transformers)."""
    from lm_eval.models.huggingface import HFLM

    if not fp8:
        return HFLM(pretrained=str(path), device="cpu", batch_size=4, dtype="float32")
    from transformers import AutoModelForCausalLM, AutoTokenizer, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                 dtype=torch.float32)
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=4)


def run(lm, tasks: Path, names=("tiny_mc", "tiny_ppl")) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=TaskManager(
        include_path=str(tasks), include_defaults=False), log_samples=True)


def assert_same_scores(ours: dict, theirs: dict) -> None:
    for task in ("tiny_mc", "tiny_ppl"):
        assert len(ours["samples"][task]) == len(theirs["samples"][task]) > 0
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if task == "tiny_mc":
                    (lla, greedy_a), (llb, greedy_b) = ra[0], rb[0]
                    assert abs(lla - llb) <= 1e-4, (a["arguments"], lla, llb)
                    assert greedy_a == greedy_b
                else:  # a text's sum over hundreds of tokens: the same 1e-4 relative to its size
                    assert math.isclose(ra[0], rb[0], rel_tol=1e-6, abs_tol=1e-4), (ra, rb)
    for key in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][key] == theirs["results"]["tiny_mc"][key]
    for key in ("word_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(ours["results"]["tiny_ppl"][key], theirs["results"]["tiny_ppl"][key], rel_tol=1e-5)


CASES = [pytest.param("mixtral", False, False, id="mixtral"),
         pytest.param("mixtral", True, False, id="mixtral-bos-tokenizer"),
         pytest.param("qwen2_moe", False, False, id="qwen2_moe", marks=pytest.mark.slow),
         pytest.param("deepseek_v3", False, False, id="deepseek_v3"),
         pytest.param("deepseek_v3", False, True, id="deepseek_v3-fp8", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("family", "bos", "fp8"), CASES)
def test_the_streamed_model_scores_what_lm_evals_hf_model_scores(tmp_path, tasks, family, bos, fp8):
    from dern_stream.evaluation.lm_eval_model import StreamedLM

    path = checkpoint(tmp_path, family, bos=bos, fp8=fp8)
    ours = StreamedLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=3, progress=False)
    assert ours.max_length == 128  # the config's max_position_embeddings, as HFLM reads it
    assert_same_scores(run(ours, tasks), run(hf_model(path, fp8), tasks))


def test_hidden_states_on_disk_give_the_same_scores(tmp_path, tasks):
    from dern_stream.evaluation.lm_eval_model import StreamedLM

    path = checkpoint(tmp_path, "mixtral")
    kw = dict(pretrained=str(path), device="cpu", dtype="float32", batch_size=5, progress=False)
    on_disk = StreamedLM(**kw, hidden_placement="disk", scratch_dir=str(tmp_path))
    plans = []
    on_disk.on_plan = plans.append
    a, b = run(on_disk, tasks), run(StreamedLM(**kw, hidden_placement="host"), tasks)
    assert [p.placement for p in plans] == ["disk", "disk"]  # one pass per request type
    assert plans[0].layers == 3 and plans[0].requests == 30  # 10 items of 3 choices
    for task in ("tiny_mc", "tiny_ppl"):
        assert [s["resps"] for s in a["samples"][task]] == [s["resps"] for s in b["samples"][task]]
    assert not list(tmp_path.glob("dern-hidden-*"))  # the scratch file is gone


def test_the_model_is_registered_with_lm_eval(tmp_path, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dern_stream.evaluation.lm_eval_model  # noqa: F401  (registers "dern-stream")

    path = checkpoint(tmp_path, "mixtral")
    out = lm_eval.simple_evaluate(model="dern-stream", model_args=f"pretrained={path},dtype=float32,progress=False",
                                  tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks),
                                                                              include_defaults=False), device="cpu",
                                  batch_size=2)
    assert 0.0 <= out["results"]["tiny_mc"]["acc,none"] <= 1.0


def test_eval_tasks_against_the_reference_pairs_the_items(tmp_path, tasks):
    a, b = checkpoint(tmp_path / "a", "mixtral"), checkpoint(tmp_path / "b", "mixtral", seed=1)
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["eval", str(a), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(tasks),
                                       "--reference", str(b), "--dtype", "float32", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "difference" in result.output and "tiny_mc" in result.output
    record = json.loads(out.read_text())
    assert record["format"] == "dern-stream-task-eval"
    assert record["results"]["tiny_mc"]["acc,none"] == next(
        s["value"] for s in record["scores"] if s["metric"] == "acc,none")
    row = next(s for s in record["scores"] if s["metric"] == "acc,none")
    ref = record["reference_results"]["results"]["tiny_mc"]["acc,none"]
    assert row["reference"] == ref and row["difference"] == pytest.approx(row["value"] - ref)
    assert row["items"] == 10 and row["difference_stderr"] is not None
    # The paired standard error, from the per-item accuracies lm-eval logs (one forward each, not re-derived
    # from the scores): sd(a_i - b_i) / sqrt(n).
    from dern_stream.evaluation.lm_eval_model import StreamedLM

    per_item = []
    for path in (a, b):
        samples = run(StreamedLM(pretrained=str(path), device="cpu", dtype="float32", progress=False), tasks,
                      ["tiny_mc"])["samples"]["tiny_mc"]
        per_item.append(torch.tensor([s["acc"] for s in sorted(samples, key=lambda s: s["doc_id"])]))
    diffs = per_item[0] - per_item[1]
    assert row["difference_stderr"] == pytest.approx(float(diffs.std() / math.sqrt(len(diffs))))
    # Run again: the earlier file is replaced only with --overwrite.
    again = CliRunner().invoke(main, ["eval", str(a), "--tasks", "tiny_mc", "--include-path", str(tasks),
                                      "--json", str(out), "-q"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_generating_tasks_and_bad_arguments_are_refused_before_any_work(tmp_path, tasks):
    path = checkpoint(tmp_path, "mixtral")

    def refused(*args) -> str:
        result = CliRunner().invoke(main, ["eval", str(path), *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        return result.output

    assert "tiny_gen" in refused("--tasks", "tiny_mc,tiny_gen", "--include-path", str(tasks))
    assert "generate" in refused("--tasks", "tiny_gen", "--include-path", str(tasks))
    assert "no_such_task" in refused("--tasks", "no_such_task", "--include-path", str(tasks))
    assert "--include-path" in refused("--tasks", "tiny_mc", "--include-path", str(tmp_path / "none"))
    assert "--text" in refused("--tasks", "tiny_mc", "--text", str(tmp_path / "corpus.txt"))
    assert "--limit" in refused("--tasks", "tiny_mc", "--limit", "0")
    assert "--tasks" in refused("--text", str(tmp_path / "corpus.txt"), "--limit", "3")


def test_card_and_report_show_the_task_table(tmp_path, tasks):
    from dern_stream.tiny_models import build_example

    model, calib = build_example(tmp_path / "ex")
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(main, ["rewrite", str(model), str(out), "--experts", "4", "--calib", str(calib),
                                "-q"]).exit_code == 0
    scores = tmp_path / "scores.json"
    result = runner.invoke(main, ["eval", str(out), "--tasks", "tiny_mc", "--include-path", str(tasks),
                                  "--reference", str(model), "--json", str(scores), "-q"])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(scores.read_text())["scores"] if r["metric"] == "acc,none")
    result = runner.invoke(main, ["card", str(out), "--eval", str(scores)])
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "## Task scores" in card
    assert f"| tiny_mc | acc,none | {row['value']:.4f} | {row['reference']:.4f} | {row['difference']:+.4f} |" in card
    assert "against base model" in card
    result = runner.invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report" / "index.html").read_text()
    assert "Task scores of this model against base model" in page and f"{row['difference']:+.4f}" in page
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0


def test_without_lm_eval_the_extra_is_named_in_one_line(tmp_path, tasks):
    path = checkpoint(tmp_path, "mixtral")
    result = cli_without("lm_eval", "eval", path, "--tasks", "tiny_mc", "--include-path", tasks)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --tasks needs lm-evaluation-harness: pip install "
                                                  "'dern-stream[eval]'"]


def test_choices_of_one_token_share_a_row_and_match_the_models_own_forward(tmp_path):
    """Requests with the same input (the choices of a one-token answer) are run as one row, as HFLM's logits cache
    runs them once; each still gets its own log-probability, that of transformers' forward on the context."""
    from transformers import AutoModelForCausalLM

    from dern_stream.checkpoint import Checkpoint
    from dern_stream.errors import DernError
    from dern_stream.evaluation.continuation_scores import ContinuationScorer
    from dern_stream.stream import StreamedModel

    path = checkpoint(tmp_path, "qwen2_moe")
    context = [5, 17, 99, 140, 23]
    requests = [(context, [t]) for t in (7, 8, 9, 10)] + [(context[:3], [11, 12])]
    scorer = ContinuationScorer(StreamedModel(Checkpoint(path), torch.device("cpu"), torch.float32), 128, 4)
    plan = scorer.plan(requests)
    assert (plan.requests, plan.distinct) == (5, 2)
    scores = scorer.score(requests, progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].float(), dim=-1)
        two = torch.log_softmax(model(torch.tensor([context[:3] + [11]])).logits[0, -2:].float(), dim=-1)
    for (ll, greedy), t in zip(scores[:4], (7, 8, 9, 10), strict=True):
        assert ll == pytest.approx(float(logp[t]), abs=1e-4) and greedy == (int(logp.argmax()) == t)
    assert scores[4][0] == pytest.approx(float(two[0, 11] + two[1, 12]), abs=1e-4)
    with pytest.raises(DernError, match="no context token"):
        scorer.score([([], [3, 4])], progress=False)


def test_a_group_of_tasks_is_scored(tmp_path, tasks):
    (tasks.parent / "groups").mkdir(exist_ok=True)
    (tasks.parent / "groups" / "tiny_group.yaml").write_text(
        "group: tiny_group\ntask:\n  - tiny_mc\n  - tiny_ppl\nmetadata:\n  version: 1.0\n")
    for f in tasks.glob("*.yaml"):
        (tasks.parent / "groups" / f.name).write_text(f.read_text())
    path = checkpoint(tmp_path, "mixtral")
    result = CliRunner().invoke(main, ["eval", str(path), "--tasks", "tiny_group", "--include-path",
                                       str(tasks.parent / "groups"), "-q"])
    assert result.exit_code == 0, result.output
    assert "tiny_mc" in result.output and "tiny_ppl" in result.output
