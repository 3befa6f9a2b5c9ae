"""Prefix-causal / causal / full attention against the float64 reference, forward and backward.

Error budget (as flash-attention's tests): the kernel's max error against the float64 reference may
be at most twice that of PyTorch's own implementation in the same dtype, plus a small floor.
Without a GPU the Triton kernels run through the interpreter (tests/conftest.py), so shapes stay small.
"""
import dataclasses
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from triton.tools.tensor_descriptor import TensorDescriptor

import mimkernels
from mimkernels import reference
from mimkernels.ops import attention as attention_ops
from mimkernels.triton import attention as kernels
from mimkernels.triton import attention_tuning, launch
from mimkernels.triton.attention import AttentionConfigs, TileConfig

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 tl.dot is broken: bf16 is GPU-only


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Fill every kernel output with NaN before the kernel runs, so an unwritten element fails the test."""
    allocate = kernels._empty_bnhd

    def poisoned(like):
        return allocate(like).fill_(float("nan"))

    monkeypatch.setattr(kernels, "_empty_bnhd", poisoned)
    from mimkernels.ops import attention as ops

    allocate_packed = ops._empty_packed
    monkeypatch.setattr(ops, "_empty_packed", lambda qkv: allocate_packed(qkv).fill_(float("nan")))


def make_qkv(shape, dtype, layout="contiguous", magnitude=1.0, seed=0):
    """q, k, v leaves of ``shape`` [B, H, N, D], stored in ``layout``; returns (q, k, v, leaves)."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, seq_len, head_dim = shape
    if layout == "contiguous":
        leaves = [torch.randn(shape, generator=gen) * magnitude for _ in range(3)]
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in leaves]
        return (*leaves, leaves)
    if layout == "packed_qkv":  # timm / MAE: one linear gives [B, N, 3*H*D]
        qkv = (torch.randn(batch, seq_len, 3 * heads * head_dim, generator=gen) * magnitude).to(DEVICE, dtype)
        qkv.requires_grad_()
        q, k, v = qkv.reshape(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v, [qkv]
    if layout == "bnhd":
        leaves = [(torch.randn(batch, seq_len, heads, head_dim, generator=gen) * magnitude).to(DEVICE, dtype)
                  for _ in range(3)]
        leaves = [t.requires_grad_() for t in leaves]
        return (*(t.transpose(1, 2) for t in leaves), leaves)
    raise ValueError(layout)


def outputs_and_grads(fn, q, k, v, leaves, grad_seed=1):
    out = fn(q, k, v)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out, *grads]


def float64_twins(leaves):
    return [t.detach().double().requires_grad_() for t in leaves]


