"""OUT/README.md, the model card: written by every rewrite, rebuilt (with evaluation results) by `card`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main
from dern_stream.families import family_for
from dern_stream.publish.card import base_card_of

# IN's own card: front matter the new card takes license and language from, and text that must survive
# byte for byte (a table pipe, a heading, no newline at the end).
BASE_CARD = ("---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\ntags:\n- base-tag\nbase_model: someone/older\n---\n\n"
             "# The base model\n\nTrained on | things.\n\n## Its own section\n\nLast line without a newline")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def with_card(model_dir, dest):
    shutil.copytree(model_dir, dest)
    (dest / "README.md").write_text(BASE_CARD)
    return dest


@pytest.fixture(scope="module")
def rewritten(build, tmp_path_factory):
    """family -> (IN with a README.md, OUT), rewritten once per module."""
    done = {}

    def get(family: str):
        if family not in done:
            built = build(family)
            root = tmp_path_factory.mktemp(f"card-{family}")
            src = with_card(built.model_dir, root / "tiny-base")
            out = root / "out"
            summary = dern_stream.rewrite(src, out, experts=4, calib=built.calib, progress=False)
            done[family] = (src, out, built, summary)
        return done[family]

    return get


def table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with `header`, as stripped cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def number(cell: str) -> int:
    return int(cell.split(" ")[0].replace(",", ""))


def counts(model_dir):
    """(total, routed-expert) parameters of the model transformers loads, plus the buffers the checkpoint
    stores (DeepSeek-V3's score-correction bias), which the card counts as stored values."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    stored = Checkpoint(model_dir).entries
    buffers = sum(b.numel() for name, b in model.named_buffers() if name in stored)
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return model.num_parameters() + buffers, routed


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_the_card_of_a_rewrite(rewritten, family):
    src, out, built, summary = rewritten(family)
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == "tiny-base"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"moe", "dern", "pruned", "expert-pruning", family} <= set(data.tags)
    assert data.license == "apache-2.0" and data.language == ["en", "fr"]  # from IN's card
    assert "base-tag" not in data.tags and data.base_model != "someone/older"  # IN's own lineage is not ours

    record = json.loads((out / "dern_stream.json").read_text())
    kept = {row[0]: [int(e) for e in row[1].split(", ")] for row in table(card.text, "| layer | kept")}
    assert kept == {i: layer["kept"] for i, layer in record["layers"].items()}
    ckpt = Checkpoint(out)
    assert sorted(map(int, kept)) == family_for(ckpt.config).moe_layers(ckpt.entries)

    params = {row[0]: row for row in table(card.text, "| | base model | this model")}
    before, after = counts(src), counts(out)
    assert (number(params["total"][1]), number(params["routed experts"][1])) == before
    assert (number(params["total"][2]), number(params["routed experts"][2])) == after
    assert after[1] * 2 == before[1]  # 4 of 8 experts
    assert record["parameters"] == {"source": dict(zip(("total", "routed_experts"), before, strict=True)),
                                    "output": dict(zip(("total", "routed_experts"), after, strict=True))}
    assert any("README.md is kept" in n for n in summary.notes)
    assert run("verify", out, "-q").exit_code == 0


def test_the_base_card_survives_and_card_is_idempotent(rewritten, tmp_path):
    src, written, _, _ = rewritten("mixtral")
    out = tmp_path / "out"
    shutil.copytree(written, out)
    text = (out / "README.md").read_text()
    assert base_card_of(text) == BASE_CARD and text.count("Trained on | things.") == 1
    assert text.endswith(BASE_CARD.split("---\n")[-1])  # the body as it was, at the end
    assert (src / "README.md").read_text() == BASE_CARD  # IN is never written to
    before = (out / "README.md").read_bytes(), (out / "dern_stream.json").read_bytes()

    result = run("card", out)  # the rewrite's card is what card builds: nothing to change
    assert result.exit_code == 0 and result.stdout.startswith("unchanged:"), result.output
    assert ((out / "README.md").read_bytes(), (out / "dern_stream.json").read_bytes()) == before

    (out / "README.md").unlink()  # removed: written again, without the base card it held
    result = run("card", out)
    assert result.exit_code == 0 and "was missing" in result.stdout, result.output
    assert "Trained on" not in (out / "README.md").read_text()
    assert run("verify", out, "-q").exit_code == 0


