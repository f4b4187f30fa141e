"""compressed-tensors checkpoints (docs/formats.md, "compressed-tensors"): Kimi-K2-Thinking's pack-quantized int4
experts and llm-compressor's other weight formats, packed and unpacked by the compressed-tensors library. Pruning
keeps the kept experts' stored bytes; recombining requantizes with the input's scheme; the output keeps the input's
quantization_config, loads in transformers and verifies."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from click.testing import CliRunner  # noqa: E402
from helpers import assert_clean_failure, edited_copy, raw_bytes  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import dern_stream  # noqa: E402
from dern_stream.checkpoint import Checkpoint  # noqa: E402
from dern_stream.cli import main  # noqa: E402
from dern_stream.families import family_for  # noqa: E402
from dern_stream.storage.compressed_tensors import compress, decompress  # noqa: E402
from dern_stream.storage.formats import CompressedWeights, expert_storage  # noqa: E402
from dern_stream.storage.reading import load_weight  # noqa: E402
from dern_stream.tiny_models import save_compressed_copy  # noqa: E402

INT4 = CompressedWeights("pack-quantized", 4, "int", True, "group", 32)
FORMATS = [INT4, CompressedWeights("pack-quantized", 4, "int", False, "group", 32),
           CompressedWeights("pack-quantized", 8, "int", True, "channel"),
           CompressedWeights("int-quantized", 8, "int", True, "channel"),
           CompressedWeights("float-quantized", 8, "float", True, "channel"),
           CompressedWeights("float-quantized", 8, "float", True, "tensor"),
           CompressedWeights("float-quantized", 8, "float", True, "block", None, (32, 32)),
           CompressedWeights("nvfp4-pack-quantized", 4, "float", True, "tensor_group", 16),
           CompressedWeights("nvfp4-pack-quantized", 4, "float", True, "tensor_group", 16, input_scale=True)]


def fmt_id(fmt: CompressedWeights) -> str:
    return f"{fmt.format}-{fmt.strategy}-{'sym' if fmt.symmetric else 'asym'}" + ("-w4a4" if fmt.input_scale else "")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: fmt_id(f))
def test_the_stored_tensors_are_the_librarys(fmt):
    """The names and shapes the layout checks and the output plan expect (torch-free) are those the library
    writes, and what it writes decompresses to the weight within the format's rounding."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    activations = {**fmt.scheme()["weights"], "dynamic": False} if fmt.input_scale else None
    scheme = QuantizationScheme.model_validate({**fmt.scheme(), "input_activations": activations})
    assert BaseCompressor.get_value_from_registry(fmt.format).compression_param_names(scheme) == fmt.params
    for rows, cols in [(64, 96), (40, 64)]:
        weight = torch.randn(rows, cols) * 0.02
        scale = torch.float8_e4m3fn if fmt.format == "nvfp4-pack-quantized" else torch.bfloat16
        stored = compress(fmt, weight, {"weight_scale": scale})
        # (an activations' scale is not the weight's: the rewrite keeps the source expert's)
        assert {k: tuple(v.shape) for k, v in stored.items()} == {
            k: v for k, v in fmt.stored_shapes(rows, cols).items() if k != "input_global_scale"}
        assert 0 < float((decompress(fmt, stored) - weight).norm() / weight.norm()) < 0.12


def int4_copy(built, tmp_path, fmt=INT4):
    return save_compressed_copy(built.model_dir, tmp_path / "int4", fmt)


def test_pruning_keeps_the_stored_bytes_and_the_config(build, tmp_path):
    built = build("deepseek_v3")
    model = int4_copy(built, tmp_path)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=built.calib, method="prune", progress=False)
    src, dst = raw_bytes(model), raw_bytes(out)
    audit = json.loads((out / "dern_stream.json").read_text())
    fam = family_for(Checkpoint(model).config)
    for layer, rec in audit["layers"].items():
        for pos, expert in enumerate(rec["kept"]):
            for part in ("gate", "up", "down"):
                for new, old in zip(INT4.names(fam.expert_name(int(layer), pos, part)),
                                    INT4.names(fam.expert_name(int(layer), expert, part)), strict=True):
                    assert dst[new] == src[old]
    config_in, config_out = (json.loads((p / "config.json").read_text()) for p in (model, out))
    assert config_out["quantization_config"] == config_in["quantization_config"]
    assert CliRunner().invoke(main, ["verify", str(out), "--against", str(model)]).exit_code == 0


