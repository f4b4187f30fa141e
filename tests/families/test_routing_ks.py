"""For every family and every K from 1 to N, the rewrite either writes a checkpoint that transformers
loads and runs, or refuses K before any work and names the K values that work (the list must be exactly
the K that succeed). verify flags a config that cannot route."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import FAMILIES, load_model

import dern_stream
from dern_stream.cli import main
from dern_stream.errors import DernError
from dern_stream.families import family_for


def _listed(message: str) -> set[int]:
    """'K values that work for this model: 2-4, 6' -> {2, 3, 4, 6}."""
    listed = message.rsplit("K values that work for this model: ", 1)[1]
    out: set[int] = set()
    for part in re.findall(r"\d+(?:-\d+)?", listed):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_k_runs_in_transformers_or_is_refused_up_front(family, build, tmp_path):
    built = build(family)
    experts = family_for(built.config).num_experts(built.config)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    worked, refused = set(), {}
    for k in range(1, experts + 1):
        out = tmp_path / f"k{k}"
        try:
            dern_stream.rewrite(built.model_dir, out, experts=k, importance="router-norm", alpha=1.0, progress=False)
        except DernError as e:
            refused[k] = str(e)
            assert "K values that work" in str(e) and not out.exists()
            assert not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())  # refused before work
            continue
        model = load_model(out).eval()
        with torch.no_grad():
            logits = model(ids).logits
        vocab = model.config.get_text_config().vocab_size
        assert logits.shape == (1, ids.shape[1], vocab) and torch.isfinite(logits).all(), k
        worked.add(k)
        shutil.rmtree(out)
    assert experts in worked  # K = N always works
    for message in refused.values():
        assert _listed(message) == worked, message


def test_deepseek_v3_k1_is_refused_with_the_working_values(build, tmp_path):
    """transformers' DeepSeek-V3 scores each routing group by its top two experts: one expert cannot
    route ("selected index k out of range"), and llama.cpp refuses it too."""
    built = build("deepseek_v3")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(out), "--experts", "1",
                                       "--importance", "router-norm", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == (
        "error: --experts 1 gives a deepseek_v3 model that cannot route (deepseek_v3 scores each routing group by its "
        "top 2 experts, and 1 experts in 1 group(s) leave 1 per group); K values that work for this model: 2-8")
    assert list(tmp_path.iterdir()) == []


def test_top_k_above_the_expert_count_is_one_line(build, tmp_path):
    built = build("mixtral")
    src = tmp_path / "src"
    shutil.copytree(built.model_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 9}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "--experts", "4", "--calib", str(built.calib),
                                       "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output and not out.exists()
    assert "num_experts_per_tok" in result.stderr and "9" in result.stderr and len(result.stderr.splitlines()) == 1


def test_verify_flags_a_config_that_cannot_route(build, tmp_path):
    built = build("deepseek_v3")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=2, importance="router-norm", alpha=1.0, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_group"], config["topk_group"]) == (1, 1)
    (out / "config.json").write_text(json.dumps({**config, "n_group": 2}))  # groups of one expert
    result = CliRunner().invoke(main, ["verify", str(out), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.strip() == ("error: config.json cannot route: deepseek_v3 scores each routing group by its "
                                     "top 2 experts, and 2 experts in 2 group(s) leave 1 per group")