def rebuild(leaves, layout, shape):
    """q, k, v views of ``leaves`` as make_qkv built them."""
    batch, heads, seq_len, head_dim = shape
    if layout == "contiguous":
        return leaves
    if layout == "packed_qkv":
        return leaves[0].reshape(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    return [t.transpose(1, 2) for t in leaves]


def assert_within_budget(kernel_fn, reference_fn, shape, dtype, layout="contiguous", magnitude=1.0, seed=0, slack=1.0):
    q, k, v, leaves = make_qkv(shape, dtype, layout, magnitude, seed)
    assert_leaves_within_budget(kernel_fn, reference_fn, leaves, layout, shape, dtype, slack)


def assert_leaves_within_budget(kernel_fn, reference_fn, leaves, layout, shape, dtype, slack=1.0):
    """:func:`assert_within_budget` on given leaves (q, k, v are their views in ``layout``); ``slack`` times the
    budget."""
    got = outputs_and_grads(kernel_fn, *rebuild(leaves, layout, shape), leaves)
    torch_same_dtype = outputs_and_grads(reference_fn, *rebuild(leaves, layout, shape), leaves)
    leaves64 = float64_twins(leaves)
    want = outputs_and_grads(reference_fn, *rebuild(leaves64, layout, shape), leaves64)
    for name, g, t, w in zip(["out", "grad 1", "grad 2", "grad 3"], got, torch_same_dtype, want):
        assert g.shape == w.shape and g.dtype == t.dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        kernel_err = (g.double() - w).abs().max().item()
        torch_err = (t.double() - w).abs().max().item()
        budget = slack * (2 * torch_err + FLOOR[dtype] * max(1.0, w.abs().max().item()))
        assert kernel_err <= budget, f"{name}: error {kernel_err:.3e} > budget {budget:.3e} (torch {torch_err:.3e})"


def triton_op(prefix, configs=None, scale=None, deterministic=True, key_centre=False):
    """The public op on the Triton backend, or the raw autograd op with explicit tile configs (and the backward's
    ``key_centre``)."""
    if configs is None:
        def run(q, k, v):
            with mimkernels.use_backend("triton"):
                return mimkernels.prefix_causal_attention(q, k, v, prefix, scale=scale, deterministic=deterministic)
        return run
    return lambda q, k, v: _ConfiguredAttention.apply(q, k, v, prefix, scale or 1 / math.sqrt(q.shape[-1]), configs,
                                                      deterministic, key_centre)


class _ConfiguredAttention(torch.autograd.Function):
    """The kernels with explicit (e.g. small, odd) tile shapes; ``deterministic=False`` runs the atomic-dQ backward."""

    @staticmethod
    def forward(ctx, q, k, v, prefix, scale, configs, deterministic, key_centre):
        out, lse = kernels.forward(q, k, v, prefix, scale, configs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = prefix, scale, configs, deterministic, key_centre
        return out

    @staticmethod
    def backward(ctx, grad_out):
        prefix, scale, configs, deterministic, key_centre = ctx.args
        grads = kernels.backward(grad_out.contiguous(), *ctx.saved_tensors, prefix, scale, configs,
                                 atomic_dq=not deterministic, key_centre=key_centre)
        return (*grads, None, None, None, None, None)


def reference_op(prefix, scale=None):
    return lambda q, k, v: reference.prefix_causal_attention(q, k, v, prefix, scale=scale)


def per_sample_prefix(batch, seq_len, seed=0):
    """Prefixes covering 0, N, beyond N and values inside, for a batch of any size."""
    rng = random.Random(seed)
    special = [0, seq_len, seq_len + 7, max(seq_len // 2, 1)]
    values = [special[i] if i < len(special) else rng.randint(0, seq_len) for i in range(batch)]
    rng.shuffle(values)
    return torch.tensor(values, device=DEVICE)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (4, 1, 49, 64), (4, 1, 50, 40), (4, 1, 197, 80), (4, 1, 257, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_per_sample_prefix(shape, dtype):
    prefix = per_sample_prefix(shape[0], shape[2])
    assert_within_budget(triton_op(prefix), reference_op(prefix), shape, dtype)


@pytest.mark.parametrize("head_dim", [96, 112, 256])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_wide_head_dims(head_dim, dtype):
    """Padded (96, 112) and the largest (256) head dims, with the shipped tile configs."""
    prefix = torch.tensor([0, 20], device=DEVICE)
    assert_within_budget(triton_op(prefix), reference_op(prefix), (2, 1, 41, head_dim), dtype, seed=head_dim)


@pytest.mark.parametrize("prefix", [0, 1, 31, 32, 33, 64, 100, 100 + 50])
def test_int_prefix(prefix):
    shape = (1, 2, 100, 64)
    assert_within_budget(triton_op(prefix), reference_op(prefix), shape, torch.float32, seed=prefix)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
def test_prefix_values_far_outside_the_sequence(dtype):
    """Per-sample prefixes anywhere in their dtype's range mean the same as clamped to [0, N]: the kernels clamp
    them in 64 bits before narrowing (2^32 + 5 narrowed first would be 5, -2^40 would be 0 by luck)."""
    info = torch.iinfo(dtype)
    values = [info.max, info.min, 5, 17] if dtype != torch.int64 else [2 ** 32 + 5, -2 ** 40, info.max, info.min]
    prefix = torch.tensor(values, dtype=dtype, device=DEVICE)
    clamped = prefix.to(torch.int64).clamp(0, 40)
    assert_within_budget(triton_op(prefix), reference_op(clamped), (4, 1, 40, 16), torch.float32)


@pytest.mark.parametrize("key_centre", [False, True], ids=["plain", "key_centre"])
@pytest.mark.parametrize("backward", ["atomic", "per_head", "two_launch"])
def test_int_prefix_past_the_sequence_through_the_kernels(backward, key_centre):
    """An int prefix past N given to the kernels themselves (the public ops clamp theirs first) means N, as a
    tensor's values do: a key tile running past N (N = 17, 33: 16-key tiles) that the dK/dV kernel took as lying in
    the prefix went unmasked, its keys past N got a dS, and the atomic and per-head dQ's key correction summed it
    (dQ off by up to 0.8 at N = 17, D = 96, found by a random draw like test_random_kernel_combinations'). Within
    budget, for prefixes N + 1 and far past, every backward that adds dQ in the dK/dV kernel, with and without the
    correction."""
    tiles = SMALL_TILES["square16"]
    tiles = with_per_head_backward(tiles) if backward == "per_head" else tiles
    for seq_len, prefix in ((17, 18), (33, 1000)):
        op = triton_op(prefix, tiles, deterministic=backward != "atomic", key_centre=key_centre)
        assert_within_budget(op, reference_op(seq_len), (2, 1, seq_len, 96), torch.float32, seed=seq_len)


def test_strided_prefix_tensor():
    prefix = torch.tensor([0, 99, 30, 99, 5, 99], device=DEVICE)[::2]  # [0, 30, 5], stride 2
    assert_within_budget(triton_op(prefix), reference_op(prefix), (3, 1, 40, 16), torch.float32)


@pytest.mark.parametrize("layout", ["packed_qkv", "bnhd"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_strided_inputs(layout, dtype):
    shape = (2, 3, 50, 40)
    prefix = torch.tensor([10, 0], device=DEVICE)
    assert_within_budget(triton_op(prefix), reference_op(prefix), shape, dtype, layout=layout)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_large_logits(dtype):
    """Logits of about +-100 (fp32) and +-60 (fp16): exp() overflows unless the running max is subtracted."""
    shape = (2, 1, 70, 64)
    prefix = torch.tensor([5, 33], device=DEVICE)
    magnitude = 4.0 if dtype == torch.float16 else 5.0
    assert_within_budget(triton_op(prefix), reference_op(prefix), shape, dtype, magnitude=magnitude)


def test_extreme_logits_stay_finite():
    """Logits near +-2000: the recomputed probabilities lose about |logit| * eps, still far from overflow."""
    q, k, v, leaves = make_qkv((2, 1, 70, 64), torch.float32, magnitude=20.0)
    prefix = torch.tensor([5, 33], device=DEVICE)
    got = outputs_and_grads(triton_op(prefix), q, k, v, leaves)
    leaves64 = float64_twins(leaves)
    want = outputs_and_grads(reference_op(prefix), *leaves64, leaves64)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert (g.double() - w).norm() <= 2e-3 * w.norm()


def test_reads_nothing_past_the_sequence_or_head_dim():
    """q, k, v are windows into a NaN-filled buffer: any read past N tokens or D columns would show."""
    batch, heads, seq_len, head_dim = 2, 2, 45, 40
    buffer = torch.full((3, batch, heads, seq_len + 9, head_dim + 8), float("nan"), device=DEVICE)
    buffer[..., :seq_len, :head_dim] = torch.randn(3, batch, heads, seq_len, head_dim, device=DEVICE)
    buffer.requires_grad_()
    q, k, v = buffer[..., :seq_len, :head_dim]
    prefix = torch.tensor([0, 30], device=DEVICE)
    got = outputs_and_grads(triton_op(prefix), q, k, v, [buffer])
    clean = buffer.detach()[..., :seq_len, :head_dim].double().requires_grad_()
    want = outputs_and_grads(reference_op(prefix), *clean, [clean])
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1][..., :seq_len, :head_dim].double(), want[1], atol=1e-5, rtol=1e-5)


def test_custom_scale():
    prefix = torch.tensor([4, 20], device=DEVICE)
    assert_within_budget(triton_op(prefix, scale=0.3), reference_op(prefix, scale=0.3), (2, 1, 33, 32), torch.float32)


def _tiles(fwd, dkdv, dq):
    return AttentionConfigs(TileConfig(*fwd, 4, 1), TileConfig(*dkdv, 4, 1), TileConfig(*dq, 4, 1))


SMALL_TILES = {
    "square16": _tiles((16, 16), (16, 16), (16, 16)),
    "tall": _tiles((32, 16), (16, 32), (32, 16)),
    "wide": _tiles((16, 32), (32, 16), (16, 32)),
}


def with_tma(configs: AttentionConfigs) -> AttentionConfigs:
    """The same tiles, every kernel through TMA tensor descriptors (``+tma``)."""
    return AttentionConfigs(*(None if cfg is None else dataclasses.replace(cfg, tma=True)
                              for cfg in (getattr(configs, field.name) for field in dataclasses.fields(configs))))


def with_optional_kernels(configs: AttentionConfigs) -> AttentionConfigs:
    """Also the delta-computing dQ kernel (its backward_dq tile) in place of the row-dot pre-pass."""
    return dataclasses.replace(configs, backward_dq_delta=configs.backward_dq)


def with_per_head_backward(configs: AttentionConfigs) -> AttentionConfigs:
    """The backward in one program per (batch, head) (its backward_dkdv tile)."""
    return dataclasses.replace(configs, backward_per_head=configs.backward_dkdv)


TMA_CASES = [(shape, layout, tiles, dtype, "default")
             for shape, layout, tiles in [((1, 1, 1, 16), "contiguous", "square16"),
                                          ((4, 1, 49, 64), "packed_qkv", "tall"), ((2, 3, 50, 40), "bnhd", "wide"),
                                          ((4, 1, 97, 80), "contiguous", "tall")]
             for dtype in CPU_DTYPES]
TMA_CASES += [((4, 1, 50, 24), "packed_qkv", "wide", torch.float32, variant)
              for variant in ("delta_in_dq", "atomic", "per_head")]
TMA_CASES += [((2, 3, 97, 40), "bnhd", "tall", torch.float16, "per_head")]
# the atomic dQ through descriptors is one TMA reduce-add per tile pair: rows past N (one row, one tile, tiles
# past a 97-token head) and columns past D dropped, per-sample prefixes, 16-bit operands
TMA_CASES += [((1, 1, 1, 16), "contiguous", "square16", torch.float32, "atomic"),
              ((2, 3, 97, 40), "bnhd", "tall", torch.float16, "atomic")]


@pytest.mark.parametrize("shape, layout, tiles, dtype, variant", TMA_CASES, ids=str)
def test_tma_kernels(shape, layout, tiles, dtype, variant):
    """Every kernel through TMA tensor descriptors (``+tma`` configs; the interpreter runs them like Hopper): rows
    past N and columns past D come from TMA's zero fill, not masks. Within budget of the float64 reference, and
    outputs and gradients bit-equal to the same tiles through pointers (the atomic dQ: within fp32 rounding)."""
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    pointers = {"delta_in_dq": with_optional_kernels, "per_head": with_per_head_backward}.get(
        variant, lambda configs: configs)(SMALL_TILES[tiles])
    deterministic = variant != "atomic"
    q, k, v, leaves = make_qkv(shape, dtype, layout)
    assert kernels.tma_usable(q, k, v)  # else this would test the pointer path twice
    assert_within_budget(triton_op(prefix, with_tma(pointers), deterministic=deterministic), reference_op(prefix),
                         shape, dtype, layout=layout)
    got = outputs_and_grads(triton_op(prefix, with_tma(pointers), 0.3, deterministic), q, k, v, leaves)
    want = outputs_and_grads(triton_op(prefix, pointers, 0.3, deterministic), q, k, v, leaves)
    for g, w in zip(got, want):
        if deterministic:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def with_tails(configs: AttentionConfigs, tail_m: int = 16) -> AttentionConfigs:
    """The forward, dK/dV and dQ tiles (and the delta-computing dQ's, where set) with ``tail_m``-row tail tiles."""
    return dataclasses.replace(configs, **{name: dataclasses.replace(getattr(configs, name), tail_m=tail_m)
                                           for name in ("forward", "backward_dkdv", "backward_dq", "backward_dq_delta")
                                           if getattr(configs, name) is not None})


TAIL_TILES = AttentionConfigs(TileConfig(32, 16, 4, 1), TileConfig(32, 32, 4, 1), TileConfig(64, 16, 4, 1))


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("variant", ["default", "delta_in_dq"])
@pytest.mark.parametrize("shape, dtype", [((3, 1, 1, 16), torch.float32), ((2, 3, 49, 64), torch.float32),
                                          ((4, 1, 50, 40), torch.float16), ((2, 1, 97, 24), torch.float32),
                                          ((2, 2, 64, 16), torch.float32)], ids=str)
def test_tail_tiles(shape, dtype, variant, tma):
    """Tail tiles (rows past the last whole query tile in 16-row tiles): within budget of the float64 reference with
    per-sample prefixes; the forward, dQ, dK and dV equal to the same tiles without tails to fp32 rounding. (Each
    forward / dQ row sums the same products as without tails, and GPU kernels give the same bits; the interpreter's
    matmuls are NumPy's, whose BLAS may sum a 16-row product in another order than the same rows of a 32-row one:
    OpenBLAS 0.3.31 on an AVX-512 AMD EPYC does, 2026-12-04.)"""
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2] + 1)
    base = with_optional_kernels(TAIL_TILES) if variant == "delta_in_dq" else TAIL_TILES
    base = with_tma(base) if tma else base
    assert_within_budget(triton_op(prefix, with_tails(base)), reference_op(prefix), shape, dtype)
    q, k, v, leaves = make_qkv(shape, dtype, "bnhd")  # one leaf per operand: dq compared on its own
    assert not tma or kernels.tma_usable(q, k, v)
    got = outputs_and_grads(triton_op(prefix, with_tails(base), 0.3), q, k, v, leaves)
    want = outputs_and_grads(triton_op(prefix, base, 0.3), q, k, v, leaves)
    for g, w in zip(got, want):  # out, dq, dk, dv
        torch.testing.assert_close(g, w, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)


SPLIT_KERNELS = ("forward", "backward_dkdv", "backward_dq", "backward_dq_delta", "backward_atomic", "backward_per_head")


def with_split_d(configs: AttentionConfigs) -> AttentionConfigs:
    """Every set tile with the head dim split in two power-of-2 column blocks (the atomic-dQ and per-head backwards
    take the flag and run their base tiles)."""
    return dataclasses.replace(configs, **{name: dataclasses.replace(getattr(configs, name), split_d=True)
                                           for name in SPLIT_KERNELS if getattr(configs, name) is not None})


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("variant", ["default", "delta_in_dq"])
@pytest.mark.parametrize("layout", ["contiguous", "packed_qkv"])
@pytest.mark.parametrize("shape, dtype", [((2, 3, 49, 80), torch.float32), ((2, 2, 65, 40), torch.float16),
                                          ((3, 1, 1, 80), torch.float32), ((1, 2, 50, 96), torch.float16),
                                          ((2, 1, 37, 72), torch.float32)], ids=str)
def test_split_head_dim(shape, dtype, layout, variant, tma):
    """``+splitd`` (D = 80 as 64 + 16 columns, 40 as 32 + 16, 96 as 64 + 32, 72 as 64 + 16 of which 8 padding) in
    the forward, dK/dV and dQ kernels (the delta-computing one too), through pointers and through two TMA
    descriptors per operand: output and every gradient within budget of the float64 reference, per-sample
    prefixes, strided operands."""
    assert kernels.head_dim_split(shape[-1]) is not None
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    tiles = with_optional_kernels(TAIL_TILES) if variant == "delta_in_dq" else TAIL_TILES
    tiles = with_split_d(with_tma(tiles) if tma else tiles)
    if tma:
        q, k, v, _ = make_qkv(shape, dtype, layout)
        assert kernels.tma_usable(q, k, v)  # so the descriptors are what runs
    assert_within_budget(triton_op(prefix, tiles), reference_op(prefix), shape, dtype, layout)


def test_split_head_dim_runs_the_base_tiles_where_nothing_is_saved():
    """D = 64 (a power of 2) and 112 (64 + 64 pads as much as 128): ``+splitd`` tiles are their base tiles, bit for
    bit; where the split applies, the results differ from the base tiles' by rounding only."""
    for head_dim, split in ((64, False), (112, False), (80, True)):
        shape, prefix = (2, 2, 33, head_dim), per_sample_prefix(2, 33, seed=head_dim)
        q, k, v, leaves = make_qkv(shape, torch.float32)
        got = outputs_and_grads(triton_op(prefix, with_split_d(TAIL_TILES)), q, k, v, leaves)
        want = outputs_and_grads(triton_op(prefix, TAIL_TILES), q, k, v, leaves)
        for g, w in zip(got, want):
            if split:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(g, w)


@pytest.mark.parametrize("flag, head_dim, seed", [("tail", 32, 5), ("split_d", 80, 7)])
def test_tile_flags_are_ignored_where_a_kernel_takes_none(flag, head_dim, seed):
    """The atomic-dQ and per-head backwards have no tail-tile or split-head-dim variants: such a config there runs
    its base tiles."""
    shape, prefix = (2, 2, 49, head_dim), per_sample_prefix(2, 49, seed=seed)
    flagged = with_tails(TAIL_TILES) if flag == "tail" else with_split_d(TAIL_TILES)
    for configs, deterministic in ((dataclasses.replace(flagged, backward_atomic=flagged.backward_dkdv), False),
                                   (dataclasses.replace(flagged, backward_per_head=flagged.backward_dkdv), True)):
        assert_within_budget(triton_op(prefix, configs, deterministic=deterministic), reference_op(prefix), shape,
                             torch.float32)


def test_split_head_dim_parts():
    assert {d: kernels.head_dim_split(d) for d in (16, 24, 40, 48, 64, 72, 80, 96, 112, 128, 160, 200)} == {
        16: None, 24: None, 40: (32, 16), 48: (32, 16), 64: None, 72: (64, 16), 80: (64, 16), 96: (64, 32),
        112: None, 128: None, 160: (128, 32), 200: None}
    assert str(TileConfig.parse("64x64x4x3+splitd")) == "64x64x4x3+splitd"
    assert str(TileConfig.parse("64x64x4x3+tma+splitd")) == "64x64x4x3+tma+splitd"
    with pytest.raises(ValueError, match="splitd"):
        TileConfig.parse("64x64x4x3+tail16+splitd")


def test_tma_configs_fall_back_to_pointers_where_descriptors_cannot_read():
    """fp16 rows of 36 elements are 72 bytes apart: not 16-byte aligned, so no descriptor; the same tiles run
    through pointers, still right."""
    shape, prefix = (2, 1, 30, 36), torch.tensor([3, 30], device=DEVICE)
    q, k, v, _ = make_qkv(shape, torch.float16)
    assert not kernels.tma_usable(q, k, v)
    assert_within_budget(triton_op(prefix, with_tma(SMALL_TILES["tall"])), reference_op(prefix), shape,
                         torch.float16)


def test_tma_usable_checks_address_strides_and_size():
    base = torch.randn(2, 9, 3, 64, device=DEVICE, dtype=torch.float16)
    assert kernels.tma_usable(base.transpose(1, 2), base.transpose(1, 2))
    narrow = torch.randn(2, 9, 3, 36, device=DEVICE, dtype=torch.float16)
    assert not kernels.tma_usable(base.transpose(1, 2), narrow.transpose(1, 2))  # 72-byte rows
    assert not kernels.tma_usable(base.view(-1)[4:4 + 2 * 9 * 3 * 32].view(2, 9, 3, 32))  # address 8 bytes off
    assert not kernels.tma_usable(base.transpose(1, 3))  # head dim not contiguous
    assert not kernels.tma_usable(base[:0])  # nothing to describe


def test_descriptors_are_the_ones_from_tensor_builds():
    """Descriptors are built from their fields (from_tensor's checks are tma_usable's): same fields, same tensor."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    t = torch.randn(2, 9, 3, 64, device=DEVICE).transpose(1, 2)
    ours, theirs = launch.tensor_descriptor(t, [1, 1, 16, 64]), TensorDescriptor.from_tensor(t, [1, 1, 16, 64])
    assert launch._DESCRIPTOR_FAST  # Triton 3.6 and 3.9 (CI's two stacks) take the direct path
    assert type(ours) is TensorDescriptor and ours.base is t
    assert {k: v for k, v in vars(ours).items() if k != "base"} == {k: v for k, v in vars(theirs).items()
                                                                   if k != "base"}


@pytest.mark.parametrize("tiles", SMALL_TILES, ids=str)
@pytest.mark.parametrize("seq_len", [50, 97])
def test_many_tiles(tiles, seq_len):
    """Diagonal, prefix-edge and sequence-end tiles in every combination of tile shapes."""
    shape = (4, 1, seq_len, 24)
    prefix = per_sample_prefix(4, seq_len, seed=seq_len)
    assert_within_budget(triton_op(prefix, SMALL_TILES[tiles], 0.25), reference_op(prefix, 0.25), shape,
                         torch.float32, seed=seq_len)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1, 1, 16), (4, 1, 49, 64), (4, 1, 50, 40), (4, 1, 197, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_atomic_backward(shape, dtype):
    """The atomic-dQ backward (dQ summed atomically by the dK/dV programs): same budget as the two-launch one."""
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    configs = kernels.configs_for(shape[-1], dtype)
    assert_within_budget(triton_op(prefix, configs, deterministic=False), reference_op(prefix), shape, dtype)


@pytest.mark.parametrize("mode", ["full", "causal", "prefix"])
def test_nondeterministic_public_op(mode):
    """deterministic=False through the public op takes whatever path measured fastest; the answer is the same."""
    kwargs = {"full": {}, "causal": {"causal": True}, "prefix": {"prefix_len": torch.tensor([3, 30], device=DEVICE)}}

    def kernel_fn(q, k, v):
        with mimkernels.use_backend("triton"):
            return mimkernels.attention(q, k, v, deterministic=False, **kwargs[mode])

    assert_within_budget(kernel_fn, lambda q, k, v: reference.attention(q, k, v, **kwargs[mode]), (2, 2, 45, 32),
                         torch.float32)


def test_only_causal_attention_routes_to_sdpa():
    """deterministic=False hands causal attention to SDPA (its causal kernel took less GPU time than ours on the
    H200) and keeps full attention on our kernels (SDPA took 1.33-1.67x their GPU time at the MAE shapes), on CUDA
    in fp16 / bf16 under the auto backend only. A stand-in for a CUDA q: the rule reads device, dtype and shape."""
    from types import SimpleNamespace

    from mimkernels.ops.attention import _sdpa_measured_faster

    def routes(prefix, dtype=torch.bfloat16, deterministic=False, is_cuda=True):
        return _sdpa_measured_faster(SimpleNamespace(is_cuda=is_cuda, dtype=dtype, shape=(256, 16, 50, 64)), prefix,
                                     deterministic)

    assert routes(0) and routes(0, torch.float16)
    assert not routes(50)  # full attention: ours
    assert not routes(7)  # an int prefix between 0 and N
    assert not routes(torch.zeros(256, dtype=torch.long))  # a per-sample prefix: no host sync to look at it
    assert not routes(0, deterministic=True) and not routes(0, torch.float32) and not routes(0, is_cuda=False)
    with mimkernels.use_backend("triton"):
        assert not routes(0)  # an explicit backend is what runs


@pytest.mark.parametrize("packed", [False, True])
def test_deterministic_algorithms_override_deterministic_false(packed, monkeypatch):
    """Under torch.use_deterministic_algorithms(True), deterministic=False takes the deterministic backward (as
    PyTorch's ops do where they have one), even where the table says the atomic one is faster."""
    monkeypatch.setattr(kernels, "atomic_dq_measured_faster", lambda q: True)
    real_backward, atomic_asked = kernels.backward, []

    def recording_backward(*args, atomic_dq=False, **kwargs):
        atomic_asked.append(atomic_dq)
        return real_backward(*args, atomic_dq=atomic_dq, **kwargs)

    monkeypatch.setattr(kernels, "backward", recording_backward)
    qkv = torch.randn(2, 9, 3, 2, 16, device=DEVICE, requires_grad=True)
    prefix = torch.tensor([2, 5], device=DEVICE)
    for deterministic_algorithms in (False, True):
        torch.use_deterministic_algorithms(deterministic_algorithms)
        try:
            with mimkernels.use_backend("triton"):
                if packed:
                    out = mimkernels.qkv_attention(qkv, prefix_len=prefix, deterministic=False)
                else:
                    out = mimkernels.attention(*(t.transpose(1, 2) for t in qkv.unbind(2)), prefix_len=prefix,
                                               deterministic=False)
                out.sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    assert atomic_asked == [True, False]


@pytest.mark.parametrize("tiles", SMALL_TILES, ids=str)
@pytest.mark.parametrize("seq_len", [1, 50, 97])
def test_delta_computed_in_the_dq_kernel(tiles, seq_len):
    """The backward without the row-dot pre-pass: dQ first, computing delta, then dK/dV reading it."""
    configs = dataclasses.replace(SMALL_TILES[tiles], backward_dq_delta=SMALL_TILES[tiles].backward_dq)
    prefix = per_sample_prefix(4, seq_len, seed=seq_len)
    assert_within_budget(triton_op(prefix, configs, 0.25), reference_op(prefix, 0.25), (4, 1, seq_len, 24),
                         torch.float32, layout="bnhd", seed=seq_len)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1, 1, 16), (4, 1, 49, 64), (4, 1, 50, 40), (4, 1, 197, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_per_head_backward(shape, dtype):
    """The backward in one program per (batch, head), dQ summed in key-tile order: same budget as the two-launch
    one, and the same bits on a second run."""
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    configs = with_per_head_backward(kernels.configs_for(shape[-1], dtype))
    assert_within_budget(triton_op(prefix, configs), reference_op(prefix), shape, dtype)
    q, k, v, leaves = make_qkv(shape, dtype, seed=5)
    first, second = (outputs_and_grads(triton_op(prefix, configs), q, k, v, leaves) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("seq_len", [16, 17])
def test_per_head_backward_buffer_only_past_one_key_tile(seq_len, monkeypatch):
    """The fp32 dQ buffer (B * H * N * D values) is allocated only where a head has more than one key tile; with one,
    dQ is stored finished and a one-element stand-in is passed."""
    real_launch, buffers = kernels.launch, []

    def recording_launch(kernel, grid, tensors, *args, **kwargs):
        if kernel is kernels._prefix_causal_bwd_per_head:
            buffers.append(tensors[10].numel())
        return real_launch(kernel, grid, tensors, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", recording_launch)
    configs = with_per_head_backward(SMALL_TILES["square16"])
    prefix = per_sample_prefix(2, seq_len, seed=seq_len)
    assert_within_budget(triton_op(prefix, configs), reference_op(prefix), (2, 2, seq_len, 16), torch.float32)
    assert set(buffers) == {1 if seq_len <= 16 else 2 * 2 * seq_len * 16}


@pytest.mark.parametrize("tiles", SMALL_TILES, ids=str)
@pytest.mark.parametrize("seq_len", [1, 50, 97])
def test_per_head_backward_many_tiles(tiles, seq_len):
    """Diagonal, prefix-edge and sequence-end tiles: a query tile with one key tile (its first writer is also its
    last), with several, tiles past N; the gradient written into one packed qkv gradient."""
    prefix = per_sample_prefix(4, seq_len, seed=seq_len)
    assert_within_budget(triton_op(prefix, with_per_head_backward(SMALL_TILES[tiles]), 0.25),
                         reference_op(prefix, 0.25), (4, 2, seq_len, 24), torch.float32, layout="packed_qkv",
                         seed=seq_len)


def _launched_kernels(monkeypatch, arguments=None) -> list:
    """The kernels launched from now on, in order (kernels.launch recorded, then run); their tensor arguments
    appended to ``arguments`` where given."""
    real_launch, launched = kernels.launch, []

    def recording_launch(kernel, grid, tensors, *args, **kwargs):
        launched.append(kernel)
        if arguments is not None:
            arguments.append(tensors)
        return real_launch(kernel, grid, tensors, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", recording_launch)
    return launched


# the dQ tile's key tiles wider than the dK/dV tile's query tiles: dQ's masked tiles reach pairs dK/dV never visits
STORED_DS_TILES = {**SMALL_TILES, "mixed": _tiles((16, 16), (16, 16), (16, 32))}


def _stored_ds_cases():
    """Each (tiles, tma, tails) combination on N = 1 and on one of four larger shapes, picked as a Latin square (the
    shape index is tiles + 2 tma + tails, mod 4): each larger shape meets every tile, both layouts and both tail
    settings, in a third of the interpreter time of every shape with every combination."""
    larger = [((2, 2, 49, 64), torch.float32), ((4, 1, 50, 40), torch.float16), ((2, 1, 97, 24), torch.float32),
              ((2, 2, 64, 32), torch.float32)]
    cases = []
    for index, tiles in enumerate(STORED_DS_TILES):
        for tma in (False, True):
            for tails in (False, True):
                for shape, dtype in (((3, 1, 1, 16), torch.float32), larger[(index + 2 * tma + tails) % 4]):
                    name = f"{shape}-{dtype}-{tiles}-{'tma' if tma else 'pointers'}-{'tails' if tails else 'whole'}"
                    cases.append(pytest.param(shape, dtype, tiles, tma, tails, id=name))
    return cases


@pytest.mark.parametrize("shape, dtype, tiles, tma, tails", _stored_ds_cases())
def test_stored_ds_backward(shape, dtype, tiles, tma, tails, monkeypatch):
    """kernels.STORED_DS: the dK/dV kernel stores dS and dQ is one matmul per tile pair from it. Within budget of the
    float64 reference with per-sample prefixes, whatever the dK/dV tile (through pointers or TMA, with tail tiles)
    and the dQ tile (STORED_DS_DQ_TILE, here the configs' dQ tile, of other shapes: it reads only visible pairs,
    never what dK/dV skipped, which is NaN here);
    dK and dV bit-equal to the two-launch backward's (the same kernel, one more store); the stored-dS kernels ran."""
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2] + 3)
    configs = with_tma(STORED_DS_TILES[tiles]) if tma else STORED_DS_TILES[tiles]
    configs = with_tails(configs) if tails else configs
    q, k, v, leaves = make_qkv(shape, dtype, "bnhd")  # one leaf per operand: dq compared on its own
    want = outputs_and_grads(triton_op(prefix, configs, 0.3), q, k, v, leaves)
    monkeypatch.setattr(kernels, "STORED_DS", True)
    monkeypatch.setattr(kernels, "STORED_DS_DQ_TILE", configs.backward_dq)  # +tma where the dK/dV tile is
    real_dkdv = kernels.backward_dkdv

    def dkdv_into_nan(*args, ds=None, **kwargs):
        if ds is not None:
            ds.fill_(float("nan"))
        return real_dkdv(*args, ds=ds, **kwargs)

    monkeypatch.setattr(kernels, "backward_dkdv", dkdv_into_nan)
    arguments = []
    launched = _launched_kernels(monkeypatch, arguments)
    assert_within_budget(triton_op(prefix, configs), reference_op(prefix), shape, dtype)
    assert kernels._prefix_causal_bwd_dq_from_ds in launched and kernels._prefix_causal_bwd_dq not in launched
    dkdv_arguments = arguments[launched.index(kernels._prefix_causal_bwd_dkdv)]
    ds_argument, ds_tail_argument = dkdv_arguments[9], dkdv_arguments[-2]  # the last: K's pointer (KEY_CENTRE)
    # through tensor descriptors where the dK/dV tile is +tma, whatever N (the buffer's rows are padded to 16
    # values, so TMA takes it), the tail tiles' dS (where N leaves rows past the last whole tile) through one with
    # tail-wide blocks
    tail_m = kernels.query_tiles(shape[2], configs.backward_dkdv)[2]
    assert isinstance(ds_argument, TensorDescriptor) == tma
    if tma and tail_m:
        assert ds_tail_argument.block_shape == [1, 1, configs.backward_dkdv.block_n, tail_m]
    # dQ from dS reads K, dS and writes dQ through descriptors under a +tma tile, reading the pairs nobody wrote (NaN
    # here) and discarding them
    dq_from_ds_arguments = arguments[launched.index(kernels._prefix_causal_bwd_dq_from_ds)]
    assert all(isinstance(t, TensorDescriptor) == tma for t in dq_from_ds_arguments[:3])
    got = outputs_and_grads(triton_op(prefix, configs, 0.3), q, k, v, leaves)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)


def test_stored_ds_backward_only_up_to_its_buffer_size(monkeypatch):
    """Past STORED_DS_MAX_BYTES of dS buffer (B * H * N * N values), and with a split head dim, the two-launch
    backward runs; the public op takes the stored-dS path with the switch on."""
    monkeypatch.setattr(kernels, "STORED_DS", True)
    q = torch.empty(2, 3, 40, 80, device=DEVICE)
    configs = SMALL_TILES["square16"]
    monkeypatch.setattr(kernels, "STORED_DS_MAX_BYTES", 2 * 3 * 40 * 48 * 4)  # rows padded to 48 values
    assert kernels.stored_ds_tiles(q, configs)
    monkeypatch.setattr(kernels, "STORED_DS_MAX_BYTES", 2 * 3 * 40 * 48 * 4 - 1)
    assert kernels.stored_ds_tiles(q, configs) is None
    monkeypatch.setattr(kernels, "STORED_DS_MAX_BYTES", 1 << 30)
    assert kernels.stored_ds_tiles(q, with_split_d(configs)) is None
    assert kernels.stored_ds_tiles(q[..., :64], with_split_d(configs))  # D 64 does not split: its base tiles run
    launched = _launched_kernels(monkeypatch)
    prefix = per_sample_prefix(2, 40, seed=1)
    assert_within_budget(triton_op(prefix), reference_op(prefix), (2, 3, 40, 64), torch.float32)
    assert kernels._prefix_causal_bwd_dq_from_ds in launched


@pytest.mark.parametrize("path", ["stored_ds", "per_head"])
def test_backward_without_memory_for_its_buffer(path, monkeypatch):
    """Where the stored-dS or per-head backward's buffer cannot be allocated (out of GPU memory), the backward runs the
    other kernels (the same gradients, bit for bit, as with that path off) and warns, instead of failing a step that
    fits without the buffer."""
    shape = (2, 2, 49, 32)
    prefix = per_sample_prefix(2, 49, seed=5)
    plain = SMALL_TILES["square16"]
    q, k, v, leaves = make_qkv(shape, torch.float32, "bnhd")
    monkeypatch.setattr(kernels, "STORED_DS", False)
    want = outputs_and_grads(triton_op(prefix, plain), q, k, v, leaves)

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    if path == "stored_ds":
        configs, label, kernel = plain, "stored-dS backward", kernels._prefix_causal_bwd_dq_from_ds
        monkeypatch.setattr(kernels, "STORED_DS", True)
        monkeypatch.setattr(kernels, "stored_ds_buffer", no_memory)
    else:
        configs, label, kernel = with_per_head_backward(plain), "per-head backward", kernels._prefix_causal_bwd_per_head
        monkeypatch.setattr(kernels, "per_head_buffer", no_memory)
    launched = _launched_kernels(monkeypatch)
    with pytest.warns(RuntimeWarning, match=f"no GPU memory left for the {label}'s buffer"):
        got = outputs_and_grads(triton_op(prefix, configs), q, k, v, leaves)
    assert kernels._prefix_causal_bwd_dq in launched and kernel not in launched
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_stored_ds_buffer_rows_are_padded_and_checked():
    """The dS buffer's rows are padded to 16 values (so TMA takes any N), counted in its size; a buffer laid out
    otherwise is refused by name, not read wrongly."""
    q = torch.empty(2, 3, 50, 16, device=DEVICE)
    ds = kernels.stored_ds_buffer(q)
    assert ds.shape == (2, 3, 50, 50) and ds.stride() == (3 * 50 * 64, 50 * 64, 64, 1) and ds.dtype == q.dtype
    assert kernels.stored_ds_buffer(q[:, :, :48]).stride(2) == 48
    assert kernels.stored_ds_fits(2, 3, 50, 4) == (2 * 3 * 50 * 64 * 4 <= kernels.STORED_DS_MAX_BYTES)
    tile = TileConfig(16, 16, 4, 1)
    for bad in (torch.empty(2, 3, 50, 50, device=DEVICE).transpose(2, 3), torch.empty(2, 3, 50, 49, device=DEVICE),
                torch.empty(2, 3, 50, 50, device=DEVICE, dtype=torch.float16),
                torch.empty(2, 3, 50, 64, device=DEVICE)[:, :2, :, :50]):
        with pytest.raises(ValueError, match="ds must be"):
            kernels.backward_dq_from_ds(q, q, bad, 0, 1.0, tile)
    with pytest.raises(ValueError, match="ds must be"):
        kernels.backward_dkdv(q, q, q, q, q[..., 0], q[..., 0], 0, 1.0, tile, ds=ds[:, :, :, :49])


def test_stored_ds_tiles_are_the_tables_choice_unless_switched(monkeypatch):
    """STORED_DS unset (None): the stored-dS path only where the configs (the measured table) give its two tiles, and
    with those tiles; True: everywhere, with the table's tiles where given, else the dK/dV tile and
    STORED_DS_DQ_TILE; False: nowhere."""
    q = torch.empty(2, 3, 40, 64, device=DEVICE)
    plain = SMALL_TILES["square16"]
    dkdv_ds, dq_from_ds = TileConfig(32, 16, 4, 1), TileConfig(16, 32, 4, 1)
    table = dataclasses.replace(plain, backward_dkdv_ds=dkdv_ds, backward_dq_from_ds=dq_from_ds)
    half = dataclasses.replace(plain, backward_dq_from_ds=dq_from_ds)
    for switch, want_plain, want_table in ((None, None, (dkdv_ds, dq_from_ds)),
                                           (True, (plain.backward_dkdv, kernels.STORED_DS_DQ_TILE),
                                            (dkdv_ds, dq_from_ds)),
                                           (False, None, None)):
        monkeypatch.setattr(kernels, "STORED_DS", switch)
        assert kernels.stored_ds_tiles(q, plain) == want_plain
        assert kernels.stored_ds_tiles(q, table) == want_table
        assert kernels.stored_ds_tiles(q, half) == want_plain  # one tile of the two is no choice
    monkeypatch.setattr(kernels, "STORED_DS", None)
    monkeypatch.setattr(kernels, "STORED_DS_MAX_BYTES", 2 * 3 * 40 * 48 * 4 - 1)
    assert kernels.stored_ds_tiles(q, table) is None  # past the buffer size: the table's other backward


@pytest.mark.parametrize("shape", [(2, 2, 49, 64), (3, 1, 33, 40)], ids=str)
def test_stored_ds_backward_from_the_table(shape, monkeypatch):
    """Table-chosen stored-dS tiles (STORED_DS unset) unlike the configs' dK/dV and dQ tiles: the backward runs
    dK/dV storing dS and dQ from dS with those tiles, within budget of the float64 reference."""
    monkeypatch.setattr(kernels, "STORED_DS", None)
    dkdv_ds, dq_from_ds = TileConfig(32, 16, 4, 1), TileConfig(16, 32, 4, 1)
    configs = dataclasses.replace(SMALL_TILES["square16"], backward_dkdv_ds=dkdv_ds, backward_dq_from_ds=dq_from_ds)
    used = []
    real_dkdv, real_dq_from_ds = kernels.backward_dkdv, kernels.backward_dq_from_ds
    monkeypatch.setattr(kernels, "backward_dkdv", lambda *a, **kw: used.append(("dkdv", a[8], kw.get("ds") is not None))
                        or real_dkdv(*a, **kw))
    monkeypatch.setattr(kernels, "backward_dq_from_ds", lambda *a, **kw: used.append(("dq_from_ds", a[5], True))
                        or real_dq_from_ds(*a, **kw))
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    assert_within_budget(triton_op(prefix, configs), reference_op(prefix), shape, torch.float32)
    assert used and set(used) == {("dkdv", dkdv_ds, True), ("dq_from_ds", dq_from_ds, True)}


def rows_far_below_zero(shape, dtype, logit=-120.0, seed=0):
    """q, k, v leaves whose scaled logits are all about ``logit`` (-120: every row's log-sum-exp lies below
    ln(FLT_MAX) = -88.7, so exp(0 - lse) overflows fp32): q's first column ``logit * sqrt(D)``, k's first 1, the
    rest noise (q's small). Logits equal for every key need a component shared by every key; the large column is
    q's, so that this one is no larger than the keys' noise: a large one would make dQ the sum of dS times a large
    common row, 0 in exact arithmetic (each row of dS sums to 0) and, with dS rounded to 16 bits for its matmul
    (ours, like FlashAttention's), that row times dS's rounding errors: a cancellation, not the bug this input looks
    for (benchmarks/NOTES.md)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen) * scale for scale in (0.1, 1.0, 1.0))
    q[..., 0], k[..., 0] = logit * math.sqrt(shape[-1]), 1.0
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]


# every kernel variant, as (tiles, options): deterministic False runs the atomic-dQ backward, stored_ds the stored-dS
# one, head_dim 80 the split head dim's kernels
KERNEL_VARIANTS = {
    "pointers": (SMALL_TILES["tall"], {}),
    "tma": (with_tma(SMALL_TILES["tall"]), {}),
    "tails": (with_tails(TAIL_TILES), {}),
    "tails_tma": (with_tma(with_tails(TAIL_TILES)), {}),
    "delta_in_dq": (with_optional_kernels(SMALL_TILES["wide"]), {}),
    "per_head": (with_per_head_backward(SMALL_TILES["tall"]), {}),
    "atomic": (SMALL_TILES["tall"], {"deterministic": False}),
    "atomic_tma": (with_tma(SMALL_TILES["tall"]), {"deterministic": False}),
    "stored_ds": (STORED_DS_TILES["mixed"], {"stored_ds": True}),
    "stored_ds_tma": (with_tma(STORED_DS_TILES["mixed"]), {"stored_ds": True}),
    "split_d": (with_split_d(TAIL_TILES), {"head_dim": 80}),
    "split_d_tma": (with_split_d(with_tma(TAIL_TILES)), {"head_dim": 80}),
}


def variant_op(variant, prefix, monkeypatch, key_centre=False):
    """The kernels of ``KERNEL_VARIANTS[variant]`` as an op of q, k, v, and the head dim it runs."""
    configs, options = KERNEL_VARIANTS[variant]
    if options.get("stored_ds"):
        monkeypatch.setattr(kernels, "STORED_DS", True)
        monkeypatch.setattr(kernels, "STORED_DS_DQ_TILE", configs.backward_dq)
    op = triton_op(prefix, configs, deterministic=options.get("deterministic", True), key_centre=key_centre)
    return op, options.get("head_dim", 32)


@pytest.mark.parametrize("mask", ["prefix", "full"])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_rows_whose_log_sum_exp_is_far_below_zero(variant, mask, monkeypatch):
    """Every logit about -120, so every row's log-sum-exp is below -88.7: a backward that scored the keys past N (or
    any invisible key) 0 instead of -inf, counting on their zero K and V rows to cancel them, gets exp(0 - lse) =
    inf and inf * 0 = NaN in dQ. Normal logits cannot show that (there exp(0 - lse) is finite and the zero rows do
    cancel it): cuDNN's SDPA backward had exactly this bug at N % 128 == 64 with a mask (pytorch/pytorch#196678).
    Every kernel variant, tiles that leave keys past N (N = 49, and 64 as in that report), within budget of the
    float64 reference."""
    for seq_len in (49, 64):
        prefix = per_sample_prefix(2, seq_len, seed=seq_len) if mask == "prefix" else seq_len
        op, head_dim = variant_op(variant, prefix, monkeypatch)
        shape = (2, 2, seq_len, head_dim)
        leaves = rows_far_below_zero(shape, torch.float32, seed=seq_len)
        assert_leaves_within_budget(op, reference_op(prefix), leaves, "contiguous", shape, torch.float32)


@pytest.mark.parametrize("key_centre", [False, True], ids=["plain", "key_centre"])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_a_retained_graph_gives_the_same_gradients_again(variant, key_centre, monkeypatch):
    """``backward(retain_graph=True)`` and a second backward through the same graph (several losses, a debugging
    pass) read the saved tensors again: a backward that wrote into one of them (out, the log-sum-exp, a buffer it
    shares with the forward) would give a wrong second gradient and no error. Every kernel variant, with and without
    the dQ key correction: the second gradients equal the first, bit for bit where the backward is deterministic."""
    seq_len = 37
    op, head_dim = variant_op(variant, per_sample_prefix(2, seq_len, seed=3), monkeypatch, key_centre=key_centre)
    q, k, v, leaves = make_qkv((2, 2, seq_len, head_dim), torch.float32, seed=3)
    out = op(q, k, v)
    loss = (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    again = torch.autograd.grad(loss, leaves)
    if KERNEL_VARIANTS[variant][1].get("deterministic", True):
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    else:  # atomic adds: the order may differ between runs on a GPU
        torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)


NON_FINITE_PREFIX = (5, 30)  # sample 1's query row 20 sees keys 0-29


def assert_non_finite_gradient_reaches_what_its_row_feeds(op, shape, dtype, bad):
    """``op`` (prefix NON_FINITE_PREFIX) with one inf / NaN in sample 1, head 0, query row 20 of the output gradient:
    that row's dQ and the dK, dV rows of every key it sees are non-finite; every other query's dQ and every other
    head's gradients are finite."""
    row = 20
    q, k, v, leaves = make_qkv(shape, dtype)
    out = op(q, k, v)
    grad_out = torch.ones_like(out)
    grad_out[1, 0, row, 3] = bad
    dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    finite_rows = torch.isfinite(dq).all(-1)
    assert not finite_rows[1, 0, row]
    finite_rows[1, 0, row] = True
    assert finite_rows.all()
    for grad in (dk, dv):
        assert not torch.isfinite(grad[1, 0, :NON_FINITE_PREFIX[1]]).all(-1).any()
        assert torch.isfinite(grad[0]).all() and torch.isfinite(grad[1, 1:]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy, on inf and NaN
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_a_non_finite_output_gradient_reaches_what_its_row_feeds(variant, bad, monkeypatch):
    """An fp16 step whose scaled loss overflowed hands attention an inf / NaN output gradient, and GradScaler skips
    the step only if it comes out of the backward: every kernel variant, see
    :func:`assert_non_finite_gradient_reaches_what_its_row_feeds`."""
    op, head_dim = variant_op(variant, torch.tensor(NON_FINITE_PREFIX, device=DEVICE), monkeypatch)
    assert_non_finite_gradient_reaches_what_its_row_feeds(op, (2, 2, 49, head_dim), torch.float32, bad)


# --------------------------------------------------------------------------- centred keys (CENTRE_KEYS)

def keys_sharing_a_large_part(shape, dtype, shared=32.0, seed=0):
    """q, k, v leaves of unit noise whose keys all add one vector per head, each column about ``shared`` times the
    noise's spread: what a key bias adds, or the channel-wise outliers that SageAttention (arXiv 2410.02367) found
    shared by every token's key."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    k += shared * torch.randn(1, shape[1], 1, shape[3], generator=gen)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]


def public_op(mask, packed=False, backend="triton"):
    """``mimkernels.attention`` with ``mask`` (its keyword arguments) on ``backend``; where ``packed``,
    ``qkv_attention`` on q, k, v stacked into one ``[B, N, 3, H, D]`` tensor (its own autograd path)."""
    def run(q, k, v):
        with mimkernels.use_backend(backend):
            if packed:
                return mimkernels.qkv_attention(torch.stack((q, k, v)).permute(1, 3, 0, 2, 4), **mask).transpose(1, 2)
            return mimkernels.attention(q, k, v, **mask)
    return run


def reference_on_centred_keys(mask):
    """The reference on keys less their mean per sample and head: in float64 the same attention, in 16 bits
    PyTorch's own error on keys that share nothing."""
    return lambda q, k, v: reference.attention(q, k - k.mean(2, keepdim=True).detach(), v, **mask)


CENTRE_KEYS_MODES = [True, "dq"]


@pytest.mark.parametrize("mode", CENTRE_KEYS_MODES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("mask", ["full", "causal", "prefix"])
def test_centred_keys_take_their_shared_part_out_of_dq(mask, packed, mode, monkeypatch):
    """Keys that share a large part (32 times their spread) make dQ = dS K a cancellation in every backward that
    rounds dS to 16 bits for that matmul (ours, FlashAttention's, SDPA's flash kernel on the CPU): dQ's share of the
    common part is that part times the sum of the row's dS, 0 in exact arithmetic, so what comes out is that part
    times the sum of dS's rounding errors. With CENTRE_KEYS (True: keys centred first; "dq": the kernels' dQ
    correction) every output and gradient is within the budget of PyTorch's error on keys that share nothing;
    without it dQ is not (so the input does what it is for)."""
    shape = (2, 2, 49, 32)
    leaves = keys_sharing_a_large_part(shape, torch.float16)
    mask = mask_kwargs(mask, shape[0], shape[2])
    check = (public_op(mask, packed), reference_on_centred_keys(mask), leaves, "contiguous", shape, torch.float16)
    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", mode)
    assert_leaves_within_budget(*check)
    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", False)
    with pytest.raises(AssertionError, match="grad 1"):
        assert_leaves_within_budget(*check)


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_key_centre_in_dq_takes_the_shared_part_out_of_every_dq_path(variant, monkeypatch):
    """The backward's ``key_centre`` (dQ = dS~ K - rowsum(dS~) c in every dQ kernel, c the mean of the first keys)
    on keys that share a large part (32 times their spread), every kernel variant, per-sample prefixes, fp16 (N 49,
    tiles that leave keys past N): within the budget of PyTorch's error on keys that share nothing, as the centred
    copy of the keys gives; without it dQ is outside (so the input does what it is for)."""
    prefix = per_sample_prefix(2, 49, seed=3)
    op, head_dim = variant_op(variant, prefix, monkeypatch, key_centre=True)
    shape = (2, 2, 49, head_dim)
    leaves = keys_sharing_a_large_part(shape, torch.float16)
    reference_centred = lambda q, k, v: reference_op(prefix)(q, k - k.mean(2, keepdim=True).detach(), v)  # noqa: E731
    assert_leaves_within_budget(op, reference_centred, leaves, "contiguous", shape, torch.float16)
    op, _ = variant_op(variant, prefix, monkeypatch)
    with pytest.raises(AssertionError, match="grad 1"):
        assert_leaves_within_budget(op, reference_centred, leaves, "contiguous", shape, torch.float16)


@pytest.mark.parametrize("mode", CENTRE_KEYS_MODES, ids=str)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("seq_len", [1, 50])
@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
def test_centred_keys_leave_the_attention_as_it_was(packed, seq_len, dtype, mode, monkeypatch):
    """Keys whose shared part is small against their spread (half of it), where subtracting the mean rounds the
    most keys (those of the other sign, or much smaller): within the usual budget of the reference on the keys as
    given, per-sample prefixes."""
    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", mode)
    shape = (4, 2, seq_len, 24)
    mask = mask_kwargs("prefix", shape[0], seq_len)
    leaves = keys_sharing_a_large_part(shape, dtype, shared=0.5, seed=seq_len)
    assert_leaves_within_budget(public_op(mask, packed), lambda q, k, v: reference.attention(q, k, v, **mask), leaves,
                                "contiguous", shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_the_key_mean_subtracts_exactly_from_the_keys_it_can(dtype):
    """``k - _key_mean(k)`` has no rounding the keys did not have for every key within a factor of 2 of the mean
    and every key of the mean's sign at least twice its size; a constant column becomes exactly 0; a column with a
    NaN or inf key, and an empty sequence, are left as they are (mean 0)."""
    gen = torch.Generator().manual_seed(0)
    for shared in (0.0, 0.5, 4.0, 1000.0):
        k = (torch.randn(3, 4, 50, 64, generator=gen) + shared * torch.randn(1, 4, 1, 64, generator=gen)).to(dtype)
        mean = attention_ops._key_mean(k)
        assert mean.shape == (3, 4, 1, 64) and mean.dtype == dtype
        keys, centre = k.double(), mean.double()
        exact = (k - mean).double() == keys - centre
        near = ((keys >= centre / 2) & (keys <= 2 * centre)) | ((keys <= centre / 2) & (keys >= 2 * centre))
        larger = (keys * centre > 0) & (keys.abs() >= 2 * centre.abs())
        covered = near | larger | (centre == 0)
        assert exact[covered].all() and covered.double().mean() > 0.3, shared
        # what is left of the mean: about one spacing of the dtype at the column's largest key (half of one from
        # rounding the mean to it, and the mean's own fp32 rounding)
        largest = keys.abs().amax(2, keepdim=True)
        spacing = torch.exp2(largest.log2().floor()) * torch.finfo(dtype).eps
        assert ((k - mean).double().mean(2, keepdim=True).abs() <= 4 * spacing).all(), shared
    k = torch.full((2, 1, 7, 8), 3.0, dtype=dtype)
    k[1, 0, 4, 5], k[1, 0, 2, 6] = float("nan"), float("-inf")
    centred = k - attention_ops._key_mean(k)
    assert (centred[0] == 0).all() and (centred[1, ..., :5] == 0).all() and centred[1, 0, 4, 5].isnan()
    assert (centred[1, ..., 7] == 0).all()
    torch.testing.assert_close(centred[1, ..., 5:7], k[1, ..., 5:7], rtol=0, atol=0, equal_nan=True)
    no_keys = attention_ops._key_mean(torch.empty(2, 3, 0, 8, dtype=dtype))
    assert torch.equal(no_keys, torch.zeros(2, 3, 1, 8, dtype=dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy, on inf and NaN
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
def test_centred_keys_keep_a_bad_key_to_the_queries_that_see_it(packed, bad, monkeypatch):
    """An inf / NaN in one key (sample 1, head 0, key 20, prefix 10) with CENTRE_KEYS: its column's mean is not
    finite and is not subtracted, so the rows it spoils are those that see it (a NaN key: every row from 20; an
    inf: the rows from 20 whose query scores it +inf, inf - inf in the softmax) and no other, not every row of the
    head. (The reference cannot be the judge here: SDPA with a dense mask scores masked keys too, and on the CPU
    its NaN reaches rows that cannot see the key.)"""
    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", True)
    q, k, v, _ = make_qkv((2, 2, 49, 32), torch.float32)
    with torch.no_grad():
        k[1, 0, 20, 3] = bad
        out = public_op({"prefix_len": torch.tensor([5, 10], device=DEVICE)}, packed)(q, k, v)
    spoiled = torch.zeros(2, 2, 49, dtype=torch.bool, device=DEVICE)
    spoiled[1, 0, 20:] = True if math.isnan(bad) else q[1, 0, 20:, 3] * bad > 0
    assert spoiled.any() and torch.equal(~out.isfinite().all(-1), spoiled)


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
def test_key_centre_in_dq_centres_the_keys_of_calls_that_run_other_kernels(packed, monkeypatch):
    """CENTRE_KEYS "dq" where the call does not run our kernels (here the PyTorch reference backend; on a GPU also
    SDPA's causal route): the keys are centred first, as with True, bit for bit; and the kernels' path gives another
    rounding of the same numbers."""
    shape = (2, 2, 49, 32)
    leaves = keys_sharing_a_large_part(shape, torch.float16)
    op = public_op(mask_kwargs("prefix", shape[0], shape[2]), packed, backend="torch")
    results = {}
    for mode in (True, "dq"):
        monkeypatch.setattr(attention_ops, "CENTRE_KEYS", mode)
        results[mode] = outputs_and_grads(op, *leaves, leaves)
    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", False)
    uncentred = outputs_and_grads(op, *leaves, leaves)
    assert all(torch.equal(a, b) for a, b in zip(results[True], results["dq"]))
    assert not torch.equal(results["dq"][1], uncentred[1])  # dQ: the centring took place


def test_centre_keys_must_be_one_of_its_modes(monkeypatch):
    """A CENTRE_KEYS that is none of False, True, "dq" (a misspelt mode, or 1) is an error naming the switch at the
    first call, not keys left silently as they are."""
    q, k, v, _ = make_qkv((1, 1, 8, 16), torch.float32)
    for wrong in ("DQ", "yes", 1, None):
        monkeypatch.setattr(attention_ops, "CENTRE_KEYS", wrong)
        for call in (lambda: mimkernels.attention(q, k, v),
                     lambda: mimkernels.qkv_attention(torch.stack((q, k, v), 2).transpose(1, 3))):
            with pytest.raises(ValueError, match="CENTRE_KEYS must be False, True or 'dq'"):
                with mimkernels.use_backend("triton"):
                    call()


@pytest.mark.parametrize("tiles", SMALL_TILES, ids=str)
def test_atomic_backward_many_tiles(tiles):
    shape = (4, 2, 61, 24)
    prefix = per_sample_prefix(4, 61, seed=3)
    assert_within_budget(triton_op(prefix, SMALL_TILES[tiles], 0.25, deterministic=False), reference_op(prefix, 0.25),
                         shape, torch.float32, layout="packed_qkv")


@st.composite
def tile_configs(draw, kernel, tails=True, split_d=True):
    """A tile for ``kernel``: one of the tuner's candidates (what a table entry may hold), or a small one with any of
    the flags it may carry (TMA, 16-row tails, a split head dim)."""
    if draw(st.booleans()):
        return TileConfig.parse(draw(st.sampled_from(attention_tuning.CANDIDATES[kernel])))
    block_m, block_n = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32, 64]))
    split = split_d and draw(st.booleans())
    tail = tails and not split and block_m > 16 and draw(st.booleans())
    return TileConfig(block_m, block_n, 4, 1, tma=draw(st.booleans()), tail_m=16 * tail, split_d=split)


@st.composite
def kernel_combinations(draw):
    """(configs, backward path, key_centre): every kernel's tile drawn alone, one of the five backwards."""
    configs = AttentionConfigs(*(draw(tile_configs(kernel)) for kernel in ("forward", "backward_dkdv", "backward_dq")))
    path = draw(st.sampled_from(["two_launch", "delta_in_dq", "per_head", "atomic", "stored_ds"]))
    if path == "delta_in_dq":
        configs = dataclasses.replace(configs, backward_dq_delta=draw(tile_configs("backward_dq_delta")))
    elif path == "per_head":
        configs = dataclasses.replace(configs, backward_per_head=draw(tile_configs("backward_per_head", tails=False)))
    elif path == "atomic":  # its own tile, or (None) the dK/dV kernel's
        configs = dataclasses.replace(configs, backward_atomic=draw(st.none() | tile_configs("backward_atomic",
                                                                                            tails=False)))
    elif path == "stored_ds":
        configs = dataclasses.replace(configs, backward_dkdv_ds=draw(tile_configs("backward_dkdv_ds")),
                                      backward_dq_from_ds=draw(tile_configs("backward_dq_from_ds", tails=False,
                                                                            split_d=False)))
    return configs, path, draw(st.booleans())


# CI: the same 16 examples every run (a failure is the commit's, never a flake); MIMKERNELS_FUZZ_EXAMPLES=N: N
# random ones, a long search for a kernel combination that fails
FUZZ_EXAMPLES = int(os.environ.get("MIMKERNELS_FUZZ_EXAMPLES", "16"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize="MIMKERNELS_FUZZ_EXAMPLES" not in os.environ)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 3),
    seq_len=st.sampled_from([1, 2, 16, 17, 33, 49, 50, 64, 65, 97, 128, 129, 197]) | st.integers(1, 140),
    head_dim=st.sampled_from([16, 24, 32, 40, 48, 64, 72, 80, 96, 128]), dtype=st.sampled_from(CPU_DTYPES),
    layout=st.sampled_from(["contiguous", "packed_qkv", "bnhd"]), kernels_and_path=kernel_combinations(),
    prefix_kind=st.sampled_from(["per_sample", "int"]), logit_std=st.sampled_from([None, 1.0, 4.0, 16.0]),
    seed=st.integers(0, 2**16),
)
def test_random_kernel_combinations(batch, heads, seq_len, head_dim, dtype, layout, kernels_and_path, prefix_kind,
                                    logit_std, seed):
    """Random shapes, layouts and prefixes through a random tile and flag of every kernel and one of the five
    backwards (two launches, delta in dQ, one program per head, atomic dQ, stored dS), with or without the dQ key
    correction: the combinations no hand-written case lists. Within twice the budget of the float64 reference: a
    wrong combination is off by orders of magnitude (the one found so far by 0.8 against 1e-5), while the budget,
    which rests on one PyTorch rounding, is missed by up to 1.1x by rounding alone in about one draw in a thousand
    (one fp16 ulp of dQ; fp32 with logits of std 16), and a search that stopped there would hide the wrong ones (a
    shrinking hypothesis run did: benchmarks/NOTES.md, "Random kernel combinations"). ``logit_std`` sets the scale so
    that q.k * scale has that standard deviation (None: 1/sqrt(D)); above about 20 in fp32 the gradients' error is
    set by the order of the scores' sums, not by the kernel. ``MIMKERNELS_FUZZ_EXAMPLES=2000`` runs a long search."""
    configs, path, key_centre = kernels_and_path
    rng = random.Random(seed)
    if prefix_kind == "int":  # past N as often as inside: the kernels clamp it (the public ops clamp first)
        prefix = rng.choice([0, 1, seq_len, seq_len + 1, seq_len + 1000, rng.randint(0, seq_len)])
    else:
        prefix = torch.tensor([rng.choice([0, 1, seq_len, seq_len + 5, rng.randint(0, seq_len)])
                               for _ in range(batch)], device=DEVICE)
    scale = None if logit_std is None else logit_std / math.sqrt(head_dim)  # q, k entries ~ N(0, 1)
    assert_within_budget(triton_op(prefix, configs, scale, deterministic=path != "atomic", key_centre=key_centre),
                         reference_op(prefix, scale), (batch, heads, seq_len, head_dim), dtype, layout=layout,
                         seed=seed, slack=2.0)


@pytest.mark.parametrize("mode", ["full", "causal", "prefix"])
def test_attention_entry(mode):
    shape = (2, 2, 45, 32)
    kwargs = {"full": {}, "causal": {"causal": True},
              "prefix": {"prefix_len": torch.tensor([3, 30], device=DEVICE)}}[mode]

    def kernel_fn(q, k, v):
        with mimkernels.use_backend("triton"):
            return mimkernels.attention(q, k, v, **kwargs)

    assert_within_budget(kernel_fn, lambda q, k, v: reference.attention(q, k, v, **kwargs), shape, torch.float32)


def test_output_is_stored_tokens_major():
    q, k, v, _ = make_qkv((2, 3, 20, 16), torch.float32)
    with mimkernels.use_backend("triton"):
        out = mimkernels.prefix_causal_attention(q, k, v, 5)
    assert out.shape == (2, 3, 20, 16)
    assert out.transpose(1, 2).is_contiguous()  # so .transpose(1, 2).reshape(B, N, H * D) is a view


def test_backward_is_deterministic():
    prefix = torch.tensor([7, 60], device=DEVICE)
    runs = []
    for _ in range(2):
        q, k, v, leaves = make_qkv((2, 2, 70, 32), torch.float32)
        runs.append(outputs_and_grads(triton_op(prefix), q, k, v, leaves))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_non_unit_head_dim_stride_is_copied():
    q, k, v, _ = make_qkv((1, 2, 9, 16), torch.float32)
    k_strided = torch.empty(1, 2, 9, 32, device=DEVICE)[..., ::2]
    k_strided.copy_(k.detach())
    with mimkernels.use_backend("triton"):
        out = mimkernels.prefix_causal_attention(q, k_strided, v, 3)
    torch.testing.assert_close(out, reference.prefix_causal_attention(q, k, v, 3))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    q = torch.randn(0, 2, 10, 16, device=DEVICE, requires_grad=True)
    with mimkernels.use_backend(backend):
        out = mimkernels.prefix_causal_attention(q, q, q, torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert out.shape == (0, 2, 10, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


# --------------------------------------------------------------------------- backends


def test_auto_on_cpu_is_the_reference():
    q, k, v, _ = make_qkv((2, 2, 30, 16), torch.float32)
    prefix = torch.tensor([4, 40])
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    assert torch.equal(mimkernels.prefix_causal_attention(q, k, v, prefix),
                       reference.prefix_causal_attention(q, k, v, prefix))


def test_available_backends():
    names = mimkernels.available_backends()
    assert names[0] == "torch" and "triton" in names  # the interpreter or a GPU runs Triton here


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="backend name"):
        with mimkernels.use_backend("tritonn"):
            pass


def test_old_backend_name_cuda_still_works_with_a_deprecation_warning(monkeypatch):
    with pytest.warns(DeprecationWarning, match="'cuda' is deprecated.*use 'extension'") as caught:
        with mimkernels.use_backend("cuda"):
            assert mimkernels._backend.current_backend() == "extension"
    assert caught[0].filename == __file__  # pointed at the caller, not at contextlib
    monkeypatch.setenv("MIMKERNELS_BACKEND", "cuda")
    with pytest.warns(DeprecationWarning, match="MIMKERNELS_BACKEND 'cuda' is deprecated"):
        assert mimkernels._backend.current_backend() == "extension"


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("MIMKERNELS_BACKEND", "fast")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="MIMKERNELS_BACKEND"):
        mimkernels.prefix_causal_attention(q, q, q, 0)


def test_on_off_switches_in_environment(monkeypatch):
    """MIMKERNELS_AUTOTUNE / FAST_LAUNCH / CHECK_INDICES: 1 / 0 and the usual words for them; anything else is an
    error naming the variable (``MIMKERNELS_AUTOTUNE=true`` left the autotune silently off before)."""
    for value, want in (("1", True), ("true", True), (" Yes ", True), ("ON", True), ("0", False), ("false", False),
                        ("no", False), ("Off", False), ("", False)):
        monkeypatch.setenv("MIMKERNELS_AUTOTUNE", value)
        assert kernels.autotune_enabled() is want, value
    monkeypatch.delenv("MIMKERNELS_AUTOTUNE")
    assert not kernels.autotune_enabled()
    for value in ("2", "enabled", "y"):
        monkeypatch.setenv("MIMKERNELS_AUTOTUNE", value)
        with pytest.raises(ValueError, match=f"MIMKERNELS_AUTOTUNE must be 1 or 0 .*, got '{value}'"):
            kernels.autotune_enabled()
    monkeypatch.setenv("MIMKERNELS_FAST_LAUNCH", "false")
    assert not launch.fast_launch_enabled()
    monkeypatch.setenv("MIMKERNELS_FAST_LAUNCH", "fast")
    with pytest.raises(ValueError, match="MIMKERNELS_FAST_LAUNCH must be 1 or 0"):
        launch.fast_launch_enabled()
    # read when mimkernels is imported: the import fails, naming it
    result = subprocess.run([sys.executable, "-c", "import mimkernels"], capture_output=True, text=True,
                            env={**os.environ, "MIMKERNELS_CHECK_INDICES": "always"})
    assert result.returncode != 0 and "MIMKERNELS_CHECK_INDICES must be 1 or 0" in result.stderr
    # MIMKERNELS_STORED_DS has three values: unset or empty (None: the tile table decides), 1, 0;
    # MIMKERNELS_CENTRE_KEYS is off unless set, and has a third value, dq
    stored_ds = "from mimkernels.triton import attention; print(attention.STORED_DS)"
    centre_keys = "from mimkernels.ops import attention; print(attention.CENTRE_KEYS)"
    for variable, code, value, want in (("MIMKERNELS_STORED_DS", stored_ds, None, "None"),
                                        ("MIMKERNELS_STORED_DS", stored_ds, "", "None"),
                                        ("MIMKERNELS_STORED_DS", stored_ds, "1", "True"),
                                        ("MIMKERNELS_STORED_DS", stored_ds, "off", "False"),
                                        ("MIMKERNELS_CENTRE_KEYS", centre_keys, None, "False"),
                                        ("MIMKERNELS_CENTRE_KEYS", centre_keys, "yes", "True"),
                                        ("MIMKERNELS_CENTRE_KEYS", centre_keys, " DQ ", "dq")):
        env = {name: v for name, v in os.environ.items() if not name.startswith("MIMKERNELS_")}  # none set above
        if value is not None:
            env[variable] = value
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert result.stdout.strip() == want, (variable, value, result.stderr[-500:])
    env = {name: v for name, v in os.environ.items() if not name.startswith("MIMKERNELS_")}
    result = subprocess.run([sys.executable, "-c", centre_keys], capture_output=True, text=True,
                            env={**env, "MIMKERNELS_CENTRE_KEYS": "dQ-only"})
    assert result.returncode != 0 and "MIMKERNELS_CENTRE_KEYS must be 1 or 0 " in result.stderr
    assert "or dq (the kernels' dQ correction)" in result.stderr


def test_environment_picks_backend(monkeypatch):
    monkeypatch.setenv("MIMKERNELS_BACKEND", "triton")
    q, k, v, _ = make_qkv((1, 2, 12, 16), torch.float32)
    out = mimkernels.prefix_causal_attention(q, k, v, 2)
    assert out.transpose(1, 2).is_contiguous() and not out.is_contiguous()  # the kernel's layout, not SDPA's


def test_named_backend_that_cannot_run(monkeypatch):
    monkeypatch.setattr(mimkernels._backend, "_TRITON_INTERPRETED", False)
    q = torch.randn(1, 1, 4, 16)
    with mimkernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mimkernels.prefix_causal_attention(q, q, q, 0)
    with mimkernels.use_backend("extension"), pytest.raises(RuntimeError, match="no 'extension' implementation"):
        mimkernels.prefix_causal_attention(q, q, q, 0)


def test_dispatch_traces_without_graph_breaks():
    """Validation and backend choice compile with fullgraph=True (the GPU test compiles the kernels too)."""
    q, k, v, _ = make_qkv((2, 2, 16, 16), torch.float32)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    prefix = torch.tensor([3, 20])
    compiled = torch.compile(mimkernels.prefix_causal_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, prefix), reference.prefix_causal_attention(q, k, v, prefix))


def test_autocast_dtype_is_followed():
    q = torch.randn(1, 2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mimkernels.prefix_causal_attention(q, q, q, 2)
    assert out.dtype == torch.bfloat16


# --------------------------------------------------------------------------- mask


@pytest.mark.parametrize("prefix", [0, 3, 9, torch.tensor([0, 2, 9, 50]), torch.tensor([-4, 5], dtype=torch.int32)],
                         ids=str)
def test_prefix_causal_mask(prefix):
    seq_len = 9
    mask = mimkernels.prefix_causal_mask(seq_len, prefix)
    values = prefix.tolist() if isinstance(prefix, torch.Tensor) else [prefix]
    assert mask.shape == (len(values), 1, seq_len, seq_len) and mask.dtype == torch.bool
    for b, p in enumerate(values):
        for i in range(seq_len):
            for j in range(seq_len):
                assert mask[b, 0, i, j].item() == (j <= i or j < p)


# --------------------------------------------------------------------------- bad input


def _qkv(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("case, error, match", [
    (lambda: (_qkv(2, 8, 16), _qkv(2, 8, 16), _qkv(2, 8, 16), 0), ValueError, "q must be 4-D"),
    (lambda: (_qkv(1, 2, 8, 16), "k", _qkv(1, 2, 8, 16), 0), TypeError, "k must be a torch.Tensor"),
    (lambda: (_qkv(1, 2, 8, 16), _qkv(1, 2, 9, 16), _qkv(1, 2, 9, 16), 0), ValueError, "query and key lengths differ"),
    (lambda: (_qkv(1, 2, 8, 16), _qkv(1, 3, 8, 16), _qkv(1, 3, 8, 16), 0), ValueError, "k has shape"),
    (lambda: (_qkv(1, 2, 8, 16), _qkv(1, 2, 8, 16), _qkv(1, 2, 8, 24), 0), ValueError, "v has shape"),
    (lambda: (_qkv(1, 2, 8, 16), _qkv(1, 2, 8, 16, dtype=torch.float16), _qkv(1, 2, 8, 16), 0), TypeError,
     "k has dtype"),
    (lambda: (_qkv(1, 2, 8, 16, dtype=torch.float64),) * 3 + (0,), TypeError, "float16, bfloat16 or float32"),
    (lambda: (_qkv(1, 2, 8, 12),) * 3 + (0,), ValueError, "head_dim"),
    (lambda: (_qkv(1, 2, 8, 264),) * 3 + (0,), ValueError, "head_dim"),
    (lambda: (_qkv(1, 2, 8, 8),) * 3 + (0,), ValueError, "head_dim"),
    (lambda: (_qkv(1, 2, 8, 16),) * 3 + (-1,), ValueError, "prefix_len must be >= 0"),
    (lambda: (_qkv(1, 2, 8, 16),) * 3 + (2.0,), TypeError, "prefix_len must be an int"),
    (lambda: (_qkv(1, 2, 8, 16),) * 3 + (True,), TypeError, "prefix_len must be an int"),
    (lambda: (_qkv(1, 2, 8, 16),) * 3 + (torch.tensor([2.0]),), TypeError, "integer tensor"),
    (lambda: (_qkv(1, 2, 8, 16),) * 3 + (torch.tensor([True]),), TypeError, "integer tensor"),
    (lambda: (_qkv(2, 2, 8, 16),) * 3 + (torch.tensor([1, 2, 3]),), ValueError, r"shape \[batch\]"),
    (lambda: (_qkv(2, 2, 8, 16),) * 3 + (torch.tensor(2),), ValueError, r"shape \[batch\]"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input(case, error, match):
    q, k, v, prefix = case()
    for backend in ("torch", "triton"):
        with mimkernels.use_backend(backend), pytest.raises(error, match=match):
            mimkernels.prefix_causal_attention(q, k, v, prefix)


def test_bad_attention_arguments():
    q = _qkv(1, 1, 4, 16)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        mimkernels.attention(q, q, q, deterministic=None)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        mimkernels.prefix_causal_attention(q, q, q, 2, deterministic=1)
    with pytest.raises(TypeError, match="causal must be a bool"):
        mimkernels.attention(q, q, q, causal="yes")
    with pytest.raises(TypeError, match="scale must be a real number"):
        mimkernels.attention(q, q, q, scale="0.1")
    with pytest.raises(ValueError, match="scale must be finite"):
        mimkernels.attention(q, q, q, scale=float("inf"))


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        mimkernels.prefix_causal_mask(-1, 0)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        mimkernels.prefix_causal_mask(4, -2)
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        mimkernels.prefix_causal_mask(4, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        mimkernels.prefix_causal_mask(4, torch.zeros(2))


@pytest.mark.gpu
def test_prefix_on_other_device():
    q = torch.randn(2, 1, 8, 16, device="cuda")
    with pytest.raises(ValueError, match="prefix_len is on"):
        mimkernels.prefix_causal_attention(q, q, q, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="k is on"):
        mimkernels.prefix_causal_attention(q, q.cpu(), q, 1)


# --------------------------------------------------------------------------- packed qkv


def packed_leaf(shape, dtype, layout="contiguous", seed=0):
    """A packed qkv ``[B, N, 3, H, D]`` for q, k, v of ``shape`` [B, H, N, D]; ``layout="wide"``: a view of a wider
    projection (rows further apart than 3 * H * D), ``"strided_d"``: a non-unit stride in the head dim."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, seq_len, head_dim = shape
    width = 3 * heads * head_dim
    if layout == "contiguous":
        qkv = torch.randn(batch, seq_len, width, generator=gen).to(DEVICE, dtype).unflatten(-1, (3, heads, head_dim))
    elif layout == "wide":
        qkv = torch.randn(batch, seq_len, width + 24, generator=gen).to(DEVICE, dtype)[..., 8:8 + width]
        qkv = qkv.unflatten(-1, (3, heads, head_dim))
    else:
        qkv = torch.randn(batch, seq_len, 3, heads, 2 * head_dim, generator=gen).to(DEVICE, dtype)[..., ::2]
    return qkv.detach().requires_grad_()


def packed_outputs_and_grads(fn, qkv):
    out = fn(qkv)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, qkv, grad_out)[0]


def on_views(qkv, **kwargs):
    """attention() on q, k, v views of the packed projection, as [B, N, H, D]."""
    return mimkernels.attention(*qkv.permute(2, 0, 3, 1, 4), **kwargs).transpose(1, 2)


def mask_kwargs(mask, batch, seq_len):
    return {"full": {}, "causal": {"causal": True}, "prefix": {"prefix_len": per_sample_prefix(batch, seq_len)}}[mask]


def reference_on_views(qkv, causal=False, prefix_len=None):
    """The PyTorch reference (any dtype, float64 too) on q, k, v views, as [B, N, H, D]."""
    prefix = prefix_len if prefix_len is not None else 0 if causal else qkv.shape[1]
    return reference.prefix_causal_attention(*qkv.permute(2, 0, 3, 1, 4), prefix).transpose(1, 2)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape, mask", [((1, 1, 1, 16), "prefix"), ((4, 2, 49, 64), "prefix"),
                                         ((4, 1, 50, 40), "prefix"), ((4, 1, 197, 80), "prefix"),
                                         ((4, 1, 257, 128), "prefix"), ((2, 2, 50, 64), "full"),
                                         ((2, 1, 49, 40), "causal")], ids=str)
def test_qkv_attention_within_budget_and_equal_to_attention_on_views(shape, mask, dtype):
    """The packed op against the float64 reference (error budget as everywhere here), and bit for bit what
    attention() gives on q, k, v views of the same projection: the same kernels, only dq, dk, dv are written into
    one packed gradient (so no stack and no reshape copy follow)."""
    kwargs = mask_kwargs(mask, shape[0], shape[2])
    qkv = packed_leaf(shape, dtype)
    with mimkernels.use_backend("triton"):
        got = packed_outputs_and_grads(lambda t: mimkernels.qkv_attention(t, **kwargs), qkv)
        views = packed_outputs_and_grads(lambda t: on_views(t, **kwargs), qkv)
    torch_same_dtype = packed_outputs_and_grads(lambda t: reference_on_views(t, **kwargs), qkv)
    qkv64 = qkv.detach().double().requires_grad_()
    want = packed_outputs_and_grads(lambda t: reference_on_views(t, **kwargs), qkv64)
    assert got[0].shape == (shape[0], shape[2], shape[1], shape[3]) and got[0].is_contiguous()
    assert got[1].shape == qkv.shape and got[1].is_contiguous()
    for name, g, v, t, w in zip(["out", "grad qkv"], got, views, torch_same_dtype, want):
        assert torch.equal(g, v), f"{name}: differs from attention() on views"
        kernel_err = (g.double() - w).abs().max().item()
        torch_err = (t.double() - w).abs().max().item()
        budget = 2 * torch_err + FLOOR[dtype] * max(1.0, w.abs().max().item())
        assert kernel_err <= budget, f"{name}: error {kernel_err:.3e} > budget {budget:.3e} (torch {torch_err:.3e})"


@pytest.mark.parametrize("mode", CENTRE_KEYS_MODES, ids=str)
@pytest.mark.parametrize("mask", ["prefix", "causal"])
def test_qkv_attention_with_centred_keys_equals_attention_on_views(mask, mode, monkeypatch):
    """CENTRE_KEYS on: the packed op centres its keys in its own autograd function (the views path, before it), or
    hands the dQ correction to its backward launcher, and still gives what attention() gives on views of the same
    projection, bit for bit."""
    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", mode)
    shape = (3, 2, 49, 32)
    kwargs = mask_kwargs(mask, shape[0], shape[2])
    qkv = packed_leaf(shape, torch.float16)
    with torch.no_grad():
        qkv[:, :, 1] += 8 * torch.randn(1, 1, 2, 32, generator=torch.Generator().manual_seed(0)).to(qkv)
    with mimkernels.use_backend("triton"):
        got = packed_outputs_and_grads(lambda t: mimkernels.qkv_attention(t, **kwargs), qkv)
        views = packed_outputs_and_grads(lambda t: on_views(t, **kwargs), qkv)
    for name, g, v in zip(["out", "grad qkv"], got, views):
        assert torch.equal(g, v), name


@pytest.mark.parametrize("mask", ["prefix", "full", "causal"])
def test_qkv_attention_with_the_per_head_backward(mask, monkeypatch):
    """Where the table picks the per-head backward, the packed op's backward writes dq, dk, dv into the packed
    gradient through it: within budget, and the same gradient as the two-launch backward gives up to fp32 rounding
    (the sums run in another order)."""
    shape = (3, 2, 45, 24)
    kwargs = mask_kwargs(mask, shape[0], shape[2])
    qkv = packed_leaf(shape, torch.float32)
    with mimkernels.use_backend("triton"):
        two_launch = packed_outputs_and_grads(lambda t: mimkernels.qkv_attention(t, **kwargs), qkv)
        looked_up, per_head, calls = kernels.configs_for_call, kernels.backward_per_head, []
        monkeypatch.setattr(kernels, "configs_for_call", lambda q: with_per_head_backward(looked_up(q)))
        monkeypatch.setattr(kernels, "backward_per_head", lambda *args, **kw: calls.append(1) or per_head(*args, **kw))
        got = packed_outputs_and_grads(lambda t: mimkernels.qkv_attention(t, **kwargs), qkv)
    assert calls == [1]
    qkv64 = qkv.detach().double().requires_grad_()
    want = packed_outputs_and_grads(lambda t: reference_on_views(t, **kwargs), qkv64)
    assert torch.equal(got[0], two_launch[0])
    torch.testing.assert_close(got[1], two_launch[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["wide", "strided_d"])
def test_qkv_attention_reads_strided_projections(layout):
    shape = (2, 2, 33, 24)
    prefix = per_sample_prefix(2, 33)
    qkv = packed_leaf(shape, torch.float32, layout)
    with mimkernels.use_backend("triton"):
        got = packed_outputs_and_grads(lambda t: mimkernels.qkv_attention(t, prefix_len=prefix), qkv)
    qkv64 = qkv.detach().double().requires_grad_()
    want = packed_outputs_and_grads(lambda t: reference_on_views(t, prefix_len=prefix), qkv64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_qkv_attention_checks_its_arguments():
    qkv = torch.randn(2, 5, 3, 2, 16)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        mimkernels.qkv_attention(qkv.tolist())
    with pytest.raises(ValueError, match=r"qkv must be 5-D \[batch, seq_len, 3, heads, head_dim\]"):
        mimkernels.qkv_attention(qkv[:, :, 0])
    with pytest.raises(ValueError, match="qkv must be 5-D"):
        mimkernels.qkv_attention(qkv[:, :, :2])
    with pytest.raises(TypeError, match="causal must be a bool"):
        mimkernels.qkv_attention(qkv, causal=1)
    # errors name qkv, the argument given, not the q, k, v views taken of it
    with pytest.raises(ValueError, match=r"head_dim \(qkv.shape\[-1\]\)"):
        mimkernels.qkv_attention(torch.randn(2, 5, 3, 2, 12))
    with pytest.raises(TypeError, match="qkv must be float16, bfloat16 or float32, got torch.float64"):
        mimkernels.qkv_attention(qkv.double())
    with pytest.raises(ValueError, match="prefix_len is on cpu but qkv is on meta"):
        mimkernels.qkv_attention(qkv.to("meta"), prefix_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"prefix_len must have shape \[batch\]"):
        mimkernels.qkv_attention(qkv, prefix_len=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        mimkernels.qkv_attention(qkv, deterministic=None)


def test_qkv_attention_follows_autocast_with_one_cast():
    qkv = torch.randn(2, 5, 3, 2, 16, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), mimkernels.use_backend("torch"):
        out = mimkernels.qkv_attention(qkv, causal=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 2, 16)
    out.float().sum().backward()
    assert qkv.grad.dtype == torch.float32 and qkv.grad.shape == qkv.shape


def test_qkv_attention_compiles_to_the_same_kernels():
    qkv, prefix = packed_leaf((2, 2, 33, 16), torch.float32), torch.tensor([5, 40], device=DEVICE)

    def loss_of(qkv, prefix):
        return mimkernels.qkv_attention(qkv, prefix_len=prefix).square().sum()

    with mimkernels.use_backend("triton"):
        compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
        got = compiled(qkv, prefix)
        got_grad = torch.autograd.grad(got, qkv)[0]
        want = loss_of(qkv, prefix)
        want_grad = torch.autograd.grad(want, qkv)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


# --------------------------------------------------------------------------- torch.compile


def test_compiled_forward_and_backward_match_eager():
    """fullgraph torch.compile (aot_eager: forward and backward graphs) runs the kernels as custom ops."""
    shape, prefix = (2, 2, 33, 16), torch.tensor([5, 40], device=DEVICE)

    def loss_of(q, k, v, prefix):
        return mimkernels.prefix_causal_attention(q, k, v, prefix).square().sum()

    q, k, v, leaves = make_qkv(shape, torch.float32)
    with mimkernels.use_backend("triton"):
        compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
        got = [compiled(q, k, v, prefix)]
        got += torch.autograd.grad(got[0], leaves)
        want = [loss_of(q, k, v, prefix)]
        want += torch.autograd.grad(want[0], leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same kernels on the same inputs


@pytest.mark.parametrize("prefix", [torch.tensor([0, 9]), 7], ids=["tensor", "int"])
def test_custom_ops_pass_opcheck(prefix):
    """Schema, fake kernels (shapes and strides) and dispatch of the ops torch.compile sees."""
    from mimkernels.ops import attention as ops

    q, k, v = (torch.randn(2, 2, 9, 16, device=DEVICE) for _ in range(3))
    tensor_prefix = prefix.to(DEVICE) if isinstance(prefix, torch.Tensor) else None
    int_prefix = 0 if tensor_prefix is not None else prefix
    args = (q, k, v, tensor_prefix, int_prefix, 0.25)
    torch.library.opcheck(ops._forward_kernels.custom_op, args)
    out, lse = ops._forward_kernels(*args)
    torch.library.opcheck(ops._backward_kernels.custom_op,
                          (torch.randn_like(out), q, k, v, out, lse, tensor_prefix, int_prefix, 0.25, True, False))
    qkv = torch.randn(2, 9, 3, 2, 16, device=DEVICE)
    out, lse = ops._forward_kernels(*ops._unpacked(qkv), tensor_prefix, int_prefix, 0.25)
    for key_mean, key_centre in ((None, False), (ops._key_mean(ops._unpacked(qkv)[1]), False), (None, True)):
        torch.library.opcheck(ops._packed_backward_kernels.custom_op, (torch.randn_like(out), qkv, out, lse,
                              tensor_prefix, int_prefix, 0.25, True, key_mean, key_centre))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy, on NaN
@pytest.mark.parametrize("seq_len", [9, 49])
@pytest.mark.parametrize("mask", ["full", "causal", "prefix"])
def test_a_nan_in_one_query_makes_its_row_nan_and_leaves_the_others(mask, seq_len):
    """A NaN in a query gives NaN in that row, never a silent 0 (which SDPA without a mask gives on the CPU up to 15
    tokens: ``reference.attention``'s docstring), and every other row exactly as without it (rows are
    independent)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, seq_len, 64, device=DEVICE) for _ in range(3))
    kwargs = {"full": {}, "causal": {"causal": True}, "prefix": {"prefix_len": torch.tensor([3, 7], device=DEVICE)}}
    with mimkernels.use_backend("triton"):
        clean = mimkernels.attention(q, k, v, **kwargs[mask])
        q[1, 0, 5, 5] = float("nan")
        out = mimkernels.attention(q, k, v, **kwargs[mask])
    assert out[1, 0, 5].isnan().all()
    others = torch.ones(out.shape[:3], dtype=torch.bool, device=DEVICE)
    others[1, 0, 5] = False
    assert torch.equal(out[others], clean[others])