def test_recombined_experts_are_requantized_as_the_format_rounds(build, tmp_path):
    """The rebuilt experts are stored in the input's scheme, and their requantization error is that of the format
    itself: no more than the input's own quantization of its float experts (measured here)."""
    built = build("deepseek_v3")
    model = int4_copy(built, tmp_path)
    own = [float((load_weight(Checkpoint(model), n) - Checkpoint(built.model_dir).load(n)).norm()
                 / Checkpoint(built.model_dir).load(n).norm())
           for n in Checkpoint(built.model_dir).entries if ".experts." in n]
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=built.calib, alpha=0.2, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    errors = [r["requantization_error"] for r in audit["layers"].values() if r.get("rebuilt_experts")]
    assert errors and all(0 < e <= 1.25 * max(own) for e in errors), (errors, max(own))
    dst = Checkpoint(out)
    assert expert_storage(dst.config).compressed == INT4
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    # transformers decompresses as the library does: the same logits as a float copy of the output
    dense = tmp_path / "dense"
    tensors = {}
    for name in dst.entries:
        if name.endswith(INT4.params[0]):
            weight = name[:-len(INT4.params[0])] + "weight"
            tensors[weight] = load_weight(dst, weight)
        elif not name.endswith(INT4.params[1:]):
            tensors[name] = dst.load(name)
    from safetensors.torch import save_file

    edited_copy(out, dense, quantization_config=None)
    for f in dense.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


@pytest.mark.parametrize("fmt", FORMATS[1:], ids=lambda f: fmt_id(f))
def test_every_format_rewrites_and_loads(build, tmp_path, fmt):
    built = build("mixtral")
    model = int4_copy(built, tmp_path, fmt)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=built.calib, alpha=0.2, progress=False)
    assert expert_storage(Checkpoint(out).config).compressed == fmt
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    # The output loads wherever the input does: transformers 5.25 cannot load asymmetric pack-quantized experts
    # of any MoE checkpoint (its fused-expert conversion drops the zero points), this one's input included.
    assert loads(out) == loads(model)


def loads(path) -> str:
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    except Exception as e:  # whatever transformers raises
        return f"{type(e).__name__}: {str(e)[:60]}"
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert torch.isfinite(model(torch.randint(3, 250, (1, 8))).logits).all()
    # (transformers 5.25 leaves NVFP4's input_global_scale of MoE experts unused, the input's as well)
    unused = sorted({k.rsplit(".", 1)[-1] for k in info["unexpected_keys"]})
    return "loads" + (f", not using {unused}" if unused else "")


