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
# rows_backward: samples per step and columns per program (the rest go to more programs, which keep fp32 sums in
# registers), and about how many programs it launches (each takes a group of samples: fewer groups, fewer partial
# sums to add)
BACKWARD_BLOCK_S, BACKWARD_BLOCK_D = 4, 128
BACKWARD_PROGRAMS = 2048
BACKWARD_WARPS, BACKWARD_STAGES = 8, 2


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


@triton.jit
def _rows_backward(
    GRAD, IDS, OUT, POS_PARTS, TOKEN_PARTS,
    stride_gb, stride_gt, stride_ib, stride_ob, stride_ot,
    batch, num_prefix, num_ids, num_kept, dim, samples_per_program,
    SCATTER: tl.constexpr, SUM_POS: tl.constexpr, SUM_TOKEN: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Both token backwards in one pass over the gradient, organised by the rows of the full-length side (the P
    prefix rows and the L patch rows, whose ids are ``IDS = ids_restore``): each program owns BLOCK_R of those rows
    and BLOCK_D columns, for ``samples_per_program`` samples, BLOCK_S at a time (a [BLOCK_S x BLOCK_R, BLOCK_D]
    tile: that many loads in flight per program; the sums over its samples are taken once, at the end).

    SCATTER (restore's backward): GRAD holds the full-length rows; kept ones (id < K) go to OUT row P + id, the
    others add to the mask token's gradient. Else (gather's backward): OUT holds the full-length rows, each read
    from GRAD row P + id if kept, zero if not. Either way the full-length rows summed over the samples are the
    positional embedding's gradient: per program in fp32, one partial per sample group (summed after)."""
    group = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_S * BLOCK_R)  # sample-major (sample, row) pairs, flat: a 2-D tile compiles leaner
    offset = lanes // BLOCK_R  # sample within the step
    rows = tl.program_id(1) * BLOCK_R + lanes % BLOCK_R
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    is_row = rows < num_prefix + num_ids
    is_prefix = rows < num_prefix
    in_dim = cols[None, :] < dim
    pos_sum = tl.zeros([BLOCK_S * BLOCK_R, BLOCK_D], tl.float32)  # per (sample offset, row); samples added last
    token_sum = tl.zeros([BLOCK_S * BLOCK_R, BLOCK_D], tl.float32)
    first = group.to(tl.int64) * samples_per_program
    for i in range(0, samples_per_program, BLOCK_S):  # scalar bounds: Triton 3.6's interpreter takes no tensor ones
        samples = first + i + offset
        live = is_row & (samples < batch)
        ids = tl.load(IDS + samples * stride_ib + (rows - num_prefix), mask=live & ~is_prefix, other=-1).to(tl.int64)
        moves = live & (is_prefix | ((ids >= 0) & (ids < num_kept)))  # rows with a row on the other side
        other = tl.where(is_prefix, rows, num_prefix + ids)
        if SCATTER:
            grad = tl.load(GRAD + samples[:, None] * stride_gb + rows[:, None] * stride_gt + cols[None, :],
                           mask=live[:, None] & in_dim, other=0.0).to(tl.float32)
            tl.store(OUT + samples[:, None] * stride_ob + other[:, None] * stride_ot + cols[None, :],
                     grad.to(OUT.dtype.element_ty), mask=moves[:, None] & in_dim)
            if SUM_TOKEN:  # a select, not a product with a 0/1 mask: inf or NaN on kept rows stays out
                token_sum += tl.where((live & ~moves)[:, None], grad, 0.0)
        else:
            grad = tl.load(GRAD + samples[:, None] * stride_gb + other[:, None] * stride_gt + cols[None, :],
                           mask=moves[:, None] & in_dim, other=0.0).to(tl.float32)
            tl.store(OUT + samples[:, None] * stride_ob + rows[:, None] * stride_ot + cols[None, :],
                     grad.to(OUT.dtype.element_ty), mask=live[:, None] & in_dim)
        if SUM_POS:
            pos_sum += grad
    if SUM_POS:
        full_rows = num_prefix + num_ids
        block_rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(POS_PARTS + (group.to(tl.int64) * full_rows + block_rows[:, None]) * dim + cols[None, :],
                 tl.sum(tl.reshape(pos_sum, [BLOCK_S, BLOCK_R, BLOCK_D]), 0),
                 mask=(block_rows < full_rows)[:, None] & in_dim)
    if SUM_TOKEN:
        part = group * tl.num_programs(1) + tl.program_id(1)
        tl.store(TOKEN_PARTS + part.to(tl.int64) * dim + cols, tl.sum(token_sum, 0), mask=cols < dim)


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


