"""gpt-oss: fused experts with gate and up interleaved, expert biases inside each neuron's segment, a router
bias inside the logits, and the clamped SwiGLU. (Its routing and forward against transformers' own block,
dump, eval and the K = N identity run with every family.)"""

from __future__ import annotations

import json

import torch

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.experts.recombine import DernParams, dern_layer
from dern_stream.experts.segments import ExpertStack
from dern_stream.families import FAMILIES

LAYER = "model.layers.1.mlp."


def test_biases_are_clustered_as_the_segments_weight_columns_are():
    """DERN on experts with biases equals DERN on the same experts with each bias moved into its weight
    as an extra input column (x -> [x, 1]): the biases are part of each neuron's segment, nothing more."""
    torch.manual_seed(0)
    n, h, d = 6, 8, 5
    gate, up, down = torch.randn(n, h, d), torch.randn(n, h, d), torch.randn(n, d, h)
    bias, down_bias = torch.randn(n, h, 2), torch.randn(n, d)
    biased = ExpertStack(gate, up, down, bias, down_bias)
    augmented = ExpertStack(torch.cat((gate, bias[..., :1]), -1), torch.cat((up, bias[..., 1:]), -1),
                            torch.cat((down, torch.zeros(n, 1, h)), 1))
    router, importance = torch.randn(n, d), torch.softmax(torch.randn(n), 0)
    params = DernParams(alpha=0.0, sim_components=("down",), kmeans_init="own")
    a = dern_layer(biased, router, importance, [0, 2, 4], params)
    b = dern_layer(augmented, router, importance, [0, 2, 4], params)
    assert a.counts.equal(b.counts) and a.counts.sum() > 0
    for x, y in zip(a.experts, b.experts, strict=True):
        # The same neurons, in the order of their seeds' gate norms (which the bias column changes).
        mine = torch.cat((x.gate, x.up, x.down.T, x.bias), -1)
        theirs = torch.cat((y.gate[:, :d], y.up[:, :d], y.down[:d].T, y.gate[:, d:], y.up[:, d:]), -1)
        torch.testing.assert_close(mine[mine[:, 0].argsort()], theirs[theirs[:, 0].argsort()])


def test_interleaved_layout_round_trips():
    fused = FAMILIES["gpt_oss"].fused
    slices = [torch.randn(s) for s in fused.shapes(6, 4)]
    gate, up, down, bias, down_bias = fused.split(slices)
    assert gate.equal(slices[0][:, 0::2].T) and up.equal(slices[0][:, 1::2].T) and down.equal(slices[1].T)
    assert bias[:, 0].equal(slices[2][0::2]) and bias[:, 1].equal(slices[2][1::2]) and down_bias.equal(slices[3])
    assert all(x.equal(y) for x, y in zip(fused.join(gate, up, down, bias, down_bias), slices, strict=True))


def test_router_bias_follows_eq8_and_kept_down_biases_stay(build, tmp_path):
    built = build("gpt_oss")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, alpha=0.2, recipe="paper", progress=False)
    src, dst = Checkpoint(built.model_dir), Checkpoint(out)
    rec = json.loads((out / "dern_stream.json").read_text())["layers"]["1"]
    bias, h = src.load(LAYER + "router.bias").double(), 32
    expected = bias[rec["kept"]].clone()
    for dropped, kept, moved in rec["transfers"]:
        expected[rec["kept"].index(kept)] += moved / h * bias[dropped]
    torch.testing.assert_close(dst.load(LAYER + "router.bias").double(), expected, rtol=0, atol=1e-2)
    assert rec["transfers"]
    down_bias = src.load(LAYER + "experts.down_proj_bias")
    assert dst.load(LAYER + "experts.down_proj_bias").equal(down_bias[rec["kept"]])  # one per expert: kept
