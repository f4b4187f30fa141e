"""FP8 checkpoints with 128x128 block scales (DeepSeek-V3/R1, Kimi-K2, MiniMax-M2, the "-FP8" releases):
rewritten in FP8, loaded back by transformers' own FP8 integration, and streamed by dump and eval."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure, edited_copy, fp8_stack, raw_bytes, read_tensors
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main
from dern_stream.families import family_for
from dern_stream.publish.verify import verify
from dern_stream.storage import dequantize
from dern_stream.tiny_models import calibration_tokens, save_fp8_copy

FAMILIES = ["deepseek_v3", "qwen3_moe"]
BLOCK = (128, 128)


@pytest.fixture(scope="module")
def fp8(build, tmp_path_factory):
    """family -> (FP8 checkpoint, its dump); hidden_size 256 spans two scale blocks."""
    made = {}

    def _make(family):
        if family not in made:
            built = build(family, dtype=torch.bfloat16, hidden_size=256)
            made[family] = (save_fp8_copy(built.model_dir, tmp_path_factory.mktemp("fp8") / "model"), built.calib)
        return made[family]

    return _make


def _load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_with_alpha_one_is_byte_identical(family, fp8, tmp_path):
    model, calib = fp8(family)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=8, calib=calib, alpha=1.0, progress=False)
    assert raw_bytes(out) == raw_bytes(model)
    assert json.loads((out / "config.json").read_text()) == json.loads((model / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_half_the_experts_requantized_and_loaded_by_transformers(family, fp8, tmp_path):
    model, calib = fp8(family)
    out = tmp_path / "out"
    summary = dern_stream.rewrite(model, out, experts=4, calib=calib, alpha=0.02, progress=False)
    assert summary.segments_reassigned > 0
    with torch.no_grad():
        assert torch.isfinite(_load(out)(torch.randint(3, 250, (2, 12))).logits).all()

    src, dst = Checkpoint(model), Checkpoint(out)
    src_bytes, dst_bytes = raw_bytes(model), raw_bytes(out)
    fam = family_for(src.config)
    audit = json.loads((out / "dern_stream.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == src.config["quantization_config"]
    for layer, rec in audit["layers"].items():
        i = int(layer)
        rebuilt = set(rec["rebuilt_experts"])
        assert rebuilt and 0 < rec["requantization_error"] < 0.05
        for new, old in enumerate(rec["kept"]):
            for part in ("gate", "up", "down"):
                name, was = fam.expert_name(i, new, part), fam.expert_name(i, old, part)
                assert dst.entries[name].dtype == "F8_E4M3" and dst.entries[name + "_scale_inv"].dtype == "F32"
                if old not in rebuilt:  # kept as it was: weight and scales byte for byte
                    assert dst_bytes[name] == src_bytes[was] and dst_bytes[name + "_scale_inv"] == src_bytes[
                        was + "_scale_inv"]
                else:  # every block's largest magnitude maps to the top of the FP8 range
                    w = dst.load(name).float()
                    assert w.abs().max() == 448.0
                    assert torch.isfinite(dequantize(dst.load(name), dst.load(name + "_scale_inv"), BLOCK)).all()
    untouched = [n for n in src.entries if not any(fam.is_layer_expert_tensor(int(i), n) or
                                                     n in (fam.router_name(int(i)), fam.bias_name(int(i)))
                                                     for i in audit["layers"])]
    assert any(n.endswith("o_proj.weight_scale_inv") for n in untouched)  # FP8 attention, copied with its scales
    for name in untouched:
        assert dst_bytes[name] == src_bytes[name], name
    report = verify(out, model, progress=False)
    assert not report.problems, report.problems


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_dump_and_eval_of_an_fp8_checkpoint(family, fp8, tmp_path):
    """The streamed forward dequantizes each FP8 weight as transformers' FP8 integration does."""
    model, _ = fp8(family)
    ids = calibration_tokens(sequences=4, length=16, seed=3)
    reference = _load(model)
    with torch.no_grad():
        expected = math.exp(reference(input_ids=ids, labels=ids).loss.item())
    report = dern_stream.evaluate(model, tokens=ids, batch_size=2, device="cpu", progress=False)  # as the reference
    assert report.perplexity == pytest.approx(expected, rel=1e-3)
    dump = tmp_path / "d.zarr"
    dern_stream.dump(model, dump, tokens=ids, progress=False)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=dump, progress=False)
    assert Checkpoint(out).config["quantization_config"]["quant_method"] == "fp8"