def test_card_with_eval_results(rewritten, tmp_path):
    src, written, built, _ = rewritten("mixtral")
    out = tmp_path / "out"
    shutil.copytree(written, out)
    text = built.model_dir.parent / "heldout.txt"
    mine, base = tmp_path / "mine.json", tmp_path / "base.json"
    common = ["--text", text, "--num-tokens", 512, "--seq-len", 64, "-q"]
    assert run("eval", out, *common, "--reference", src, "--calib", built.calib, "--json", mine).exit_code == 0
    assert run("eval", src, *common, "--json", base).exit_code == 0

    result = run("card", out, "--eval", mine, "--eval", base)
    assert result.exit_code == 0 and "2 evaluation(s)" in result.stdout, result.output
    card = ModelCard.load(out / "README.md")
    rows = table(card.text, "| model | perplexity")
    reports = [json.loads(p.read_text()) for p in (mine, base)]
    assert [r[0] for r in rows] == ["this model", "base model (tiny-base)"]
    for row, report in zip(rows, reports, strict=True):
        assert row[1] == f"{report['perplexity']:.4f}" and number(row[2]) == report["tokens"]
    assert rows[0][4] == f"{reports[0]['reference_perplexity']:.4f}"
    assert rows[0][5] == f"{reports[0]['kl_mean']:.5f} / {reports[0]['kl_p99']:.5f}"
    assert rows[0][6] == f"{reports[0]['top1_agreement']:.2%}" and rows[1][4:7] == ["", "", ""]
    assert rows[0][7] == f"{reports[0]['mean_rel_l2']:.6f}" and rows[0][8] == "base model (tiny-base)"
    per_layer = table(card.text, "| layer | this model vs")
    assert per_layer == [[str(e["layer"]), f"{e['rel_l2']:.6f}"] for e in reports[0]["layer_errors"]]
    assert base_card_of(card.content) == BASE_CARD and card.text.count("Trained on | things.") == 1
    assert run("verify", out, "-q").exit_code == 0

    carded = (out / "README.md").read_bytes()
    assert run("card", out).exit_code == 0 and (out / "README.md").read_bytes() == carded  # results kept
    dern_stream.card(out, evals=[])  # and dropped
    assert "## Evaluation" not in (out / "README.md").read_text()
    assert base_card_of((out / "README.md").read_text()) == BASE_CARD
    assert run("verify", out, "-q").exit_code == 0


def test_card_refusals(rewritten, tmp_path):
    src, written, built, _ = rewritten("mixtral")
    out = tmp_path / "out"
    shutil.copytree(written, out)

    def refused(message: str, *args) -> None:
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        result = run("card", *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    in_before = (src / "README.md").read_bytes()
    refused("is not the output of a dern-stream rewrite", src)
    assert (src / "README.md").read_bytes() == in_before
    refused("is not a directory", tmp_path / "missing")
    refused("no such file", out, "--eval", tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format": "dern-stream-plan"}')
    refused("is not an eval report, the JSON file `dern-stream eval` writes", out, "--eval", tmp_path / "other.json")

    card = (out / "README.md").read_text()
    (out / "README.md").write_text(card.replace("## Kept experts", "## Kept experts\n\nmy own notes"))
    refused("was changed after dern-stream wrote it", out)  # the generated part: card would drop the edit
    (out / "README.md").write_text(card + "\nmy own notes\n")  # the base card's text: card keeps it
    result = run("card", out)
    assert result.exit_code == 0 and (out / "README.md").read_text() == card + "\nmy own notes\n", result.output
    assert run("verify", out, "-q").exit_code == 0

    record = json.loads((out / "dern_stream.json").read_text())
    record["num_experts"] = 5
    (out / "dern_stream.json").write_text(json.dumps(record, indent=2) + "\n")
    refused("record_checksum differs", out)


def test_a_hub_snapshot_is_the_base_model_by_repo_id(build, tmp_path):
    """IN inside huggingface_hub's cache (how a repo id resolves): base_model is the repo id; an IN
    without a README.md gives a card without a base section."""
    built = build("mixtral")
    revision = "a" * 40
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-mixtral" / "snapshots" / revision
    shutil.copytree(built.model_dir, snapshot)
    out = tmp_path / "out"
    summary = dern_stream.rewrite(snapshot, out, experts=4, importance="router-norm", progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny-org/tiny-mixtral" and f"revision `{revision}`" in card.text
    assert "Card of the base model" not in card.text and not any("README" in n for n in summary.notes)
    assert card.data.license is None
    assert "router weight norms" in card.text


def test_card_runs_without_torch(rewritten, tmp_path):
    from dern_stream.evaluation.evaluation import EVAL_FORMAT  # (the one eval writes)
    from dern_stream.publish import card as model_card

    assert model_card.EVAL_FORMAT == EVAL_FORMAT
    out = tmp_path / "out"
    shutil.copytree(rewritten("mixtral")[1], out)
    code = ("import sys; from click.testing import CliRunner; from dern_stream.cli import main;"
            "r = CliRunner().invoke(main, ['card', sys.argv[1]]); print(r.exit_code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0 False", done.stdout + done.stderr
