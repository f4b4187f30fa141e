"""The gradient refit (`refit_steps`): gate, up and down of the kept experts moved by Adam on the layer's output
error. It beats the least-squares refit it starts from on rows it did not see, its step count is chosen on them,
it is deterministic (a resumed layer is the same layer), and the checkpoint it writes computes what was recorded."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import file_bytes, routed_error
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.calib import CalibDump, dump_from_model
from dern_stream.checkpoint import Checkpoint
from dern_stream.errors import DernError
from dern_stream.experts.forward import layer_routing, routed_output
from dern_stream.experts.result import kept_stack, prune_layer
from dern_stream.families import PARTS, family_for
from dern_stream.fit.down_refit import refit_down
from dern_stream.fit.gradient_refit import CHECK_EVERY, held_out_judge, refit_gradient
from dern_stream.layout.moe_layers import ModelShape, check_moe_layers
from dern_stream.rewriter.layer_io import read_experts
from dern_stream.storage import ExpertStorage
from dern_stream.tiny_models import calibration_tokens


def _larger_dump(built, path):
    """The example model's MoE inputs on 8192 tokens (its own dump has 256: too few to learn from)."""
    model = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32)
    dump_from_model(model, calibration_tokens(model.config.vocab_size, sequences=64, length=128), path)
    return path


def _pruned_layer(built, calib, index: int, keep: list[int]):
    """(fitting rows, held-out rows, router rows, gating, kept experts after the least-squares down refit) of a
    real layer, the original layer's routed output as the target."""
    ckpt = Checkpoint(built.model_dir)
    family = family_for(ckpt.config)
    shape = ModelShape(family.num_experts(ckpt.config), ckpt.config["hidden_size"],
                       family.intermediate_size(ckpt.config))
    layer = next(m for m in check_moe_layers(ckpt, family, shape, ExpertStorage()) if m.index == index)
    out_config, _ = family.output_config(ckpt.config, len(keep), None)
    routing = layer_routing(family, ckpt.config, out_config)
    router = ckpt.load(family.router_name(index)).float()
    bias = ckpt.load(family.bias_name(index)).reshape(-1).float() if layer.bias is not None else None
    experts = read_experts(ckpt, family, layer, shape, torch.device("cpu"))
    x = torch.cat(list(CalibDump(calib).chunks(index))).float()
    y = routed_output(x, router, bias, routing.before, experts)
    result = prune_layer(router, keep, router.shape[0])
    kept_bias = bias[keep] if bias is not None else None
    half = x.shape[0] // 2
    stack = refit_down(x[:half], y[:half], result.router, kept_bias, routing.after, kept_stack(experts, result),
                       1.0)[0]
    return (x[:half], y[:half]), (x[half:], y[half:]), result.router, kept_bias, routing.after, stack


@pytest.mark.parametrize("family_name", ["mixtral", "deepseek_v3"])
def test_gradient_steps_beat_the_least_squares_refit_on_unseen_rows(family_name, build, tmp_path):
    built = build(family_name)
    calib = _larger_dump(built, tmp_path / "calib.zarr")
    fitting, held, router, bias, gating, stack = _pruned_layer(built, calib, 1, [0, 2, 5, 7])
    judge = held_out_judge(*held, router, bias, gating)
    start = judge(stack)
    tuned, [steps] = refit_gradient(*fitting, router, bias, gating, stack, 150, held)
    assert steps % CHECK_EVERY == 0 and 0 < steps <= 150
    assert judge(tuned) < 0.98 * start
    # gate and up moved too (the least-squares refit moves only down)
    for part in ("gate", "up", "down"):
        assert not torch.allclose(getattr(tuned, part), stack.weight(part, slice(None)).float())


def test_the_step_count_chosen_is_the_best_checkpoint_and_a_rerun_is_identical(build):
    built = build("qwen2_moe")
    fitting, held, router, bias, gating, stack = _pruned_layer(built, built.calib, 1, [1, 3, 4, 6])
    judge = held_out_judge(*held, router, bias, gating)
    chosen, [steps] = refit_gradient(*fitting, router, bias, gating, stack, 100, held)
    # Each checkpoint the choice looked at, run again without a judge: the chosen one is the lowest.
    errors = {n: judge(refit_gradient(*fitting, router, bias, gating, stack, n)[0])
              for n in range(0, 101, CHECK_EVERY)}
    assert errors[steps] == min(errors.values())
    assert len(set(errors.values())) == len(errors)  # every checkpoint a different stack: the steps moved it
    again = refit_gradient(*fitting, router, bias, gating, stack, steps)[0]
    for part in ("gate", "up", "down"):
        assert torch.equal(getattr(chosen, part), getattr(again, part))


