"""`dern-stream dump` and `dern-stream eval` from the command line: the user's path, and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from dern_stream.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.output


def test_dump_rewrite_eval_from_text(build, tmp_path):
    built = build("qwen2_moe")
    texts = built.model_dir.parent
    dump, out, report = tmp_path / "calib.zarr", tmp_path / "out", tmp_path / "eval.json"
    result = run("dump", built.model_dir, dump, "--text", texts / "corpus.txt", "--num-tokens", 2048,
                 "--seq-len", 128, "-q")
    assert result.exit_code == 0, result.output
    assert "3 MoE layers x 2048 tokens (16 x 128)" in result.stdout
    assert run("rewrite", built.model_dir, out, "--experts", 4, "--calib", dump, "-q").exit_code == 0
    result = run("eval", out, "--text", texts / "heldout.txt", "--seq-len", 128, "--reference", built.model_dir,
                 "--calib", dump, "--json", report, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["perplexity"] > 1 and data["tokens"] > 0
    assert [e["layer"] for e in data["layer_errors"]] == [0, 1, 2]
    assert all(e["tokens"] == 2048 and e["rel_l2"] > 0 for e in data["layer_errors"])
    assert f"perplexity {data['perplexity']:.4f}" in result.stdout and "rel L2" in result.stdout


def test_dump_from_jsonl(build, tmp_path):
    built = build("mixtral")
    lines = (built.model_dir.parent / "corpus.txt").read_text().split("\n\n")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)))
    result = run("dump", built.model_dir, tmp_path / "d.zarr", "--text", corpus, "--num-tokens", 1024,
                 "--seq-len", 64, "-q")
    assert result.exit_code == 0, result.output


def test_missing_tokenizer(build, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(build("mixtral").model_dir / name, src)
    text = build("mixtral").model_dir.parent / "corpus.txt"
    out = tmp_path / "d.zarr"
    assert_error(run("dump", src, out, "--text", text), "has no tokenizer that transformers can load")
    assert not out.exists()
    assert_error(run("eval", src, "--text", text), "pass --tokenizer PATH")


def test_text_too_short(build, tmp_path):
    built = build("mixtral")
    short = tmp_path / "short.txt"
    short.write_text("kalo mine suta.\n")
    out = tmp_path / "d.zarr"
    assert_error(run("dump", built.model_dir, out, "--text", short, "--num-tokens", 4096, "--seq-len", 128),
                 "sequences of 128 need")
    assert not out.exists()
    assert_error(run("eval", built.model_dir, "--text", short, "--seq-len", 128), "sequences of 128 need")


def test_bad_jsonl(build, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert_error(run("dump", build("mixtral").model_dir, tmp_path / "d.zarr", "--text", bad),
                 "line 2 has no string field 'text'")


def test_not_an_moe_model(tmp_path):
    src = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(src)
    (tmp_path / "t.txt").write_text("text\n")
    assert_error(run("dump", src, tmp_path / "d.zarr", "--text", tmp_path / "t.txt"),
                 "is not a Mixture-of-Experts model")


def test_eval_with_a_dump_from_another_model(build, tmp_path):
    built, other = build("mixtral"), build("mixtral", seed=7)
    assert_error(run("eval", built.model_dir, "--reference", built.model_dir, "--calib", other.calib),
                 "was made from another model (layer 0 router weights differ)")
    assert_error(run("eval", built.model_dir, "--reference", built.model_dir, "--calib", build("olmoe").calib),
                 "was made from another model")


def test_eval_argument_errors(build, tmp_path):
    built = build("mixtral")
    assert_error(run("eval", built.model_dir), "nothing to evaluate")
    assert_error(run("eval", built.model_dir, "--reference", built.model_dir), "with --reference, give --text")
    assert_error(run("eval", built.model_dir, "--calib", built.calib), "--calib needs --reference IN")
    assert_error(run("dump", built.model_dir, tmp_path / "d.zarr"), "give exactly one of --text FILE or --dataset")
    assert_error(run("dump", built.model_dir, tmp_path / "d.zarr", "--text", built.model_dir.parent / "corpus.txt",
                     "--dtype", "int8"), "--dtype int8: use auto")


def test_dataset_needs_the_datasets_library(build, tmp_path):
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed here")
    assert_error(run("dump", build("mixtral").model_dir, tmp_path / "d.zarr", "--dataset", "allenai/c4"),
                 "--dataset needs the datasets library: pip install datasets")


def test_dump_inside_the_checkpoint_is_refused(build):
    built = build("mixtral")
    out = built.model_dir / "calib.zarr"
    assert_error(run("dump", built.model_dir, out, "--text", built.model_dir.parent / "corpus.txt"),
                 "lies inside the input checkpoint")
    assert not out.exists()


def test_checkpoint_missing_a_tensor_the_forward_needs(build, tmp_path):
    from safetensors.torch import load_file, save_file

    built = build("mixtral")
    src = tmp_path / "model"
    shutil.copytree(built.model_dir, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert_error(run("eval", src, "--text", built.model_dir.parent / "heldout.txt", "--seq-len", 64),
                 "checkpoint has no tensor model.layers.1.self_attn.q_proj.weight")


def test_a_wrong_reference_is_refused_before_the_perplexity_pass(build, tmp_path):
    """--reference is checked first, and the message names it; no layer of the perplexity pass runs."""
    built = build("mixtral")
    texts = built.model_dir.parent
    result = run("eval", built.model_dir, "--text", texts / "heldout.txt", "--seq-len", 64, "--reference",
                 tmp_path / "nowhere", "--calib", built.calib)
    assert_error(result, "--reference: input")
    assert "eval layers" not in result.stderr
    other = build("olmoe").model_dir
    result = run("eval", built.model_dir, "--text", texts / "heldout.txt", "--seq-len", 64, "--reference", other,
                 "--calib", built.calib)
    assert_error(result, "is not the same family")
    assert "eval layers" not in result.stderr
    qwen = build("qwen2_moe")  # a dump of another model than the reference
    result = run("eval", built.model_dir, "--text", texts / "heldout.txt", "--seq-len", 64, "--reference",
                 built.model_dir, "--calib", qwen.calib)
    assert_error(result, "(checked against --reference)")
    assert "eval layers" not in result.stderr


def test_sequences_longer_than_the_model_positions_get_a_note(build, caplog):
    built = build("mixtral")  # max_position_embeddings 128
    texts = built.model_dir.parent
    result = run("eval", built.model_dir, "--text", texts / "heldout.txt", "--seq-len", 256, "-q")
    assert result.exit_code == 0, result.output
    assert "longer than the model's max_position_embeddings (128)" in caplog.text
    caplog.clear()
    result = run("eval", built.model_dir, "--text", texts / "heldout.txt", "--seq-len", 128, "-q")
    assert result.exit_code == 0 and "max_position_embeddings" not in caplog.text


def test_rewrite_help_says_when_calib_is_needed_and_what_best_is():
    text = CliRunner().invoke(main, ["rewrite", "--help"], terminal_width=300).output
    assert "required unless --importance router-norm" in text
    assert "--kmeans-init own --no-router-transfer --alpha-candidates 1.0,0.8,0.6,0.4,0.2 --refit" in text