def test_the_streamed_forward_reads_compressed_weights(build, tmp_path):
    """dump and eval dequantize as transformers does: the same perplexity."""
    built = build("deepseek_v3")
    model = int4_copy(built, tmp_path)
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    report = dern_stream.evaluate(model, tokens=ids, batch_size=2, dtype="float32", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        loss = reference(ids, labels=ids).loss
    assert report.nll_per_token == pytest.approx(float(loss), rel=1e-5)


def test_unsupported_schemes_are_one_line_before_any_work(build, tmp_path):
    built = build("mixtral")
    model = int4_copy(built, tmp_path)
    q = json.loads((model / "config.json").read_text())["quantization_config"]
    cases = {
        "sparse-24-bitmask": {**q, "format": "sparse-24-bitmask",
                                 "config_groups": {"g": {**q["config_groups"]["group_0"], "format": None}}},
        "config_groups": {**q, "config_groups": {"a": q["config_groups"]["group_0"],
                                                 "b": q["config_groups"]["group_0"]}},
        "quantization_status": {**q, "quantization_status": "frozen"},
        "group_size": {**q, "config_groups": {"g": {**q["config_groups"]["group_0"], "weights": {
            **q["config_groups"]["group_0"]["weights"], "group_size": 0}}}},
        "actorder": {**q, "config_groups": {"g": {**q["config_groups"]["group_0"], "weights": {
            **q["config_groups"]["group_0"]["weights"], "actorder": "group"}}}},
    }
    for message, bad in cases.items():
        copy = edited_copy(model, tmp_path / message, quantization_config=bad)
        result = CliRunner().invoke(main, ["rewrite", str(copy), str(tmp_path / f"out-{message}"), "--experts", "4",
                                           "--calib", str(built.calib)])
        assert_clean_failure(result, tmp_path / f"out-{message}", message)
    result = CliRunner().invoke(main, ["rewrite", str(model), str(tmp_path / "out-width"), "--experts", "4",
                                       "--calib", str(built.calib), "--intermediate-size", "16"])
    assert_clean_failure(result, tmp_path / "out-width", "is not a multiple of 32")


KIMI_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


def test_kimi_k2_thinking_is_handled_as_deepseek_v3(build, tmp_path):
    """Kimi-K2-Thinking's config says model_type kimi_k2 (remote code, absent here) and names DeepSeek-V3's class;
    its routed experts are int4. The rewrite keeps model_type and auto_map; switched to deepseek_v3, the output loads,
    and dump and eval run its forward as DeepSeek-V3's."""
    built = build("deepseek_v3")
    int4 = int4_copy(built, tmp_path)
    kimi = edited_copy(int4, tmp_path / "kimi", model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
                       auto_map=KIMI_AUTO_MAP)
    out = tmp_path / "out"
    summary = dern_stream.rewrite(kimi, out, experts=4, calib=built.calib, progress=False)
    assert any("kimi_k2" in n and "deepseek_v3" in n for n in summary.notes)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and config["auto_map"] == KIMI_AUTO_MAP
    assert config["n_routed_experts"] == 4
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    switched = edited_copy(out, tmp_path / "switched", model_type="deepseek_v3")
    assert loads(switched) == "loads"
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    assert dern_stream.evaluate(out, tokens=ids, dtype="float32", progress=False).nll_per_token == pytest.approx(
        dern_stream.evaluate(switched, tokens=ids, dtype="float32", progress=False).nll_per_token, rel=1e-6)


def test_an_unknown_model_type_naming_no_supported_class_is_refused(build, tmp_path):
    built = build("deepseek_v3")
    odd = edited_copy(built.model_dir, tmp_path / "odd", model_type="kimi_k9", architectures=["KimiK9ForCausalLM"])
    result = CliRunner().invoke(main, ["rewrite", str(odd), str(tmp_path / "out"), "--experts", "4", "--calib",
                                       str(built.calib)])
    assert_clean_failure(result, tmp_path / "out", "'kimi_k9' is not supported")


def test_output_dtype_bf16_dequantizes_the_experts(build, tmp_path):
    built = build("deepseek_v3")
    model = int4_copy(built, tmp_path)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=built.calib, method="prune", output_dtype="bf16",
                        progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert loads(out) == "loads"
    result = CliRunner().invoke(main, ["verify", str(out), "--against", str(model)])
    assert result.exit_code == 0, result.output
    fam, src = family_for(config), Checkpoint(model)
    audit = json.loads((out / "dern_stream.json").read_text())
    layer, rec = next(iter(audit["layers"].items()))
    name = fam.expert_name(int(layer), 0, "down")
    assert torch.equal(Checkpoint(out).load(name),
                       load_weight(src, fam.expert_name(int(layer), rec["kept"][0], "down")).bfloat16())


# Experts left out of the quantization (docs/formats.md, "Experts left out of the quantization"): llm-compressor names
# them in `ignore`, exactly or by regex; the output keeps each kept expert's form and its config names them anew.

def ranked(model, calib) -> dict[int, list[int]]:
    """The experts a pruning to 4 keeps in each MoE layer, in order (the plan's choice: routers and dump only)."""
    plan = dern_stream.plan(model, experts=4, calib=calib, method="prune", progress=False)
    return {i: s.kept for i, s in plan.selection.items()}


def mixed_copy(built, tmp_path, plain: list[tuple[int, int]], regex_layer: int | None = None):
    """An int4 copy of `built` with the (layer, expert) pairs of `plain` stored unquantized and named in `ignore`
    exactly, or, in `regex_layer`, by one regex naming their numbers (which the output cannot keep as it is)."""
    model = save_compressed_copy(built.model_dir, tmp_path / "mixed-stored", plain=plain)
    q = json.loads((model / "config.json").read_text())["quantization_config"]
    if regex_layer is not None:
        experts = "|".join(str(e) for i, e in plain if i == regex_layer)
        q["ignore"] = [n for n in q["ignore"] if not n.startswith(f"model.layers.{regex_layer}.mlp.experts.")]
        q["ignore"].append(rf"re:model\.layers\.{regex_layer}\.mlp\.experts\.({experts})\..*")
    return edited_copy(model, tmp_path / "mixed", quantization_config=q)


def routed_modules(path) -> tuple[list[str], set[str]]:
    """Every routed-expert module of checkpoint `path`, and those it stores unquantized (a plain `.weight`)."""
    ckpt = Checkpoint(path)
    fam = family_for(ckpt.config)
    names = [fam.expert_name(i, e, p) for i in fam.moe_layers(ckpt.entries)
             for e in range(fam.num_experts(ckpt.config)) for p in ("gate", "up", "down")]
    return [n[:-len(".weight")] for n in names], {n[:-len(".weight")] for n in names if n in ckpt.entries}


def streamed_logits(path, ids) -> torch.Tensor:
    """The next-token logits [positions, vocab] of `path` by dump's and eval's streamed forward (which reads each
    weight in its own form)."""
    from dern_stream.stream import HiddenStore, StreamedModel
    from dern_stream.stream.executor import batched

    ckpt = Checkpoint(path)
    model = StreamedModel(ckpt, torch.device("cpu"), torch.float32)
    batches = batched(ids, len(ids))
    with ckpt, HiddenStore([(*b.shape, ckpt.config["hidden_size"]) for b in batches], model.dtype,
                           model.device) as store:
        model.embed(batches, store)
        for i in range(model.num_layers):
            model.run_layer(i, batches, store)
        return torch.cat([logits for logits, _ in model.logit_blocks(batches, store)])


def dense_reference(model, out, dest):
    """A float checkpoint of `out`'s layout whose routed experts are the input's kept experts, dequantized (from the
    input, not from the output) and everything else `out`'s: what pruning should compute."""
    from safetensors.torch import save_file

    src, dst = Checkpoint(model), Checkpoint(out)
    fam = family_for(dst.config)
    kept = {int(i): rec["kept"] for i, rec in json.loads((out / "dern_stream.json").read_text())["layers"].items()}
    sources = {fam.expert_name(i, j, p): fam.expert_name(i, e, p) for i, k in kept.items() for j, e in enumerate(k)
               for p in ("gate", "up", "down")}
    tensors = {}
    for name in dst.entries:
        weight = name[:-len(INT4.params[0])] + "weight" if name.endswith(INT4.params[0]) else name
        if not name.endswith(INT4.params[1:]):
            tensors[weight] = load_weight(src, sources[weight]) if weight in sources else dst.load(weight)
    edited_copy(out, dest, quantization_config=None)
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("method", ["prune", "default"])
def test_unquantized_experts_keep_their_form_and_the_config_names_them(build, tmp_path, method):
    """Some experts of both MoE layers are left out of the quantization (layer 2's named exactly, layer 1's by a
    regex naming their numbers), some kept and some dropped: each output expert is stored in its input expert's
    form, the output's ignore list names exactly the unquantized ones (by their new numbers), and it verifies."""
    from dern_stream.storage.compressed_targets import quantized

    built = build("deepseek_v3")
    kept = ranked(int4_copy(built, tmp_path), built.calib)
    dropped = {i: [e for e in range(8) if e not in k] for i, k in kept.items()}
    plain = [(1, kept[1][3]), (1, dropped[1][-1]), (2, kept[2][0]), (2, dropped[2][1])]
    assert kept[1][3] != 3  # (else layer 1's regex would still describe the output, and stay as it is)
    model = mixed_copy(built, tmp_path, plain, regex_layer=1)
    out = tmp_path / "out"
    summary = dern_stream.rewrite(model, out, experts=4, calib=built.calib, progress=False,
                                  **({"method": method} if method != "default" else {}))
    assert any("quantization_config's ignore list" in n for n in summary.notes)
    audit = json.loads((out / "dern_stream.json").read_text())["layers"]
    assert {int(i): rec["kept"] for i, rec in audit.items()} == kept
    fam = family_for(Checkpoint(out).config)
    expected = {fam.expert_name(i, j, p)[:-len(".weight")] for i, j in ((1, 3), (2, 0)) for p in ("gate", "up", "down")}
    modules, stored_plain = routed_modules(out)
    assert stored_plain == expected  # (the experts kept 4th in layer 1 and 1st in layer 2, unquantized in the input)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    # the library's own matching of the output's config: exactly the unquantized experts are left out
    assert set(modules) - quantized(q["config_groups"]["group_0"]["targets"], q["ignore"], modules) == expected
    assert {n for n in q["ignore"] if ".mlp.experts." in n} == expected  # exact names, by the new numbers
    assert not [n for n in q["ignore"] if n.startswith("re:") and r"experts\." in n]  # (layer 1's regex replaced)
    q_in = json.loads((model / "config.json").read_text())["quantization_config"]
    routed = lambda n: ".mlp.experts." in n or r"mlp\.experts" in n  # noqa: E731
    assert [n for n in q["ignore"] if not routed(n)] == [n for n in q_in["ignore"] if not routed(n)]  # the others
    assert CliRunner().invoke(main, ["verify", str(out), "--against", str(model)]).exit_code == 0
    # transformers 5.25 loads no MoE layer holding an unquantized expert: the output loads wherever the input does
    assert loads(out).startswith("loads") or not loads(model).startswith("loads")
    if method == "prune":  # pruning changes nothing but the experts' choice: the input's kept experts compute it
        ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
        reference = AutoModelForCausalLM.from_pretrained(dense_reference(model, out, tmp_path / "dense"),
                                                         dtype=torch.float32)
        with torch.no_grad():
            expected_logits = reference(ids).logits[:, :-1].flatten(0, 1)
        torch.testing.assert_close(streamed_logits(out, ids), expected_logits, rtol=1e-4, atol=1e-5)
    else:  # the rebuilt unquantized expert is written in its input's float dtype, the others requantized
        rebuilt = audit["2"]["rebuilt_experts"]
        assert kept[2][0] in rebuilt and Checkpoint(out).entries[fam.expert_name(2, 0, "down")].dtype == "F32"
        assert any(r.get("requantization_error") for r in audit.values())


def test_an_output_without_unquantized_experts_loads(build, tmp_path):
    """Where every unquantized expert is dropped, the pruned output is wholly int4: its ignore list names no routed
    expert, transformers loads it (the input it cannot), and it computes what the input's kept experts compute."""
    built = build("deepseek_v3")
    kept = ranked(int4_copy(built, tmp_path), built.calib)
    plain = [(i, e) for i, k in kept.items() for e in range(8) if e not in k][::2]
    model = mixed_copy(built, tmp_path, plain)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=built.calib, method="prune", progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert not [n for n in q["ignore"] if ".mlp.experts." in n] and not routed_modules(out)[1]
    assert not loads(model).startswith("loads") and loads(out) == "loads"
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(dense_reference(model, out, tmp_path / "dense"),
                                                     dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_an_expert_quantized_in_part_or_stored_otherwise_is_refused_in_one_line(build, tmp_path):
    built = build("deepseek_v3")
    model = mixed_copy(built, tmp_path, [(1, 3)])
    q = json.loads((model / "config.json").read_text())["quantization_config"]
    expert, other = "model.layers.1.mlp.experts.3.", "model.layers.1.mlp.experts.4."
    cases = {  # the config leaves only the down projection out; it quantizes the whole expert; it ignores a packed one
        f"{expert}down_proj unquantized but quantizes its expert's gate_proj and up_proj": [
            n for n in q["ignore"] if not n.startswith(expert) or n == f"{expert}down_proj"],
        f"{expert}gate_proj.weight is stored unquantized (F32), but": [
            n for n in q["ignore"] if not n.startswith(expert)],
        f"{other}gate_proj.weight_packed is stored quantized, but": [*q["ignore"], f"re:{other}.*"],
    }
    for case, (message, ignore) in enumerate(cases.items()):
        copy = edited_copy(model, tmp_path / f"case-{case}", quantization_config={**q, "ignore": ignore})
        out = tmp_path / f"out-{case}"
        result = CliRunner().invoke(main, ["rewrite", str(copy), str(out), "--experts", "4", "--calib",
                                           str(built.calib)])
        assert_clean_failure(result, out, message)


@pytest.mark.parametrize("method", ["default", "reap"])
def test_targets_naming_some_layers_are_kept(build, tmp_path, method):
    """A group whose targets name layer 1's experts only (layer 2's are all unquantized): the targets still describe
    the output as they are, rebuilt experts of layer 2 stay unquantized, and a method that chooses its experts as the
    layer runs can rewrite it (each layer is in one form)."""
    built = build("deepseek_v3")
    model = mixed_copy(built, tmp_path, [(2, e) for e in range(8)])
    q = json.loads((model / "config.json").read_text())["quantization_config"]
    q["config_groups"]["group_0"]["targets"] = [r"re:model\.layers\.1\.mlp\.experts\..*"]
    q["ignore"] = [n for n in q["ignore"] if ".mlp.experts." not in n]
    model = edited_copy(model, tmp_path / "targets", quantization_config=q)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=built.calib, progress=False,
                        **({"method": method} if method != "default" else {}))
    assert json.loads((out / "config.json").read_text())["quantization_config"] == q
    modules, stored_plain = routed_modules(out)
    assert stored_plain == {m for m in modules if m.startswith("model.layers.2.")}
    assert CliRunner().invoke(main, ["verify", str(out), "--against", str(model)]).exit_code == 0
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(streamed_logits(out, ids)).all()
