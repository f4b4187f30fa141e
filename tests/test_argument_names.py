"""A refusal names the argument as its caller wrote it: `overwrite=True` to a Python caller, `--overwrite`
on the command line. Messages are worded once (errors.arg); the command line shows its flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import dern_stream
from dern_stream.cli import flag_names, main
from dern_stream.errors import DernError

PACKAGE = Path(dern_stream.__file__).parent
_PRIVATE = re.compile("[\ue000-\uf8ff]")


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "mine.txt").write_text("mine")
    return path


def user_file(path: Path) -> Path:
    path.write_text("mine")
    return path


# case -> (Python call, command line, what the Python message says, what the command line's says), the
# last three from (model, calib, texts folder, tmp_path).
CASES = {
    "overwrite": (
        lambda m, c, t, tmp: dern_stream.rewrite(m, user_folder(tmp / "o"), experts=4, calib=c, progress=False),
        lambda m, c, t, tmp: ["rewrite", m, user_folder(tmp / "o"), "--experts", 4, "--calib", c],
        ["exists and is not empty; pass overwrite=True to replace it"],
        ["exists and is not empty; pass --overwrite to replace it"]),
    "calib, importance": (
        lambda m, c, t, tmp: dern_stream.rewrite(m, tmp / "o", experts=4, progress=False),
        lambda m, c, t, tmp: ["rewrite", m, tmp / "o", "--experts", 4],
        ["calib is required (a calibration dump", "or pass importance='router-norm' for the weaker"],
        ["--calib DUMP is required (a calibration dump", "or pass --importance router-norm for the weaker"]),
    "experts with its value": (
        lambda m, c, t, tmp: dern_stream.rewrite(m, tmp / "o", experts=9, calib=c, progress=False),
        lambda m, c, t, tmp: ["rewrite", m, tmp / "o", "--experts", 9, "--calib", c],
        ["experts=9 exceeds the model's 8 experts per layer"], ["--experts 9 exceeds the model's 8 experts"]),
    "method, alpha_candidates": (
        lambda m, c, t, tmp: dern_stream.rewrite(m, tmp / "o", experts=4, calib=c, method="prune",
                                                 alpha_candidates="1,0.5", progress=False),
        lambda m, c, t, tmp: ["rewrite", m, tmp / "o", "--experts", 4, "--calib", c, "--method", "prune",
                              "--alpha-candidates", "1,0.5"],
        ["alpha_candidates applies to method='dern' only"], ["--alpha-candidates applies to --method dern only"]),
    "workers, ray": (
        lambda m, c, t, tmp: dern_stream.rewrite(m, tmp / "o", experts=4, calib=c, workers=2, ray="auto"),
        lambda m, c, t, tmp: ["rewrite", m, tmp / "o", "--experts", 4, "--calib", c, "--workers", 2, "--ray",
                              "auto"],
        ["workers and ray do not go together"], ["--workers and --ray do not go together"]),
    "plan's json_path": (
        lambda m, c, t, tmp: dern_stream.plan(m, experts=4, json_path=user_file(tmp / "p.json"), progress=False),
        lambda m, c, t, tmp: ["plan", m, "--experts", 4, "--json", user_file(tmp / "p.json")],
        ["json_path file ", "p.json exists; pass overwrite=True to replace it"],
        ["--json file ", "p.json exists; pass --overwrite to replace it"]),
    "evaluate with nothing to evaluate": (
        lambda m, c, t, tmp: dern_stream.evaluate(m, progress=False),
        lambda m, c, t, tmp: ["eval", m],
        ["give text or dataset for perplexity, or reference with calib"],
        ["give --text or --dataset for perplexity, or --reference IN with --calib DUMP"]),
    "evaluate's reference without calib": (
        lambda m, c, t, tmp: dern_stream.evaluate(m, reference=m, progress=False),
        lambda m, c, t, tmp: ["eval", m, "--reference", m],
        ["with reference, give text or dataset", "and/or calib (per-layer error)"],
        ["with --reference, give --text or --dataset", "and/or --calib DUMP (per-layer error)"]),
    "evaluate's calib without reference": (
        lambda m, c, t, tmp: dern_stream.evaluate(m, calib=c, progress=False),
        lambda m, c, t, tmp: ["eval", m, "--calib", c],
        ["calib needs reference:"], ["--calib needs --reference IN:"]),
    "dump's num_tokens": (
        lambda m, c, t, tmp: dern_stream.dump(m, tmp / "d.zarr", text=t / "corpus.txt", num_tokens=0),
        lambda m, c, t, tmp: ["dump", m, tmp / "d.zarr", "--text", t / "corpus.txt", "--num-tokens", 0],
        ["num_tokens must be an integer of at least 1, got 0"], ["--num-tokens must be an integer of at least 1"]),
    "dump's seq_len against num_tokens": (
        lambda m, c, t, tmp: dern_stream.dump(m, tmp / "d.zarr", text=t / "corpus.txt", num_tokens=64,
                                              seq_len=128, progress=False),
        lambda m, c, t, tmp: ["dump", m, tmp / "d.zarr", "--text", t / "corpus.txt", "--num-tokens", 64,
                              "--seq-len", 128],
        ["num_tokens=64 is less than one sequence of seq_len=128"],
        ["--num-tokens 64 is less than one sequence of --seq-len 128"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_python_callers_read_keywords_and_the_command_line_reads_flags(case, build, tmp_path):
    built = build("mixtral")
    python_call, command, python_says, cli_says = CASES[case]
    texts = built.model_dir.parent
    (tmp_path / "py").mkdir()
    with pytest.raises(DernError) as raised:
        python_call(built.model_dir, built.calib, texts, tmp_path / "py")
    message = str(raised.value)
    assert all(part in message for part in python_says), message
    assert "--" not in message and not _PRIVATE.search(message), message

    (tmp_path / "cli").mkdir()
    result = CliRunner().invoke(main, [str(a) for a in command(built.model_dir, built.calib, texts, tmp_path / "cli")])
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output
    line = result.stderr.strip().splitlines()[-1]
    assert all(part in line for part in cli_says), line
    assert not _PRIVATE.search(result.output) and "=True" not in line, line


def _messages_and_names():
    """Every string literal inside a DernError(...) of the package, and every argument name a message
    names (arg("x"), and the first argument of the option checkers that pass it to arg)."""
    literals, names = [], []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if node.func.id in ("DernError", "NonFinite"):
                literals += [(where, c.value) for a in node.args for c in ast.walk(a)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            first = node.args[0] if node.args else None
            if node.func.id in ("arg", "whole", "number", "choice") and isinstance(first, ast.Constant):
                names.append((where, first.value))
    return literals, names


def test_no_message_spells_out_a_flag():
    """A flag written into a message would reach Python callers too: they name arguments with arg()."""
    literals, names = _messages_and_names()
    assert len(literals) > 100 and len(names) > 30  # (the scan finds the package's messages)
    assert [(where, text) for where, text in literals if re.search(r"(^|[\s(])--[a-z]", text)] == []


def test_every_argument_a_message_names_is_a_flag_of_the_command_line():
    """Shown on the command line, each name is a flag some command takes (`json_path` is `--json`), but
    for the Python API's own arguments, which the command line never passes."""
    python_only = {"chunk_tokens", "store_dtype"}  # dump's keywords for dump_from_model's callers
    flags = {opt for command in main.commands.values() for p in command.params
             for opt in [*p.opts, *getattr(p, "secondary_opts", [])]}
    table = {k: v for command in main.commands.values() for k, v in flag_names(command).items()}
    _, names = _messages_and_names()
    unknown = [(where, name) for where, name in names
               if name not in python_only and table.get(name, "--" + name.replace("_", "-")) not in flags]
    assert unknown == []
