"""The kernels' work follows the visible pairs: counted tile by tile through the Triton interpreter.

Every tl.dot and every 2-D tl.where the interpreter executes is recorded per kernel. The expected
counts come from the boolean mask alone: a (query tile, key tile) pair is visited iff it holds a
visible pair, and masked iff it also holds an invisible pair or runs past the sequence end. So a kernel
that loads a tile nobody sees, or masks a tile that needs no mask, or skips a visible tile, fails here.
"""
import collections
import dataclasses

import pytest
import torch
from conftest import DEVICE, HAS_GPU
from triton.runtime import interpreter

import mimkernels
from mimkernels.triton import attention as kernels
from mimkernels.triton.attention import AttentionConfigs, TileConfig

pytestmark = pytest.mark.skipif(HAS_GPU, reason="counts tile work through the Triton interpreter")

DOTS_PER_TILE = {"_prefix_causal_fwd": 2, "_prefix_causal_bwd_dkdv": 4, "_prefix_causal_bwd_dq": 3}


@pytest.fixture
def tile_work(monkeypatch):
    """{kernel name: Counter(dot=..., masked=...)} filled while the kernels run."""
    work = collections.defaultdict(collections.Counter)
    running = []
    builder = interpreter.interpreter_builder
    create_dot, create_select = builder.create_dot, builder.create_select

    def counted_dot(*args):
        work[running[-1]]["dot"] += 1
        return create_dot(*args)

    def counted_select(cond, lhs, rhs):
        if cond.data.ndim == 2:  # the score mask; scalar selects compute loop bounds
            work[running[-1]]["masked"] += 1
        return create_select(cond, lhs, rhs)

    monkeypatch.setattr(builder, "create_dot", counted_dot)
    monkeypatch.setattr(builder, "create_select", counted_select)
    for name in ("_prefix_causal_fwd", "_prefix_causal_bwd_dkdv", "_prefix_causal_bwd_dq", "_bwd_row_dot",
                 "_prefix_causal_bwd_per_head"):
        kernel = getattr(kernels, name)

        def run(*args, _run=kernel.run, _name=name, **kwargs):
            running.append(_name)
            try:
                return _run(*args, **kwargs)
            finally:
                running.pop()

        monkeypatch.setattr(kernel, "run", run)
    return work


def expected_tiles(seq_len, prefixes, heads, query_block, key_block, pad_queries_masked):
    """(visited, masked) tile counts over the batch, from the mask alone."""
    visited = masked = 0
    for prefix in prefixes:
        mask = mimkernels.prefix_causal_mask(seq_len, int(prefix))[0, 0]
        for q0 in range(0, seq_len, query_block):
            for k0 in range(0, seq_len, key_block):
                tile = mask[q0:q0 + query_block, k0:k0 + key_block]
                if not tile.any():
                    continue
                visited += 1
                past_end = k0 + key_block > seq_len or (pad_queries_masked and q0 + query_block > seq_len)
                masked += bool(past_end or not tile.all())
    return visited * heads, masked * heads


def _configs(fwd, dkdv, dq):
    return AttentionConfigs(TileConfig(*fwd, 4, 1), TileConfig(*dkdv, 4, 1), TileConfig(*dq, 4, 1))


@pytest.mark.parametrize("configs", [
    _configs((16, 16), (16, 16), (16, 16)),
    _configs((32, 16), (16, 32), (32, 16)),
    _configs((16, 32), (32, 16), (16, 32)),
], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("seq_len, prefixes", [
    (50, [0, 50, 77]), (64, [16, 33, 70]), (97, [1, 48, 96]),  # prefixes past N: as long as N
])
def test_tiles_visited_and_masked(tile_work, configs, seq_len, prefixes):
    heads = 2
    q, k, v = (torch.randn(len(prefixes), heads, seq_len, 16, device=DEVICE) for _ in range(3))
    prefix = torch.tensor(prefixes, device=DEVICE)
    out, lse = kernels.forward(q, k, v, prefix, 0.25, configs)
    kernels.backward(torch.randn_like(out), q, k, v, out, lse, prefix, 0.25, configs)

    plans = {
        "_prefix_causal_fwd": (configs.forward.block_m, configs.forward.block_n, False),
        "_prefix_causal_bwd_dq": (configs.backward_dq.block_m, configs.backward_dq.block_n, False),
        "_prefix_causal_bwd_dkdv": (configs.backward_dkdv.block_m, configs.backward_dkdv.block_n, True),
    }
    for name, (query_block, key_block, pad_queries_masked) in plans.items():
        visited, masked = expected_tiles(seq_len, prefixes, heads, query_block, key_block, pad_queries_masked)
        assert tile_work[name]["dot"] == DOTS_PER_TILE[name] * visited, name
        assert tile_work[name]["masked"] == masked, name
    assert not tile_work["_bwd_row_dot"]


@pytest.mark.parametrize("variant, kernel", [("atomic", "_prefix_causal_bwd_dkdv"),
                                             ("per_head", "_prefix_causal_bwd_per_head")])
@pytest.mark.parametrize("seq_len, prefixes", [(50, [0, 50]), (97, [1, 48, 96])])
def test_one_launch_backwards_visit_the_same_tiles(tile_work, seq_len, prefixes, variant, kernel):
    """The atomic-dQ and the per-head backward: one launch, five matmuls per visited (query tile, key tile) pair,
    the same pairs masked as in the dK/dV kernel; no other dK/dV or dQ kernel runs."""
    heads, configs = 2, _configs((16, 16), (16, 32), (32, 16))
    if variant == "per_head":
        configs = dataclasses.replace(configs, backward_per_head=configs.backward_dkdv)
    q, k, v = (torch.randn(len(prefixes), heads, seq_len, 16, device=DEVICE) for _ in range(3))
    prefix = torch.tensor(prefixes, device=DEVICE)
    out, lse = kernels.forward(q, k, v, prefix, 0.25, configs)
    kernels.backward(torch.randn_like(out), q, k, v, out, lse, prefix, 0.25, configs, atomic_dq=variant == "atomic")
    visited, masked = expected_tiles(seq_len, prefixes, heads, 16, 32, True)
    assert tile_work[kernel]["dot"] == 5 * visited
    assert tile_work[kernel]["masked"] == masked
    others = {"_prefix_causal_bwd_dkdv", "_prefix_causal_bwd_dq", "_prefix_causal_bwd_per_head"} - {kernel}
    assert not any(tile_work[name] for name in others)


def test_delta_in_the_dq_kernel_skips_the_pre_pass(tile_work):
    """With backward_dq_delta the dQ kernel visits the same tiles (3 matmuls each) and the row-dot kernel never runs."""
    seq_len, prefixes, heads = 97, [1, 48, 96], 2
    base = _configs((16, 16), (16, 32), (32, 16))
    configs = AttentionConfigs(base.forward, base.backward_dkdv, base.backward_dq, None, base.backward_dq)
    q, k, v = (torch.randn(len(prefixes), heads, seq_len, 16, device=DEVICE) for _ in range(3))
    prefix = torch.tensor(prefixes, device=DEVICE)
    out, lse = kernels.forward(q, k, v, prefix, 0.25, configs)
    kernels.backward(torch.randn_like(out), q, k, v, out, lse, prefix, 0.25, configs)
    visited, _ = expected_tiles(seq_len, prefixes, heads, 32, 16, False)
    assert tile_work["_prefix_causal_bwd_dq"]["dot"] == 3 * visited
    assert not tile_work["_bwd_row_dot"]

