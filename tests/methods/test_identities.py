"""Numerical identities of the method, checked against independent references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from helpers import FAMILIES, decoder_layers, load_model, raw_bytes, read_tensors

import dern_stream
from dern_stream.checkpoint.config_view import config_view
from dern_stream.experts.kmeans import gate_linf_init, spherical_weighted_kmeans
from dern_stream.experts.segments import ExpertStack, reassign_segments, transfer_counts, transfer_router
from dern_stream.families import family_for
from dern_stream.stream.executor import moe_block_of, moe_router_weight


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_experts_with_alpha_one_is_the_identity(family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=8, calib=built.calib, alpha=1.0, progress=False)
    assert raw_bytes(out) == raw_bytes(built.model_dir)
    assert (out / "config.json").read_text() == (built.model_dir / "config.json").read_text()


def _reference_importance(model, calib, layer: int, fam) -> torch.Tensor:
    """Eq. 1 with transformers' own router module on the dumped inputs (independent of dern_stream)."""
    x = torch.from_numpy(np.asarray(zarr.open_group(str(calib), mode="r")["moe_inputs"][str(layer)][:])).float()
    decoder_layer = decoder_layers(model)[layer]
    block = moe_block_of(decoder_layer)
    with torch.no_grad():
        if block is getattr(decoder_layer, "experts", None):  # Gemma 4: its router reads x / the experts' norm weight
            _, weights, idx = decoder_layer.router(x / decoder_layer.pre_feedforward_layernorm_2.weight)
            weights = weights / decoder_layer.router.per_expert_scale[idx]  # (scaled after the choice)
        elif hasattr(block, "expert_bias"):  # LFM2-MoE (gate) and AFMoE (router, on [batch, seq, d]) take their bias
            if hasattr(block, "gate"):
                _, weights, idx = block.gate(x, block.expert_bias)
            else:
                _, weights, idx = block.router(x[None], block.expert_bias)
        elif hasattr(block, "route_tokens_to_experts"):  # DBRX: its router gives the logits alone
            weights, idx = block.route_tokens_to_experts(block.router(x))
        elif hasattr(block, "router"):  # PhiMoE, Granite, Llama-4
            routed = block.router(x)
            if len(routed) == 2:  # Llama-4: sigmoid scores of every expert (0 where not selected), logits
                scores, logits = routed
                idx = torch.topk(logits, fam.top_k(config_view(model.config.to_dict())), dim=-1).indices
                weights = scores.gather(1, idx)
            else:  # (logits, weights, indices); transformers before 5.2x gave (indices, weights, logits)
                _, weights, idx = routed if routed[2].dtype in (torch.int32, torch.int64) else routed[::-1]
        elif hasattr(block, "e_score_correction_bias"):  # MiniMax-M2 hands its bias to the router
            _, weights, idx = block.gate(x, block.e_score_correction_bias)
        else:
            _, weights, idx = block.gate(x)
    share = weights.double() / weights.double().sum(-1, keepdim=True)
    n = moe_router_weight(decoder_layer).shape[0]  # (LongCat-Flash: its zero experts' rows too, which are never ranked)
    totals = torch.zeros(n, dtype=torch.float64).index_add_(0, idx.reshape(-1), share.reshape(-1)) / x.shape[0]
    return totals[:fam.num_experts(config_view(model.config.to_dict()))]


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_one_equals_plain_pruning(family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    keep = 4
    dern_stream.rewrite(built.model_dir, out, experts=keep, calib=built.calib, alpha=1.0, recipe="paper",
                        progress=False)

    model = load_model(built.model_dir)
    fam = family_for(built.config)
    src, dst = read_tensors(built.model_dir), read_tensors(out)
    for layer in fam.moe_layers(src):
        scores = _reference_importance(model, built.calib, layer, fam)
        if fam.grouped_routing(built.config):  # documented rule: K / n_group best experts of each group
            kept = [g * 4 + int(i) for g in range(2) for i in sorted(torch.topk(scores[g * 4:(g + 1) * 4], 2).indices)]
        else:
            kept = sorted(torch.topk(scores, keep).indices.tolist())
        routed = fam.num_experts(built.config)  # the zero experts' rows (LongCat-Flash) follow the kept ones
        router = src[fam.router_name(layer)]
        assert dst[fam.router_name(layer)].equal(torch.cat([router[kept], router[routed:]]))
        if fam.bias_name(layer):
            bias = src[fam.bias_name(layer)]  # [N] or [1, N]
            assert dst[fam.bias_name(layer)].equal(torch.cat([bias[..., kept], bias[..., routed:]], dim=-1))
        if fam.fused is not None:  # expert e is slice e of each fused tensor (DBRX: rows e * h to (e + 1) * h)
            for name in fam.fused_names(layer):
                source = src[name].view(routed, -1, *src[name].shape[1:]) if fam.fused.flat else src[name]
                assert dst[name].equal(source[kept].reshape(dst[name].shape))
            continue
        for new, old in enumerate(kept):
            for part in ("gate", "up", "down"):
                assert dst[fam.expert_name(layer, new, part)].equal(src[fam.expert_name(layer, old, part)])
    if fam.fused is None:
        assert len(dst) == len(src) - sum(3 * (8 - keep) for _ in fam.moe_layers(src))


def test_deepseek_v2_group_limited_routing_matches_transformers(build, tmp_path):
    """group_limited_greedy: importance from transformers' router; K = 4 keeps 2 of each of the 2 groups."""
    built = build("deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=1)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, alpha=1.0, progress=False)
    model = load_model(built.model_dir)
    audit = json.loads((out / "dern_stream.json").read_text())
    for layer, rec in audit["layers"].items():
        scores = _reference_importance(model, built.calib, int(layer), family_for(built.config))
        torch.testing.assert_close(torch.tensor(rec["importance"], dtype=torch.float64), scores, rtol=0, atol=1e-6)
        kept = [g * 4 + int(i) for g in range(2) for i in sorted(torch.topk(scores[g * 4:(g + 1) * 4], 2).indices)]
        assert rec["kept"] == kept
    assert json.loads((out / "config.json").read_text())["n_group"] == 2
    assert torch.isfinite(load_model(out)(torch.randint(3, 250, (1, 8))).logits).all()


def test_segments_sum_to_the_expert_output(build):
    """sum_i w_d,i * act(w_g,i . x) * (w_u,i . x) equals transformers' own expert forward."""
    built = build("qwen3_moe")
    model = load_model(built.model_dir)
    fam = family_for(built.config)
    src = read_tensors(built.model_dir)
    layer, expert = 1, 5
    stack = ExpertStack(*(torch.stack([src[fam.expert_name(layer, e, p)] for e in range(8)])
                          for p in ("gate", "up", "down")))
    segs = stack.segments([expert])  # [h, 3d] rows (gate | up | down)
    d = stack.gate.shape[-1]
    x = torch.randn(10, d)
    by_segments = sum(
        segs[i, 2 * d:] * F.silu(x @ segs[i, :d])[:, None] * (x @ segs[i, d:2 * d])[:, None]
        for i in range(segs.shape[0])
    )
    experts = decoder_layers(model)[layer].mlp.experts
    with torch.no_grad():
        reference = experts(x, torch.full((10, 1), expert), torch.ones(10, 1))
    torch.testing.assert_close(by_segments, reference, rtol=1e-5, atol=1e-6)


def test_router_transfer_eq8_constructed_case():
    router = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, -4.0], [-0.0, 1.0, 0.5], [8.0, 8.0, 0.0], [5.0, 5.0, 5.0]])
    kept, dropped = [0, 2, 4], [1, 3]
    counts = torch.tensor([[2, 1, 0], [0, 3, 0]])  # m[o, r], h = 4
    out = transfer_router(router, kept, dropped, counts, intermediate=4)
    expected0 = router[0] + 2 / 4 * router[1]
    expected2 = router[2] + 1 / 4 * router[1] + 3 / 4 * router[3]
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], expected2)
    # Expert 4 received nothing: its row is bit-identical (negative zeros and all).
    assert out[2].equal(router[4])
    assert torch.equal(transfer_router(router, [2], [], torch.zeros(0, 1, dtype=torch.long), 4)[0].view(torch.int32),
                       router[2].view(torch.int32))


