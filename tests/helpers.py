"""What the tests share besides fixtures (conftest.py): reading checkpoints back, editing copies, running the
command line without a module, the shape of a clean failure, and small builders used by several test files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dern_stream.calib.capture import forward_module
from dern_stream.checkpoint import Checkpoint
from dern_stream.checkpoint.config_view import config_view, is_composite
from dern_stream.families import family_for
from dern_stream.storage import dequantize
from dern_stream.stream.executor import moe_block_of, moe_block_output
from dern_stream.tiny_models import FAMILY_CONFIGS

FAMILIES = sorted(FAMILY_CONFIGS)


@dataclass
class Built:
    model_dir: Path
    calib: Path

    @property
    def config(self) -> dict:
        """config.json as the tool reads it (a multimodal model's: its language model's, config_view.py)."""
        return config_view(json.loads((self.model_dir / "config.json").read_text()))


def load_model(path, **kwargs):
    """from_pretrained with the auto class of this checkpoint's kind: a multimodal model's own, else the causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForMultimodalLM

    config = json.loads((Path(path) / "config.json").read_text())
    auto = AutoModelForMultimodalLM if is_composite(config) else AutoModelForCausalLM
    loaded = auto.from_pretrained(path, **kwargs)
    model, info = loaded if kwargs.get("output_loading_info") else (loaded, None)
    model = forward_module(model, family_for(config))  # (Qwen3-Omni-MoE generates only: its thinker runs the text)
    return (model, info) if kwargs.get("output_loading_info") else model


def decoder_layers(model):
    """A loaded model's decoder layers (a multimodal model's language model's)."""
    return model.get_submodule(family_for(model.config.to_dict()).layers_in_memory)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (tests only: tiny checkpoints)."""
    ckpt = Checkpoint(directory)
    return {name: ckpt.load(name) for name in ckpt.entries}


def raw_bytes(directory: Path) -> dict[str, bytes]:
    """Every tensor's stored bytes, read by offset (what 'byte for byte' means)."""
    out = {}
    for name, e in Checkpoint(directory).entries.items():
        with open(e.file, "rb") as f:
            f.seek(e.start)
            out[name] = f.read(e.nbytes)
    return out


def shard_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path (tiny checkpoints): 'untouched' means all of these."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


DELETE = object()  # edited_copy: remove the key


def edited_copy(model_dir: Path, dest: Path, **changes) -> Path:
    """A copy of checkpoint `model_dir` at `dest` whose config.json has `changes` (DELETE removes a key)."""
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def cli_without(module: str, *args) -> subprocess.CompletedProcess:
    """`dern-stream ARGS` in a new process where importing `module` fails, as if it were not installed."""
    code = (f"import sys; sys.modules[{module!r}] = None; from dern_stream.cli import main; "
            "sys.argv = ['dern-stream'] + sys.argv[1:]; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def assert_clean_failure(result, out: Path, message: str, code: int = 2) -> None:
    """One line on stderr (after any progress bars), the exit code, no traceback, OUT not created, and
    nothing complete-looking beside it: a kept partial output must be a resumable hidden directory
    with no config.json, and the message must say how to resume."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    for left in [p for p in out.parent.iterdir() if ".dern-" in p.name and p.name.startswith(f".{out.name}.")]:
        assert left.name == f".{out.name}.dern-partial" and (left / ".dern-progress.json").is_file(), left
        assert not (left / "config.json").exists()
        assert "again to resume" in lines[-1]


def fp8_stack(n: int, h: int, d: int, block: tuple[int, int]):
    """An FP8 stack (weights and block scales, partial edge blocks) and the same experts dequantized, dense."""
    from dern_stream.experts.segments import ExpertStack
    from dern_stream.storage import quantize

    torch.manual_seed(5)
    stack = ExpertStack.empty(n, h, d, torch.float8_e4m3fn, block=block)
    for e in range(n):
        for p, part in enumerate(("gate", "up", "down")):
            weight = torch.randn(h, d) if part != "down" else torch.randn(d, h)
            weight[: h // 3] *= 1 + e  # blocks of different scales
            q, scale = quantize(weight, block)
            getattr(stack, part)[e], stack.scales[p][e] = q, scale
    dense = ExpertStack(*(torch.stack([dequantize(getattr(stack, part)[e], stack.scales[p][e], block)
                                       for e in range(n)]) for p, part in enumerate(("gate", "up", "down"))))
    return stack, dense


def routed_error(original, rewritten, i: int, x: torch.Tensor, x_new: torch.Tensor) -> float:
    """||routed_new(x_new) - routed_orig(x)|| / ||routed_orig(x)||, each block's routed part being its output
    minus the output of its shared experts (the same module in both checkpoints)."""

    def routed(model, inputs):
        block = moe_block_of(model.model.layers[i])
        with torch.no_grad():
            y = moe_block_output(model.model.layers[i], inputs[None])[0]
            shared = shared_output(block, inputs)
        return y - shared
    reference = routed(original, x)
    return float(torch.linalg.vector_norm(routed(rewritten, x_new) - reference) / torch.linalg.vector_norm(reference))


def shared_output(block, x: torch.Tensor) -> torch.Tensor:
    """The block's shared-expert output on x [T, d] (zero without one): Qwen2-MoE's gated shared expert,
    DeepSeek's shared_experts."""
    if hasattr(block, "shared_expert"):
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if hasattr(block, "shared_experts"):
        return block.shared_experts(x)
    return torch.zeros_like(x)
