"""The method registry: every method is one module of dern_stream/methods/, and adding one is adding a file, as
docs/architecture.md shows with its worked example."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.methods import all_methods, method_named, method_names
from dern_stream.options import RewriteOptions

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_each_method_module_defines_one_method_listed_in_rank_order():
    methods = all_methods()
    assert [m.name for m in methods] == list(method_names()) == ["dern", "prune", "reap", "msmoe", "hcsmoe"]
    assert [m.rank for m in methods] == sorted(m.rank for m in methods)
    for method in methods:
        module = sys.modules[type(method).__module__]
        assert module.__name__ == f"dern_stream.methods.{method.name}" and module.METHOD is method
        assert method_named(method.name) is method


def test_what_a_method_declares_decides_the_options_it_takes():
    keeps = [m.name for m in all_methods() if m.keeps_from_outputs]
    assert keeps == ["reap", "msmoe", "hcsmoe"]
    for name in keeps:  # they fit on the layer's outputs, so the held-out share means something for them
        assert RewriteOptions.build(4, method=name).uses_layer_outputs
    assert not RewriteOptions.build(4, method="prune").reads_expert_weights(8, 32)
    assert RewriteOptions.build(4).reads_expert_weights(8, 32)
    assert not RewriteOptions.build(8).reads_expert_weights(8, 32)  # K = N: DERN moves nothing


def test_adding_a_method_is_one_file(build, tmp_path):
    """The worked example of docs/architecture.md, written as one new file into a copy of the package: the command
    line takes --method frequency, the output loads in transformers, and it keeps the K experts most often selected
    on the cached inputs, as a dense reference counts them."""
    code = re.search(r"```python\n(\"\"\"Frequency pruning.*?)```", ARCHITECTURE.read_text(), re.S).group(1)
    copy = tmp_path / "site"
    shutil.copytree(Path(dern_stream.__file__).parent, copy / "dern_stream",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "dern_stream" / "methods" / "frequency.py").write_text(code)
    built, out = build("mixtral"), tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from dern_stream.cli import main; main(sys.argv[1:])", "rewrite",
         str(built.model_dir), str(out), "--experts", "4", "--calib", str(built.calib), "--method", "frequency", "-q"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "dern_stream.json").read_text())
    assert record["method"] == "frequency"
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4

    dump, ckpt = CalibDump(built.calib), dern_stream.checkpoint.Checkpoint(built.model_dir)
    for layer, entry in record["layers"].items():
        x = torch.cat(list(dump.chunks(int(layer), torch.device("cpu"))))
        router = ckpt.load(f"model.layers.{layer}.block_sparse_moe.gate.weight").float()
        chosen = torch.topk(torch.softmax(x @ router.T, dim=-1), 2, dim=-1).indices
        counts = torch.bincount(chosen.reshape(-1), minlength=8)
        assert entry["kept"] == sorted(sorted(range(8), key=lambda e: (-int(counts[e]), e))[:4]), layer