def test_duplicate_expert_moves_wholly_and_transfers_its_routing():
    torch.manual_seed(0)
    n, h, d = 3, 6, 5
    stack = ExpertStack(torch.randn(n, h, d), torch.randn(n, h, d), torch.randn(n, d, h))
    perm = torch.randperm(h)  # expert 1 is expert 0 with its neurons permuted
    stack.gate[1], stack.up[1], stack.down[1] = stack.gate[0][perm], stack.up[0][perm], stack.down[0][:, perm]
    assignment = reassign_segments(stack, kept=[0, 2], dropped=[1], components=("up", "down"), alpha=0.99,
                                   block_bytes=64)
    assert assignment.tolist() == [[0] * h]
    counts = transfer_counts(assignment, 2)
    assert counts.tolist() == [[h, 0]]
    router = torch.randn(n, d)
    new = transfer_router(router, [0, 2], [1], counts, h)
    torch.testing.assert_close(new[0], router[0] + router[1])
    assert new[1].equal(router[2])


def test_blockwise_similarity_equals_the_full_matrix():
    torch.manual_seed(1)
    stack = ExpertStack(torch.randn(6, 16, 8), torch.randn(6, 16, 8), torch.randn(6, 8, 16))
    args = dict(kept=[1, 3, 4], dropped=[0, 2, 5], components=("gate", "up", "down"), alpha=0.1)
    tiny_blocks = reassign_segments(stack, **args, block_bytes=1)
    one_block = reassign_segments(stack, **args, block_bytes=2**30)
    assert tiny_blocks.equal(one_block)
    pool = F.normalize(stack.segments([0, 2, 5]), dim=-1)
    kept = F.normalize(stack.segments([1, 3, 4]), dim=-1)
    full = (pool @ kept.T).view(-1, 3, 16).amax(-1)
    best, arg = full.max(-1)
    expected = torch.where(best > 0.1, arg, torch.full_like(arg, -1)).view(3, 16)
    assert one_block.equal(expected)


