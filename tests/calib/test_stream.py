"""The streamed forward (`dump`, `evaluate`): equal to an ordinary full-model forward, one decoder
layer in memory at a time, resumable, and exact where the method is the identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr
from helpers import FAMILIES, load_model

import dern_stream
from dern_stream.calib import CalibWriter
from dern_stream.checkpoint import Checkpoint
from dern_stream.stream import HiddenStore, StreamedModel
from dern_stream.stream.executor import batched
from dern_stream.tiny_models import calibration_tokens


def _inputs(path) -> dict[str, tuple[np.ndarray, dict]]:
    group = zarr.open_group(str(path), mode="r")["moe_inputs"]
    return {k: (np.asarray(group[k][:]), dict(group[k].attrs)) for k in group.array_keys()}


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_dump_equals_full_model_capture(family, build, tmp_path):
    """Reference: built.calib, captured by hooks during an ordinary forward of the whole model."""
    built = build(family)
    out = tmp_path / "streamed.zarr"
    dern_stream.dump(built.model_dir, out, tokens=calibration_tokens(), batch_size=3, progress=False)
    streamed, full = _inputs(out), _inputs(built.calib)
    assert sorted(streamed) == sorted(full)
    for layer, (x, attrs) in streamed.items():
        ref, ref_attrs = full[layer]
        assert x.shape == ref.shape and x.dtype == ref.dtype == np.float16
        np.testing.assert_allclose(x.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)
        assert attrs["router_sha256"] == ref_attrs["router_sha256"] and attrs["complete"]
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["complete"] and "resume" not in root
    assert np.array_equal(root["tokens"][:], calibration_tokens().numpy())
    assert root.attrs["provenance"]["checkpoint_fingerprint"] == Checkpoint(built.model_dir).fingerprint()


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_perplexity_equals_full_model_perplexity(family, build):
    built = build(family)
    ids = calibration_tokens(sequences=5, length=24, seed=3)
    model = load_model(built.model_dir)
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    report = dern_stream.evaluate(built.model_dir, tokens=ids, batch_size=2, progress=False)
    assert report.tokens == 5 * 23
    assert report.perplexity == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_kl_and_top1_against_the_reference_equal_the_full_models(family, build, tmp_path):
    """eval --reference IN --text: both models streamed side by side give the KL divergence, top-1 agreement and
    perplexities that the two models loaded whole give."""
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, progress=False)
    ids = calibration_tokens(sequences=5, length=24, seed=4)
    with torch.no_grad():
        logits = [load_model(d)(input_ids=ids).logits[:, :-1].float().flatten(0, 1)
                  for d in (built.model_dir, out)]
    ref_log, log = (x.log_softmax(-1) for x in logits)
    kl = (ref_log.exp() * (ref_log - log)).sum(-1).double()
    targets = ids[:, 1:].reshape(-1, 1)
    # On the CPU, as the whole models above: the streaming is under test, not how two devices round.
    report = dern_stream.evaluate(out, tokens=ids, batch_size=2, reference=built.model_dir, device="cpu",
                                  progress=False)
    assert report.tokens == kl.numel() == 5 * 23
    assert report.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7) and report.kl_mean > 0
    assert report.kl_p99 == pytest.approx(float(np.percentile(kl.numpy(), 99)), rel=1e-4, abs=1e-7)
    assert report.top1_agreement == pytest.approx(float((logits[0].argmax(-1) == logits[1].argmax(-1)).double().mean()))
    assert report.perplexity == pytest.approx(math.exp(-float(log.gather(1, targets).mean())), rel=1e-5)
    assert report.reference_perplexity == pytest.approx(math.exp(-float(ref_log.gather(1, targets).mean())), rel=1e-5)
    itself = dern_stream.evaluate(built.model_dir, tokens=ids, batch_size=2, reference=built.model_dir, progress=False)
    assert itself.kl_mean == itself.kl_p99 == 0 and itself.top1_agreement == 1
    assert itself.perplexity == itself.reference_perplexity


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_at_most_one_decoder_layer_is_materialised(family, build):
    built = build(family)
    model = StreamedModel(Checkpoint(built.model_dir), torch.device("cpu"))
    real = lambda m: sum(p.numel() for p in m.parameters() if not p.is_meta)  # noqa: E731
    assert real(model.model) == 0
    seen = []

    def check(layer, _args):
        total = real(model.model)
        assert total == real(layer) == sum(p.numel() for p in layer.parameters()) == model.materialised
        seen.append(total)

    hooks = [layer.register_forward_pre_hook(check) for layer in model.layers]
    ids = calibration_tokens(sequences=4, length=16)
    batches = batched(ids, 2)
    store = HiddenStore([(*b.shape, built.config["hidden_size"]) for b in batches], model.dtype, model.device)
    model.embed(batches, store)
    for i in range(model.num_layers):
        model.run_layer(i, batches, store)
    for h in hooks:
        h.remove()
    assert len(seen) == model.num_layers * len(batches)
    assert real(model.model) == 0 and model.materialised == 0


def test_interrupted_dump_resumes_to_the_same_result(build, tmp_path, monkeypatch):
    built = build("deepseek_v3")  # layer 0 is dense: the resume state must cover non-MoE layers too
    text = built.model_dir.parent / "corpus.txt"
    kwargs = dict(text=text, num_tokens=1024, seq_len=64, batch_size=4, progress=False)
    whole = tmp_path / "whole.zarr"
    dern_stream.dump(built.model_dir, whole, **kwargs)

    finish = CalibWriter.finish_layer

    def crash_on_layer_2(self, layer):
        if layer == 2:
            raise KeyboardInterrupt  # as if stopped while layer 2 was being written
        finish(self, layer)

    resumed = tmp_path / "resumed.zarr"
    monkeypatch.setattr(CalibWriter, "finish_layer", crash_on_layer_2)
    with pytest.raises(KeyboardInterrupt):
        dern_stream.dump(built.model_dir, resumed, **kwargs)
    monkeypatch.setattr(CalibWriter, "finish_layer", finish)
    partial = _inputs(resumed)
    assert partial["1"][1]["complete"] and not partial["2"][1]["complete"]
    with pytest.raises(dern_stream.DernError, match="layer 2 is incomplete"):
        dern_stream.rewrite(built.model_dir, tmp_path / "out", experts=4, calib=resumed, progress=False)

    summary = dern_stream.dump(built.model_dir, resumed, **kwargs)
    assert summary.resumed_after_layer == 1
    a, b = _inputs(whole), _inputs(resumed)
    assert sorted(a) == sorted(b) == ["1", "2"]
    for layer in a:
        assert np.array_equal(a[layer][0], b[layer][0]) and a[layer][1] == b[layer][1]


def test_resume_with_other_options_is_refused(build, tmp_path, monkeypatch):
    built = build("mixtral")
    text = built.model_dir.parent / "corpus.txt"
    out = tmp_path / "d.zarr"
    monkeypatch.setattr(CalibWriter, "finish_layer", lambda self, layer: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        dern_stream.dump(built.model_dir, out, text=text, num_tokens=512, seq_len=64, progress=False)
    monkeypatch.undo()
    with pytest.raises(dern_stream.DernError, match="made with a different num_tokens, seq_len"):
        dern_stream.dump(built.model_dir, out, text=text, num_tokens=1024, seq_len=32, progress=False)
    with pytest.raises(dern_stream.DernError, match=r"a different forward device or dtype \(.*, float32 -> .*, "
                                                    r"bfloat16\)"):
        dern_stream.dump(built.model_dir, out, text=text, num_tokens=512, seq_len=64, dtype="bfloat16", progress=False)
    dern_stream.dump(built.model_dir, out, text=text, num_tokens=1024, seq_len=32, overwrite=True, progress=False)
    with pytest.raises(dern_stream.DernError, match="already exists and is complete"):
        dern_stream.dump(built.model_dir, out, text=text, num_tokens=1024, seq_len=32, progress=False)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_layer_error_is_zero_for_the_identity_rewrite_and_not_for_a_real_one(family, build, tmp_path):
    built = build(family)
    same, smaller = tmp_path / "same", tmp_path / "smaller"
    dern_stream.rewrite(built.model_dir, same, experts=8, calib=built.calib, alpha=1.0, progress=False)
    dern_stream.rewrite(built.model_dir, smaller, experts=4, calib=built.calib, alpha=0.0, progress=False)
    identity = dern_stream.evaluate(same, reference=built.model_dir, calib=built.calib, progress=False)
    assert [e.layer for e in identity.layer_errors] == [1, 2] if family == "deepseek_v3" else [0, 1, 2]
    assert all(e.rel_l2 == 0.0 and e.tokens == 256 for e in identity.layer_errors)
    changed = dern_stream.evaluate(smaller, reference=built.model_dir, calib=built.calib, progress=False)
    assert all(0.0 < e.rel_l2 < 2.0 for e in changed.layer_errors)


def test_hidden_states_spilled_to_disk_give_the_same_perplexity(build, tmp_path):
    built = build("olmoe")
    ids = calibration_tokens(sequences=4, length=16)
    model = StreamedModel(Checkpoint(built.model_dir), torch.device("cpu"))
    results = []
    for placement in ("host", "disk"):
        batches = batched(ids, 3)
        store = HiddenStore([(*b.shape, 64) for b in batches], model.dtype, model.device, placement=placement,
                            scratch_dir=tmp_path)
        model.embed(batches, store)
        for i in range(model.num_layers):
            model.run_layer(i, batches, store)
        results.append(model.nll(batches, store))
        store.close()
    assert results[0] == results[1]
    assert not list(tmp_path.iterdir())  # the scratch file is gone


def test_tied_embeddings_stream_like_the_full_model(build):
    """No lm_head.weight on disk: the head is the embedding matrix, as transformers ties it."""
    built = build("olmoe", tie_word_embeddings=True)
    assert "lm_head.weight" not in Checkpoint(built.model_dir).entries
    ids = calibration_tokens(sequences=3, length=20, seed=5)
    model = load_model(built.model_dir)
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    report = dern_stream.evaluate(built.model_dir, tokens=ids, progress=False)
    assert report.perplexity == pytest.approx(expected, rel=1e-5)


def test_token_ids_outside_the_vocabulary_are_refused(build, tmp_path):
    built = build("mixtral")
    vocab = built.config["vocab_size"]
    ids = torch.full((2, 8), vocab)  # one past the last id
    with pytest.raises(dern_stream.DernError, match=f"token id {vocab} is outside the model's vocabulary"):
        dern_stream.evaluate(built.model_dir, tokens=ids, progress=False)
    with pytest.raises(dern_stream.DernError, match="outside the model's vocabulary"):
        dern_stream.dump(built.model_dir, tmp_path / "d.zarr", tokens=ids, progress=False)
    assert not (tmp_path / "d.zarr").exists()