def _rows_backward_fake(grad, ids, num_prefix, num_kept, scatter, sum_pos, sum_token):
    batch, dim = grad.shape[0], grad.shape[2]
    full_rows = num_prefix + ids.shape[1]
    out = grad.new_empty(batch, num_prefix + num_kept if scatter else full_rows, dim)
    pos = grad.new_empty((full_rows, dim) if sum_pos else (0,), dtype=torch.float32)
    return out, pos, grad.new_empty(dim if sum_token else 0, dtype=torch.float32)


@custom_op_when_compiling(
    "triton_rows_backward",
    "(Tensor grad, Tensor ids, int num_prefix, int num_kept, bool scatter, bool sum_pos, bool sum_token) "
    "-> (Tensor, Tensor, Tensor)", _rows_backward_fake)
def rows_backward(grad, ids, num_prefix: int, num_kept: int, scatter: bool, sum_pos: bool, sum_token: bool):
    """The token ops' backwards in one pass (``tokens.FUSED_BACKWARD``; selectable until a GPU measures it):
    ``(grad_rows, pos_sum, token_sum)`` from ``ids [B, L]`` (``ids_restore``: < ``num_kept`` for kept rows).

    scatter=True, restore's backward: ``grad [B, P + L, D]`` -> the kept rows' gradient ``[B, P + K, D]`` (rows no id
    points to are left unwritten: ``ids`` must be a permutation, as random_masking gives) and the mask token's,
    the sum of the other rows (fp32 [D]). scatter=False, gather's backward: ``grad [B, P + K, D]`` -> ``[B, P + L,
    D]`` with zeros where nothing was kept. With ``sum_pos``, the full-length rows summed over the batch (fp32
    ``[P + L, D]``, the positional embedding's gradient). Sums not asked for come back empty. Unit stride in D."""
    out, pos, token = _rows_backward_fake(grad, ids, num_prefix, num_kept, scatter, sum_pos, sum_token)
    batch, full_rows, dim = grad.shape[0], num_prefix + ids.shape[1], grad.shape[2]
    if batch == 0 or full_rows == 0 or dim == 0:
        return out, pos.zero_(), token.zero_()
    block_d = min(BACKWARD_BLOCK_D, max(16, next_power_of_2(dim)))
    row_blocks, col_blocks = cdiv(full_rows, BLOCK_ROWS), cdiv(dim, block_d)
    samples_per_program = cdiv(batch, max(1, BACKWARD_PROGRAMS // (row_blocks * col_blocks)))
    samples_per_program = cdiv(samples_per_program, BACKWARD_BLOCK_S) * BACKWARD_BLOCK_S
    groups = cdiv(batch, samples_per_program)
    pos_parts = grad.new_empty(groups if sum_pos else 0, full_rows, dim, dtype=torch.float32)
    token_parts = grad.new_empty(groups * row_blocks if sum_token else 0, dim, dtype=torch.float32)
    launch(_rows_backward, (groups, row_blocks, col_blocks), (grad, ids, out, pos_parts, token_parts), (
        grad.stride(0), grad.stride(1), ids.stride(0), out.stride(0), out.stride(1),
        batch, num_prefix, ids.shape[1], num_kept, dim, samples_per_program,
    ), dict(SCATTER=scatter, SUM_POS=sum_pos, SUM_TOKEN=sum_token, BLOCK_S=BACKWARD_BLOCK_S, BLOCK_R=BLOCK_ROWS,
            BLOCK_D=block_d),
        num_warps=BACKWARD_WARPS, num_stages=BACKWARD_STAGES)
    if sum_pos:
        pos = pos_parts.sum(0)
    if sum_token:
        token = token_parts.sum(0)
    return out, pos, token