def test_kmeans_singletons_reproduce_members_exactly():
    torch.manual_seed(2)
    members = torch.randn(7, 12)
    cols = torch.arange(4, 12)
    res = spherical_weighted_kmeans(members, torch.rand(7), cols, k=7, max_iters=5, init=torch.arange(7))
    assert res.segments.equal(members)
    assert sorted(res.assignment.tolist()) == list(range(7))


def test_kmeans_init_takes_largest_gate_linf_norms_ties_to_earlier():
    d = 3
    members = torch.zeros(5, 3 * d)
    members[:, :d] = torch.tensor([[0.1, -0.2, 0.0], [0.0, 0.0, -3.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.5, 0, 0]])
    members[:, d:] = 100.0  # up/down magnitudes must not matter
    assert gate_linf_init(members, d, 3).tolist() == [1, 3, 2]


def test_kmeans_centroid_is_the_weighted_norm_equalised_mean():
    v1 = torch.tensor([3.0, 0.0, 0.0, 0.0])
    v2 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    members = torch.stack([v1, v2])
    res = spherical_weighted_kmeans(members, torch.tensor([3.0, 1.0]), torch.arange(4), k=1, max_iters=10,
                                    init=torch.tensor([0]))
    r = (3.0 + 1.0) / 2  # mean member norm
    direction = 0.75 * v1 / 3.0 + 0.25 * v2 / 1.0  # weights 3:1 normalised, unit vectors
    torch.testing.assert_close(res.segments[0], direction / direction.norm() * r)
    # Weights that are all zero fall back to the plain mean instead of dividing by zero.
    res0 = spherical_weighted_kmeans(members, torch.zeros(2), torch.arange(4), k=1, max_iters=10,
                                     init=torch.tensor([0]))
    even = v1 / 3.0 + v2
    torch.testing.assert_close(res0.segments[0], even / even.norm() * r)


def test_kmeans_assigns_by_similarity_columns_only():
    # Members 0/1 share up|down but differ in gate; members 2/3 likewise. With sim columns = up|down the
    # clusters are {0,1} and {2,3} although gates would pair them {0,2} and {1,3}.
    g_a, g_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    ud_a, ud_b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    members = torch.stack([torch.cat([g_a, ud_a]), torch.cat([g_b, ud_a]),
                           torch.cat([g_a, ud_b]), torch.cat([g_b, ud_b])])
    res = spherical_weighted_kmeans(members, torch.ones(4), torch.arange(2, 6), k=2, max_iters=10,
                                    init=torch.tensor([0, 3]))
    a = res.assignment.tolist()
    assert a[0] == a[1] and a[2] == a[3] and a[0] != a[2]


def test_kmeans_blockwise_assignment_equals_one_block():
    torch.manual_seed(3)
    members = torch.randn(300, 24)
    args = dict(weights=torch.rand(300), sim_columns=torch.arange(8, 24), k=40, max_iters=10,
                init=gate_linf_init(torch.randn(300, 24), 8, 40))
    small = spherical_weighted_kmeans(members, **args, block_bytes=4 * 40 * 7)  # 7 rows per block
    whole = spherical_weighted_kmeans(members, **args, block_bytes=2**30)
    assert small.assignment.equal(whole.assignment) and small.segments.equal(whole.segments)