@pytest.mark.parametrize(("changes", "message"), [
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method 'awq' is not supported"),
    ({"quantization_config": {"quant_method": "fp8"}}, "per-tensor FP8 is not supported"),
    ({"quantization_config": None}, "config.json has no FP8 quantization_config"),
])
def test_storage_the_tool_cannot_rewrite_is_one_line(changes, message, fp8, tmp_path):
    model, _ = fp8("qwen3_moe")
    src = edited_copy(model, tmp_path / "in", **changes)
    result = CliRunner().invoke(main, ["rewrite", str(src), str(tmp_path / "out"), "--experts", "4",
                                       "--importance", "router-norm"])
    assert_clean_failure(result, tmp_path / "out", message)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_dtype_bf16_writes_a_dequantized_checkpoint(family, fp8, tmp_path):
    model, calib = fp8(family)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=calib, alpha=0.02, output_dtype="bf16", progress=False)
    src, dst = Checkpoint(model), Checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert {e.dtype for e in dst.entries.values()} <= {"BF16", "F32"} and not any(
        n.endswith("_scale_inv") for n in dst.entries)
    o_proj = next(n for n in dst.entries if n.endswith("o_proj.weight"))  # an FP8 tensor the method never touches
    assert dst.load(o_proj).equal(dequantize(src.load(o_proj), src.load(o_proj + "_scale_inv"), BLOCK).bfloat16())
    model_out, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    reference = _load(model)  # transformers' own dequantization of the input
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        assert torch.isfinite(model_out(ids).logits).all()
    report = verify(out, model, progress=False)
    assert not report.problems, report.problems
    # K = N, alpha = 1: the dequantized model itself, as transformers dequantizes it
    same = tmp_path / "same"
    dern_stream.rewrite(model, same, experts=8, calib=calib, alpha=1.0, output_dtype="bf16", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(same)(ids).logits, reference(ids).logits)


def test_output_dtype_on_an_unquantized_checkpoint_is_one_line(build, tmp_path):
    built = build("mixtral")
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib), "--output-dtype", "bf16"])
    assert_clean_failure(result, tmp_path / "out", "is not quantized")


def test_ue8m0_scales_stay_powers_of_two(build, tmp_path):
    """DeepSeek-V3.1/V3.2 declare scale_fmt ue8m0: loaders round every scale to a power of two, so the
    rebuilt experts' scales must be powers of two already."""
    built = build("qwen3_moe", dtype=torch.bfloat16, hidden_size=256)
    model = save_fp8_copy(built.model_dir, tmp_path / "in", scale_fmt="ue8m0", fmt="float8_e4m3fn")
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=built.calib, alpha=0.02, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    dst, fam = Checkpoint(out), family_for(Checkpoint(model).config)
    checked = 0
    for layer, rec in audit["layers"].items():
        for pos, expert in enumerate(rec["kept"]):
            if expert in rec["rebuilt_experts"]:
                scale = dst.load(fam.expert_name(int(layer), pos, "up") + "_scale_inv")
                assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
                checked += 1
    assert checked and 0 < max(r["requantization_error"] for r in audit["layers"].values()) < 0.06
    _load(out)


def test_intermediate_size_must_keep_whole_scale_blocks(build, tmp_path):
    built = build("qwen3_moe", dtype=torch.bfloat16)  # experts 32 wide
    model = save_fp8_copy(built.model_dir, tmp_path / "in", block=(16, 16))
    result = CliRunner().invoke(main, ["rewrite", str(model), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib), "--intermediate-size", "24"])
    assert_clean_failure(result, tmp_path / "out", "splits the FP8 scale blocks")
    dern_stream.rewrite(model, tmp_path / "ok", experts=4, calib=built.calib, intermediate_size=16, progress=False)
    scales = Checkpoint(tmp_path / "ok").entries["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"]
    assert scales.shape == (4, 1)


