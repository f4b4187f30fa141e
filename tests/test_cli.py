"""The command line: a summary on success; one clear line and exit 2 on bad options (the full bad-input
table is test_bad_input.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import DELETE, assert_clean_failure, edited_copy, raw_bytes

from dern_stream.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_rewrite_prints_a_summary(build, tmp_path):
    built = build("mixtral")
    result = run("rewrite", built.model_dir, tmp_path / "out", "--experts", 4, "--calib", built.calib, "-q",
                 "--alpha", "0.2", "--sim-components", "gate,up,down", "--kmeans-iters", 5)
    assert result.exit_code == 0, result.output
    assert "3 MoE layers of mixtral, experts 8 -> 4" in result.stdout
    assert "segments reassigned:" in result.stdout and "output:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experts", 4, "--intermediate-size", 64], "can only shrink"),
        (["--experts", 4, "--max-shard-size", "lots"], "cannot read size 'lots'"),
        (["--experts", 4, "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_bad_options(args, message, build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--calib", built.calib, *args), out, message)


def test_missing_input(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", tmp_path / "nope", out, "--experts", 2, "--calib", tmp_path), out,
                         "does not exist")


def test_calibration_is_required_unless_router_norm(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--experts", 4), out, "--calib DUMP is required")


def test_moe_family_without_moe_layers(build, tmp_path):
    built = build("qwen3_moe", mlp_only_layers=[0, 1, 2])
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--experts", 2, "--importance", "router-norm"), out,
                         "no MoE layers found")


def test_output_location_rules(build, tmp_path):
    built = build("mixtral")
    src = tmp_path / "src"
    shutil.copytree(built.model_dir, src)
    before = raw_bytes(src)
    inside = src / "out"
    result = run("rewrite", src, inside, "--experts", 4, "--calib", built.calib)
    assert result.exit_code == 2 and "lies inside the input checkpoint" in result.stderr and not inside.exists()
    result = run("rewrite", src, tmp_path, "--experts", 4, "--calib", built.calib, "--overwrite")
    assert result.exit_code == 2 and "contains the input checkpoint" in result.stderr

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run("rewrite", src, out, "--experts", 4, "--calib", built.calib)
    assert result.exit_code == 2 and "pass --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    # --overwrite replaces only an earlier rewrite's output, never a folder of the user's
    result = run("rewrite", src, out, "--experts", 4, "--calib", built.calib, "--overwrite", "-q")
    assert result.exit_code == 2 and "holds no dern_stream.json that lists the files a rewrite wrote" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    assert run("rewrite", src, out, "--experts", 4, "--calib", built.calib, "-q").exit_code == 0
    first = raw_bytes(out)
    result = run("rewrite", src, out, "--experts", 5, "--calib", built.calib, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert raw_bytes(out) != first and json.loads((out / "config.json").read_text())["num_local_experts"] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing moved aside is left
    assert raw_bytes(src) == before


def test_the_command_line_starts_without_torch():
    """`dern-stream --help`, `--version` and every subcommand's `--help` need none of torch, transformers
    or zarr: importing the CLI (and the package) loads none of them."""
    import subprocess
    import sys

    code = ("import sys, dern_stream, dern_stream.cli; from click.testing import CliRunner;"
            "[CliRunner().invoke(dern_stream.cli.main, args) for args in (['--help'], ['--version'], ['rewrite', "
            "'--help'], ['plan', '--help'], ['dump', '--help'], ['eval', '--help'], ['verify', '--help'], "
            "['report', '--help'], ['card', '--help'], ['push', '--help'])];"
            "print(sorted(m for m in ('torch', 'transformers', 'zarr', 'numpy') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout


def test_refusals_that_need_no_tensors_load_no_torch(build, tmp_path):
    """A bad option value, a missing input, an occupied OUT, OUT inside IN, and what the config and the headers
    alone refuse (a K above N, a width above the experts', a dense model, a config that cannot route), of every
    command: refused before torch loads (so they answer at once)."""
    import subprocess
    import sys

    model = build("mixtral").model_dir
    text = model.parent / "corpus.txt"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    dense = edited_copy(model, tmp_path / "dense", model_type="llama", num_local_experts=DELETE)
    unroutable = edited_copy(model, tmp_path / "unroutable", num_experts_per_tok=9)
    calib = build("mixtral").calib
    cases = [["rewrite", str(model), str(tmp_path / "o"), "-k", "4", "--alpha", "2"],
             ["rewrite", str(tmp_path / "missing"), str(tmp_path / "o"), "-k", "4"],
             ["rewrite", str(model), str(occupied), "-k", "4", "--importance", "router-norm"],
             ["rewrite", str(model), str(model / "out"), "-k", "4"],
             ["plan", str(model), "-k", "4", "--json", str(model / "plan.json")],
             ["dump", str(tmp_path / "missing"), str(tmp_path / "d.zarr"), "--text", str(text)],
             ["dump", str(model), str(occupied), "--text", str(text)],
             ["dump", str(model), str(tmp_path / "d.zarr"), "--text", str(text), "--seq-len", "1"],
             ["dump", str(model), str(tmp_path / "d.zarr"), "--text", str(tmp_path / "no.txt")],
             ["dump", str(model), str(tmp_path / "d.zarr"), "--text", str(text), "--device", "tpu"],
             ["eval", str(model)],
             ["eval", str(model), "--text", str(text), "--reference", str(tmp_path / "missing")],
             ["eval", str(model), "--text", str(text), "--dtype", "int8"],
             ["eval", str(model), "--text", str(text), "--json", str(model / "e.json")],
             ["verify", str(tmp_path / "missing")],
             ["verify", str(model), "--against", str(tmp_path / "missing")],
             ["report", str(model)],
             ["card", str(model)],
             ["push", str(model), "me/x"],
             ["rewrite", str(model), str(tmp_path / "o"), "-k", "4"],
             ["rewrite", str(model), str(tmp_path / "o"), "-k", "4", "--calib", str(tmp_path / "none.zarr")],
             ["plan", str(model), "-k", "4", "--calib", str(text)],
             ["rewrite", str(model), str(tmp_path / "o"), "-k", "9", "--calib", str(calib)],
             ["plan", str(model), "-k", "4", "--intermediate-size", "64"],
             ["rewrite", str(dense), str(tmp_path / "o"), "-k", "4", "--calib", str(calib)],
             ["plan", str(unroutable), "-k", "4"],
             ["rewrite", str(model), str(tmp_path / "o"), "-k", "4", "--calib", str(calib), "--output-dtype", "bf16"],
             ["dump", str(dense), str(tmp_path / "d.zarr"), "--text", str(text)],
             ["eval", str(unroutable), "--text", str(text)],
             ["verify", str(dense)]]
    code = ("import sys, json; from click.testing import CliRunner; from dern_stream.cli import main;"
            "codes = [CliRunner().invoke(main, args).exit_code for args in json.loads(sys.argv[1])];"
            "print(codes, 'torch' in sys.modules)")
    import json

    run = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == f"{[2] * len(cases)} False", run.stdout + run.stderr
    assert (occupied / "notes.txt").read_text() == "mine"
