"""The MLP's GELU inside its two GEMMs, in Triton: ``fc2(gelu(fc1(x)))`` without a GELU pass of its own.

Unfused, the hidden activation costs two extra passes per step: forward, the GEMM writes ``h`` and GELU reads it
back to write ``g = gelu(h)``; backward, the fc2 input-gradient GEMM writes ``dg``, and GELU's backward reads
``dg`` and ``h`` to write ``dh``: 10 bytes per hidden element in 16 bits, four times the model width per token.
Here the fc1 GEMM writes ``h`` and ``g`` from its accumulator (``_linear_gelu_fwd``), and the fc2 input-gradient
GEMM multiplies its accumulator by ``gelu'(h)`` and writes ``dh`` (``_matmul_gelu_grad``): 4 bytes. The other
four GEMMs (fc2's forward and weight gradient, fc1's weight and input gradients) stay cuBLAS calls.

GELU is the exact one (``erf``), as ``nn.GELU()`` and MAE / AIM use; cuBLASLt's GELU epilogue is the tanh
approximation, which is why these two GEMMs are Triton. ``h`` is rounded to its storage dtype before GELU reads
it, as the unfused ops do, so both paths compute GELU of the same numbers.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._custom_ops import custom_op_when_compiling
from .launch import cdiv, launch, tensor_descriptor, tma_usable


class GemmTile(NamedTuple):
    block_m: int  # output rows per program
    block_n: int  # output columns per program
    block_k: int  # depth per loop step
    group_m: int  # row tiles per group (the programs running together share operand tiles in L2)
    warps: int
    stages: int
    # operands and results through TMA tensor descriptors (Hopper and newer, where tma_usable allows; elsewhere the
    # same tile through pointers)
    tma: bool = False

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}g{self.group_m}w{self.warps}s{self.stages}"
                + "+tma" * self.tma)

    @classmethod
    def parse(cls, text: str) -> GemmTile:
        """The tile :meth:`__str__` names, e.g. ``"128x128x64g8w8s3+tma"`` (what ``bench_mlp --sweep`` prints)."""
        found = re.fullmatch(r"(\d+)x(\d+)x(\d+)g(\d+)w(\d+)s(\d+)(\+tma)?", text.strip())
        if not found:
            raise ValueError(f"not a GEMM tile: {text!r} (expected e.g. '128x128x64g8w8s3' or '64x128x64g8w4s4+tma')")
        return cls(*map(int, found.groups()[:6]), tma=found.group(7) is not None)


# By operand width in bytes. 2-byte: chosen before any GPU measured it, a tile that compiles without spills for
# sm_80 and sm_90 under Triton 3.6 and 3.8 (128x128x32 with 8 warps spills 4 B in the gradient GEMM for fp16 on
# sm_80 under 3.6); `python -m benchmarks.bench_mlp --sweep` times CANDIDATES on a GPU, spilling or not. fp32
# multiplies on the FMA units (``ieee``), in small tiles: 64x32x32 with 8 warps (with 4 the forward spilled 4 B on
# sm_90 under Triton 3.9). benchmarks/kernel_report.py checks the spills.
CONFIGS = {2: GemmTile(64, 128, 32, 8, 4, 4), 4: GemmTile(64, 32, 32, 8, 8, 1)}
CANDIDATES = tuple(GemmTile(*tile) for tile in (
    (64, 128, 32, 8, 4, 4), (128, 128, 32, 8, 8, 4), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4),
    (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
    # Hopper: TMA loads feed the tensor cores without per-thread address arithmetic (fewer registers: the larger
    # tiles compile without spills); the attention kernels' TMA tiles measured 1-10% faster on the H200
    (64, 128, 64, 8, 4, 4, True), (128, 128, 64, 8, 8, 3, True), (128, 128, 64, 8, 4, 4, True),
    (128, 256, 64, 8, 8, 3, True),
))

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _tile(program, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row tile, col tile) of a program, GROUP_M row tiles at a time down each column of tiles, so the
    programs running together share their operand tiles in L2."""
    row_tiles = tl.cdiv(rows, BLOCK_M)
    col_tiles = tl.cdiv(cols, BLOCK_N)
    per_group = GROUP_M * col_tiles
    first_row = (program // per_group) * GROUP_M
    group_rows = tl.minimum(row_tiles - first_row, GROUP_M)
    return first_row + (program % per_group) % group_rows, (program % per_group) // group_rows


@triton.jit
def _gemm(A, B, stride_am, stride_bk, stride_bn, offs_m, offs_n, depth, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 ``A[offs_m, :] @ B[:, offs_n]`` over ``depth``; A has unit stride along k, B is read through its
    strides (fc1's weight ``[n, k]`` with unit k stride, fc2's ``[k, n]`` with unit n stride). Row and column
    offsets must lie inside A and B (the callers wrap them); only k is masked, and only when it has a tail."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + ks[None, :]
    b_ptrs = B + ks[:, None].to(tl.int64) * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, depth, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ks[None, :] < depth - k_start, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < depth - k_start, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _gemm_tma(A, B, m_start, n_start, depth, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              B_IS_N_BY_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 ``A[m_start:, :] @ B[:, n_start:]`` (one [BLOCK_M, BLOCK_N] tile) over ``depth``, both read through
    2-D tensor descriptors: A ``[rows, depth]``, B ``[cols, depth]`` (fc1's weight, transposed here) where
    B_IS_N_BY_K, else ``[depth, cols]`` (fc2's). TMA fills rows, cols and depth past the edges with zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, depth, BLOCK_K):
        a = A.load([m_start, k_start])
        if B_IS_N_BY_K:
            b = tl.trans(B.load([n_start, k_start]))
        else:
            b = B.load([k_start, n_start])
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _program_product(A, B, stride_am, stride_bk, stride_bn, rows, cols, depth, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, B_IS_N_BY_K: tl.constexpr, USE_TMA: tl.constexpr):
    """This program's output tile of ``A @ B``: (fp32 accumulator, first row, first col, row and col offsets).
    Through descriptors with USE_TMA (zero fill past the edges), else through pointers whose rows and cols wrap
    onto valid ones past the edges (no masks in the k loop; those results are never stored)."""
    tile_m, tile_n = _tile(tl.program_id(0), rows, cols, BLOCK_M, BLOCK_N, GROUP_M)
    m_start = tile_m * BLOCK_M
    n_start = tile_n * BLOCK_N
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    if USE_TMA:
        acc = _gemm_tma(A, B, m_start, n_start, depth, BLOCK_M, BLOCK_N, BLOCK_K, B_IS_N_BY_K, DOT_PRECISION)
    else:
        acc = _gemm(A, B, stride_am, stride_bk, stride_bn, offs_m % rows, offs_n % cols, depth, BLOCK_M, BLOCK_N,
                    BLOCK_K, EVEN_K, DOT_PRECISION)
    return acc, m_start, n_start, offs_m, offs_n


@triton.jit
def _linear_gelu_fwd(X, W, BIAS, H, G, stride_xm, stride_wn, stride_hm, stride_gm, rows, cols, depth,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     USE_TMA: tl.constexpr):
    """``h = x @ W^T (+ bias)`` and ``g = gelu(h)``, both stored; x ``[rows, depth]``, W ``[cols, depth]``. With
    USE_TMA, X, W, H and G are 2-D tensor descriptors (their strides then come with them)."""
    acc, m_start, n_start, offs_m, offs_n = _program_product(
        X, W, stride_xm, 1, stride_wn, rows, cols, depth, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, DOT_PRECISION,
        True, USE_TMA)
    if USE_TMA:
        out_dtype = H.dtype
    else:
        out_dtype = H.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n % cols).to(tl.float32)[None, :]
    h = acc.to(out_dtype)
    rounded = h.to(tl.float32)
    g = (0.5 * rounded * (1.0 + tl.erf(rounded * _SQRT_HALF))).to(out_dtype)
    if USE_TMA:  # TMA drops the rows and cols past the edges
        H.store([m_start, n_start], h)
        G.store([m_start, n_start], g)
    else:
        inside = (offs_m < rows)[:, None] & (offs_n < cols)[None, :]
        row_offsets = offs_m.to(tl.int64)[:, None]
        tl.store(H + row_offsets * stride_hm + offs_n[None, :], h, mask=inside)
        tl.store(G + row_offsets * stride_gm + offs_n[None, :], g, mask=inside)


@triton.jit
def _matmul_gelu_grad(GRAD, W, H, GRAD_H, stride_gradm, stride_wk, stride_hm, stride_grad_hm, rows, cols, depth,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """``dh = (dy @ W) * gelu'(h)``; dy ``[rows, depth]``, W (fc2's weight) ``[depth, cols]``, h ``[rows, cols]``.
    With USE_TMA, all four are 2-D tensor descriptors."""
    acc, m_start, n_start, offs_m, offs_n = _program_product(
        GRAD, W, stride_gradm, stride_wk, 1, rows, cols, depth, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K,
        DOT_PRECISION, False, USE_TMA)
    if USE_TMA:
        h = H.load([m_start, n_start]).to(tl.float32)
    else:
        inside = (offs_m < rows)[:, None] & (offs_n < cols)[None, :]
        h = tl.load(H + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :], mask=inside,
                    other=0.0).to(tl.float32)
    # d gelu / dh = Phi(h) + h * phi(h)
    slope = 0.5 * (1.0 + tl.erf(h * _SQRT_HALF)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    if USE_TMA:
        GRAD_H.store([m_start, n_start], (acc * slope).to(GRAD_H.dtype))
    else:
        tl.store(GRAD_H + offs_m.to(tl.int64)[:, None] * stride_grad_hm + offs_n[None, :],
                 (acc * slope).to(GRAD_H.dtype.element_ty), mask=inside)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_gemm(kernel, tensors, blocks, strides, rows, cols, depth, constexprs, dtype):
    """``blocks``: per tensor, the [rows, cols] block it is read or written in through a descriptor under a
    ``tma`` tile (in tile units: "mk", "nk", "kn" or "mn"), or None for a tensor that stays a pointer."""
    tile = GemmTile(*CONFIGS[dtype.itemsize])
    use_tma = tile.tma and tma_usable(*(t for t, block in zip(tensors, blocks) if block))
    if use_tma:
        size = {"m": tile.block_m, "n": tile.block_n, "k": tile.block_k}
        tensors = tuple(tensor_descriptor(t, [size[block[0]], size[block[1]]]) if block else t
                        for t, block in zip(tensors, blocks))
    launch(kernel, (cdiv(rows, tile.block_m) * cdiv(cols, tile.block_n),), tensors, (*strides, rows, cols, depth),
           dict(constexprs, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
                EVEN_K=depth % tile.block_k == 0, DOT_PRECISION=_precision(dtype), USE_TMA=use_tma),
           num_warps=tile.warps, num_stages=tile.stages)


def _hidden_fake(x, weight, bias):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@custom_op_when_compiling("triton_linear_gelu", "(Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor)",
                          _hidden_fake)
def linear_gelu(x, weight, bias):
    """``(h, gelu(h))`` with ``h = x @ weight^T (+ bias)``: x ``[rows, depth]`` and weight ``[cols, depth]`` of one
    dtype, both with unit stride along depth; two contiguous ``[rows, cols]`` tensors in that dtype."""
    rows, depth = x.shape
    cols = weight.shape[0]
    hidden, activated = x.new_empty(rows, cols), x.new_empty(rows, cols)
    if hidden.numel():
        _launch_gemm(_linear_gelu_fwd, (x, weight, weight if bias is None else bias, hidden, activated),
                     ("mk", "nk", None, "mn", "mn"),
                     (x.stride(0), weight.stride(0), hidden.stride(0), activated.stride(0)), rows, cols, depth,
                     dict(HAS_BIAS=bias is not None), x.dtype)
    return hidden, activated


@custom_op_when_compiling("triton_matmul_gelu_grad", "(Tensor grad, Tensor weight, Tensor hidden) -> Tensor",
                          lambda grad, weight, hidden: torch.empty_like(hidden))
def matmul_gelu_grad(grad, weight, hidden):
    """``(grad @ weight) * gelu'(hidden)``: grad ``[rows, depth]`` (the MLP output's gradient), weight ``[depth,
    cols]`` (fc2's), hidden ``[rows, cols]`` (fc1's output), one dtype, unit stride along the last dim."""
    rows, depth = grad.shape
    cols = weight.shape[1]
    grad_hidden = torch.empty_like(hidden)
    if grad_hidden.numel():
        _launch_gemm(_matmul_gelu_grad, (grad, weight, hidden, grad_hidden), ("mk", "kn", "mn", "mn"),
                     (grad.stride(0), weight.stride(0), hidden.stride(0), grad_hidden.stride(0)), rows, cols, depth,
                     {}, grad.dtype)
    return grad_hidden