def test_fp8_tensor_without_its_scales_is_one_line(fp8, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model, _ = fp8("qwen3_moe")
    src = tmp_path / "in"
    shutil.copytree(model, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "t.txt"
    text.write_text("ka lo mi ne su ta\n" * 50)
    for args in (["rewrite", str(src), str(tmp_path / "out"), "--experts", "4", "--importance", "router-norm"],
                 ["eval", str(src), "--text", str(text)]):
        result = CliRunner().invoke(main, args)
        assert_clean_failure(result, tmp_path / "out", "o_proj.weight is stored as F8_E4M3 without its block scales")


def test_fp8_tensor_of_another_format_is_one_line(fp8, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model, _ = fp8("qwen3_moe")
    src = tmp_path / "in"
    shutil.copytree(model, src)
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].float().to(torch.float8_e5m2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["rewrite", str(src), str(tmp_path / "out"), "--experts", "4",
                                       "--importance", "router-norm", "--output-dtype", "bf16"])
    assert_clean_failure(result, tmp_path / "out", f"{name} is stored as F8_E5M2")


def test_fitted_candidates_are_requantized(fp8, tmp_path):
    """With --alpha-candidates and --refit (the refit changes the down projections of experts DERN rebuilt
    and of experts it kept): the same FP8 layout and a recorded error."""
    model, calib = fp8("qwen3_moe")
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=calib, alpha_candidates="0.02,1", refit=True, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    assert all(0 < r["requantization_error"] < 0.05 for r in audit["layers"].values() if r["rebuilt_experts"])
    assert any(r["rebuilt_experts"] for r in audit["layers"].values())
    _load(out)
    assert not verify(out, model, progress=False).problems


def test_gradient_steps_requantize_the_experts_they_moved(fp8, tmp_path):
    """--refit-steps moves gate and up too: the experts it moved are written rebuilt, requantized to the same
    FP8 layout, and the checkpoint loads and verifies."""
    model, calib = fp8("qwen3_moe")
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=calib, alpha=1.0, refit_steps=20, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    for record in audit["layers"].values():
        assert record["output_error"]["gradient_steps"] == 20
        assert record["rebuilt_experts"] and 0 < record["requantization_error"] < 0.05
    _load(out)
    assert not verify(out, model, progress=False).problems


def test_fp8_stack_reads_equal_the_dequantized_experts():
    """The rewrite holds FP8 experts as stored and dequantizes what each method reads: every accessor must
    give what the fully dequantized (float32) experts give, edge blocks included."""
    from dern_stream.experts.forward import Gating, routed_output
    from dern_stream.experts.segments import reassign_segments
    from dern_stream.families.routing import SoftmaxTopK

    n, h, d = 5, 40, 24
    stack, dense = fp8_stack(n, h, d, (16, 8))
    assert stack.nbytes < dense.nbytes / 3 and stack.dtype == torch.float32  # results in float32 until written
    for part in ("gate", "up", "down"):
        assert stack.weight(part, 3).equal(dense.weight(part, 3))
        assert stack.part_rows(part, 2).equal(dense.part_rows(part, 2))
    assert stack.segments([4, 1], ("up", "down")).equal(dense.segments([4, 1], ("up", "down")))
    mine, theirs = torch.empty(2, h, 3 * d), torch.empty(2, h, 3 * d)
    stack.segments_into(mine[0], 1)
    dense.segments_into(theirs[0], 1)
    experts, segments = torch.tensor([0, 4, 4, 2, 1]), torch.tensor([39, 0, 17, 31, 16])
    stack.segment_rows_into(mine[1, :5], experts, segments)
    dense.segment_rows_into(theirs[1, :5], experts, segments)
    assert mine[0].equal(theirs[0]) and mine[1, :5].equal(theirs[1, :5])
    args = dict(kept=[0, 3], dropped=[1, 2, 4], components=("gate", "up", "down"), alpha=0.0, block_bytes=4096)
    assert reassign_segments(stack, **args).equal(reassign_segments(dense, **args))
    x, router = torch.randn(30, d), torch.randn(n, d)
    gating = Gating(SoftmaxTopK(top_k=2), renormalise=True, scale=1.0)
    assert routed_output(x, router, None, gating, stack).equal(routed_output(x, router, None, gating, dense))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fp8_path_computes_what_a_float32_checkpoint_computes(family, fp8, tmp_path):
    """DERN on an FP8 checkpoint against an independent float32 reference: the same checkpoint with every FP8
    weight dequantized to float32. Both compute in float32 (FP8 members are not rounded to bf16 first), so the same
    segments move, the same clusters form, and the FP8 output's rebuilt experts are exactly the reference's
    quantized with the same blocks."""
    from safetensors.torch import save_file

    from dern_stream.storage import quantize

    model, calib = fp8(family)
    tensors = read_tensors(model)
    reference = tmp_path / "reference"
    shutil.copytree(model, reference, ignore=shutil.ignore_patterns("*.safetensors"))
    dense = {n: dequantize(t, tensors[n + "_scale_inv"], BLOCK) if n + "_scale_inv" in tensors else t
             for n, t in tensors.items() if not n.endswith("_scale_inv")}
    save_file(dense, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((reference / "config.json").read_text())
    del config["quantization_config"]
    (reference / "config.json").write_text(json.dumps(config))
    options = dict(experts=4, calib=calib, alpha=0.02, progress=False)
    dern_stream.rewrite(model, tmp_path / "fp8", **options)
    dern_stream.rewrite(reference, tmp_path / "f32", **options)
    ours, theirs = read_tensors(tmp_path / "fp8"), read_tensors(tmp_path / "f32")
    record = json.loads((tmp_path / "fp8" / "dern_stream.json").read_text())
    assert sum(layer["segments_reassigned"] for layer in record["layers"].values()) > 0
    rebuilt = 0
    for name, weight in theirs.items():
        if name + "_scale_inv" not in ours or ".experts." not in name:
            continue
        q, scale = quantize(weight, BLOCK)
        assert torch.equal(ours[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(ours[name + "_scale_inv"], scale), name
        rebuilt += 1
    assert rebuilt