@pytest.mark.parametrize("family_name", ["mixtral", "deepseek_v3"])
def test_experts_moved_a_group_at_a_time_also_beat_the_least_squares_refit_on_unseen_rows(family_name, build,
                                                                                          tmp_path):
    """`group`: each group of kept experts fitted in turn against the others' output, its step count chosen on the
    held-out rows; rerun with those counts and no held-out rows, the same weights (what the rewrite does)."""
    built = build(family_name)
    calib = _larger_dump(built, tmp_path / "calib.zarr")
    fitting, held, router, bias, gating, stack = _pruned_layer(built, calib, 1, [0, 2, 5, 7])
    judge = held_out_judge(*held, router, bias, gating)
    joint, _ = refit_gradient(*fitting, router, bias, gating, stack, 150, held)
    tuned, steps = refit_gradient(*fitting, router, bias, gating, stack, 150, held, group=3)
    assert len(steps) == 2 and all(n % CHECK_EVERY == 0 for n in steps) and any(steps)
    assert judge(tuned) < 0.98 * judge(stack)
    assert judge(tuned) < 1.1 * judge(joint)  # close to moving all four together
    for part in PARTS:  # every group's experts moved
        moved = (getattr(tuned, part) != stack.weight(part, slice(None)).float()).flatten(1).any(dim=1)
        assert moved.tolist() == [bool(steps[0])] * 3 + [bool(steps[1])]
    again, taken = refit_gradient(*fitting, router, bias, gating, stack, steps, group=3)
    assert taken == steps
    for part in PARTS:
        assert torch.equal(getattr(again, part), getattr(tuned, part))


@pytest.mark.parametrize(("family_name", "group"), [("mixtral", None), ("deepseek_v3", None), ("mixtral", 1)])
def test_the_written_checkpoint_computes_the_recorded_error(family_name, group, build, tmp_path):
    """Without a held-out share, each layer's recorded error is its routed output's error on the dump rows after
    the gradient steps: recomputed here from the rewritten checkpoint loaded in transformers. Gate and up of the
    kept experts differ from the original's, so they were written."""
    built = build(family_name)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, refit=True, refit_steps=50,
                        refit_group=group, fit_tokens=10**6, progress=False)
    layers = json.loads((out / "dern_stream.json").read_text())["layers"]
    rewritten = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32)
    dump = CalibDump(built.calib)
    for i, layer in layers.items():
        fit = layer["output_error"]
        x = torch.cat(list(dump.chunks(int(i)))).float()
        assert fit["gradient_steps"] == 50 and fit["error"] == fit["error_after_gradient"]
        assert fit["error"] < min(c.get("error_after_refit", c["error"]) for c in fit["candidates"])
        assert fit["error"] == pytest.approx(routed_error(original, rewritten, int(i), x, x), rel=2e-2)
    # gate and up of every kept expert moved: not the original expert's, as pruning alone would write it
    family = family_for(json.loads((out / "config.json").read_text()))
    written, source = Checkpoint(out), Checkpoint(built.model_dir)
    for i, layer in layers.items():
        for pos, expert in enumerate(layer["kept"]):
            for part in ("gate", "up"):
                assert not torch.equal(written.load(family.expert_name(int(i), pos, part)),
                                       source.load(family.expert_name(int(i), expert, part)))


def test_a_rewrite_with_gradient_steps_is_reproducible_byte_for_byte(build, tmp_path):
    """What a resume relies on: a layer computed again gives the same bytes (seeded minibatches)."""
    built = build("qwen3_moe")
    runs = []
    for name in ("a", "b"):
        dern_stream.rewrite(built.model_dir, tmp_path / name, experts=5, calib=built.calib, recipe="best",
                            holdout=0.0, refit_steps=30, progress=False)
        runs.append(file_bytes(tmp_path / name))
    assert runs[0] == runs[1]
    record = json.loads((tmp_path / "a" / "dern_stream.json").read_text())
    assert any(layer["output_error"]["gradient_steps"] > 0 for layer in record["layers"].values())


def test_gradient_steps_on_experts_with_biases_are_refused_in_one_line(build, tmp_path):
    built = build("gpt_oss")
    with pytest.raises(DernError, match="refit_steps does not model gpt_oss's expert biases yet") as e:
        dern_stream.rewrite(built.model_dir, tmp_path / "out", experts=4, calib=built.calib, refit_steps=10,
                            progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_device_memory_running_out_in_the_steps_is_one_line(build, monkeypatch):
    """A GPU too small for the kept experts' Adam state: the error names the option to change (the allocation
    failure itself is provoked here, as no CPU raises it)."""
    built = build("mixtral")
    fitting, held, router, bias, gating, stack = _pruned_layer(built, built.calib, 1, [0, 2, 5, 7])

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 GiB")

    monkeypatch.setattr(torch.optim, "Adam", no_memory)
    with pytest.raises(DernError, match=r"refit_steps: .* of 4 experts do not fit in cpu memory; give a smaller "
                                        r"refit_group, refit_steps=0 or device='cpu'") as e:
        refit_gradient(*fitting, router, bias, gating, stack, 10)
    assert "\n" not in str(e.value)
