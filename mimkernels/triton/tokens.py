"""MAE token gather and restore in Triton: one pass over the rows, ids read once per row.

Two row-copy primitives serve every token op and its backward:

- ``gather_rows``: ``out[b, r] = x[b, r]`` for the P prefix rows, then ``out[b, P + k] = x[b, P + ids[b, k]]``,
  plus ``pos[0, <same source row>]`` when a positional embedding is given.
- ``restore_rows``: ``out[b, r] = x[b, r]`` for the P prefix rows, then ``out[b, P + l] = x[b, P + ids[b, l]]``
  if ``ids[b, l] < K`` else ``token``, plus ``pos[0, <output row>]`` when given.

No expanded index tensor: each program reads its rows' ids once and copies whole rows. Ids outside
[0, L) never read or write outside the tensors: gathered rows come out zero, restored rows take the token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._custom_ops import custom_op_when_compiling
from .launch import cdiv, launch, next_power_of_2

BLOCK_ROWS = 8
MAX_BLOCK_D = 1024  # wider rows are copied in chunks


@triton.jit
def _program_rows(IDS, stride_ib, num_prefix, num_ids, BLOCK_R: tl.constexpr):
    """This program's sample and output rows, which of them exist and are prefix rows, and their ids."""
    batch = tl.program_id(0).to(tl.int64)  # on axis 0, which takes 2^31 - 1 programs (axis 1: 65535)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    is_row = rows < num_prefix + num_ids
    is_prefix = rows < num_prefix
    ids = tl.load(IDS + batch * stride_ib + (rows - num_prefix), mask=is_row & ~is_prefix, other=0).to(tl.int64)
    return batch, rows, is_row, is_prefix, ids


@triton.jit
def _gather_rows(
    X, IDS, POS, OUT,
    stride_xb, stride_xt, stride_ib, stride_pt, stride_ob, stride_ot,
    num_prefix, num_ids, num_src, dim,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch, rows, is_row, is_prefix, ids = _program_rows(IDS, stride_ib, num_prefix, num_ids, BLOCK_R)
    src = tl.where(is_prefix, rows, num_prefix + ids)
    readable = is_row & (src >= 0) & (src < num_src)
    for d_start in range(0, dim, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        in_dim = cols[None, :] < dim
        values = tl.load(X + batch * stride_xb + src[:, None] * stride_xt + cols[None, :],
                         mask=readable[:, None] & in_dim, other=0.0).to(tl.float32)
        if HAS_POS:
            values += tl.load(POS + src[:, None] * stride_pt + cols[None, :], mask=readable[:, None] & in_dim,
                              other=0.0).to(tl.float32)
        tl.store(OUT + batch * stride_ob + rows[:, None] * stride_ot + cols[None, :],
                 values.to(OUT.dtype.element_ty), mask=is_row[:, None] & in_dim)


@triton.jit
def _restore_rows(
    X, IDS, TOKEN, POS, OUT,
    stride_xb, stride_xt, stride_ib, stride_pt, stride_ob, stride_ot,
    num_prefix, num_kept, num_ids, dim,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch, rows, is_row, is_prefix, ids = _program_rows(IDS, stride_ib, num_prefix, num_ids, BLOCK_R)
    from_x = is_row & (is_prefix | ((ids >= 0) & (ids < num_kept)))
    src = tl.where(is_prefix, rows, num_prefix + ids)
    for d_start in range(0, dim, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        in_dim = cols[None, :] < dim
        kept = tl.load(X + batch * stride_xb + src[:, None] * stride_xt + cols[None, :],
                       mask=from_x[:, None] & in_dim, other=0.0).to(tl.float32)
        token = tl.load(TOKEN + cols, mask=cols < dim, other=0.0).to(tl.float32)
        values = tl.where(from_x[:, None], kept, token[None, :])
        if HAS_POS:
            values += tl.load(POS + rows[:, None] * stride_pt + cols[None, :], mask=is_row[:, None] & in_dim,
                              other=0.0).to(tl.float32)
        tl.store(OUT + batch * stride_ob + rows[:, None] * stride_ot + cols[None, :],
                 values.to(OUT.dtype.element_ty), mask=is_row[:, None] & in_dim)


def launch_config(dim: int) -> tuple[dict, int, int]:
    """(tile constexprs, num_warps, num_stages) of both row-copy kernels for tokens of width ``dim``: BLOCK_ROWS
    rows per program, the width in chunks of at most MAX_BLOCK_D. The kernel report compiles exactly this."""
    return {"BLOCK_R": BLOCK_ROWS, "BLOCK_D": min(MAX_BLOCK_D, max(16, next_power_of_2(dim)))}, 4, 3


def _launch(kernel, x, ids, pos, num_prefix, pointers, sizes):
    """Run a row-copy kernel writing [B, P + ids.shape[1], D]; ``pointers`` go between IDS and POS."""
    batch, _, dim = x.shape
    out = x.new_empty(batch, num_prefix + ids.shape[1], dim)
    if out.numel() == 0:
        return out
    pos_arg = pos if pos is not None else x  # never read without HAS_POS
    tile, num_warps, num_stages = launch_config(dim)
    launch(kernel, (batch, cdiv(out.shape[1], tile["BLOCK_R"])), (x, ids, *pointers, pos_arg, out), (
        x.stride(0), x.stride(1), ids.stride(0), pos_arg.stride(-2), out.stride(0), out.stride(1),
        num_prefix, *sizes, dim,
    ), dict(HAS_POS=pos is not None, **tile), num_warps=num_warps, num_stages=num_stages)
    return out


def _rows_fake(x, ids, *rest):
    num_prefix = rest[-1]
    return x.new_empty(x.shape[0], num_prefix + ids.shape[1], x.shape[2])


@custom_op_when_compiling("triton_gather_rows", "(Tensor x, Tensor ids, Tensor? pos, int num_prefix) -> Tensor",
                          _rows_fake)
def gather_rows(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """x [B, P + L, D], ids [B, K] -> [B, P + K, D]; pos [1, P + L, D] or None. Unit stride in D and in ids."""
    return _launch(_gather_rows, x, ids, pos, num_prefix, (), (ids.shape[1], x.shape[1]))


@custom_op_when_compiling("triton_restore_rows",
                          "(Tensor x, Tensor ids, Tensor token, Tensor? pos, int num_prefix) -> Tensor", _rows_fake)
def restore_rows(x: torch.Tensor, ids: torch.Tensor, token: torch.Tensor, pos: torch.Tensor | None,
                 num_prefix: int) -> torch.Tensor:
    """x [B, P + K, D], ids [B, L], token [D] -> [B, P + L, D]; pos [1, P + L, D] or None."""
    return _launch(_restore_rows, x, ids, pos, num_prefix, (token,), (x.shape[1] - num_prefix, ids.shape[1]))
