"""A pre-norm block's residual add fused with the next LayerNorm, in Triton.

Forward, one program per row: ``total = x + branch`` (rounded to total's dtype, as the unfused add stores it),
``normed = LayerNorm(total)`` in fp32, stored in the dtype the next layer wants (under autocast, the bf16 that
its Linear would cast to): one read of x and branch, one write of total and normed, where the unfused ops read
total back for the norm and again for autocast's cast. The per-row mean and 1/std are saved for the backward.

Backward, one program per group of rows: ``d total = d total_from_above + LayerNorm'(d normed)`` written once
(the gradient of both x and branch), and the weight and bias gradients summed over the group's rows in fp32
registers, written as one partial row per program and summed by the caller: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._custom_ops import custom_op_when_compiling
from .launch import cdiv, launch, next_power_of_2

BACKWARD_PROGRAMS = 256  # row groups of the backward (and partial weight-gradient rows); enough to fill a GPU


@triton.jit
def _add_layer_norm_fwd(X, BRANCH, WEIGHT, BIAS, TOTAL, NORMED, MEAN, RSTD, stride_x, stride_branch, stride_total,
                        stride_normed, width, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < width
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    branch = tl.load(BRANCH + row * stride_branch + cols, mask=valid, other=0.0).to(tl.float32)
    total = (x + branch).to(TOTAL.dtype.element_ty)
    tl.store(TOTAL + row * stride_total + cols, total, mask=valid)
    total = total.to(tl.float32)  # the norm reads the stored (rounded) sum, as the unfused ops do
    mean = tl.sum(total, 0) / width
    centred = tl.where(valid, total - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / width + eps)
    normed = centred * rstd
    if HAS_WEIGHT:
        normed = normed * tl.load(WEIGHT + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        normed = normed + tl.load(BIAS + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(NORMED + row * stride_normed + cols, normed.to(NORMED.dtype.element_ty), mask=valid)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_layer_norm_bwd(GRAD_NORMED, GRAD_TOTAL, TOTAL, WEIGHT, MEAN, RSTD, GRAD_X, GRAD_BRANCH, WEIGHT_PARTS,
                        BIAS_PARTS, stride_grad_normed, stride_grad_total, stride_total, stride_grad_x,
                        stride_grad_branch, rows, width, rows_per_program, HAS_GRAD_TOTAL: tl.constexpr,
                        HAS_WEIGHT: tl.constexpr, HAS_GRAD_BRANCH: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < width
    if HAS_WEIGHT:
        weight = tl.load(WEIGHT + cols, mask=valid, other=0.0).to(tl.float32)
    else:
        weight = tl.full((BLOCK,), 1.0, tl.float32)
    weight_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    bias_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = program.to(tl.int64) * rows_per_program + i
        live = valid & (row < rows)
        mean = tl.load(MEAN + row, mask=row < rows, other=0.0)
        rstd = tl.load(RSTD + row, mask=row < rows, other=0.0)
        total = tl.load(TOTAL + row * stride_total + cols, mask=live, other=0.0).to(tl.float32)
        x_hat = tl.where(live, (total - mean) * rstd, 0.0)
        grad_normed = tl.load(GRAD_NORMED + row * stride_grad_normed + cols, mask=live, other=0.0).to(tl.float32)
        weighted = grad_normed * weight
        # d x_hat -> d total: rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = weighted
        grad_x = rstd * (weighted - tl.sum(weighted, 0) / width - x_hat * (tl.sum(weighted * x_hat, 0) / width))
        if HAS_GRAD_TOTAL:
            grad_x += tl.load(GRAD_TOTAL + row * stride_grad_total + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(GRAD_X + row * stride_grad_x + cols, grad_x.to(GRAD_X.dtype.element_ty), mask=live)
        if HAS_GRAD_BRANCH:  # the same gradient in the branch's dtype: no cast pass after the kernel
            tl.store(GRAD_BRANCH + row * stride_grad_branch + cols, grad_x.to(GRAD_BRANCH.dtype.element_ty), mask=live)
        weight_grad += grad_normed * x_hat
        bias_grad += grad_normed
    tl.store(WEIGHT_PARTS + program * width + cols, weight_grad, mask=valid)
    tl.store(BIAS_PARTS + program * width + cols, bias_grad, mask=valid)


def launch_config(width: int) -> tuple[dict, int, int]:
    """(tile constexprs, num_warps, num_stages) of both kernels for rows of ``width`` values: the whole row in one
    block; warps grow with the row so each thread holds at most 16 fp32 values. The kernel report compiles this."""
    block = next_power_of_2(width)
    return {"BLOCK": block}, max(1, min(16, block // 512)), 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, width] with a unit last stride (a view where the layout allows, else a copy)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward_fake(x, branch, weight, bias, eps, total_dtype, normed_dtype):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=total_dtype), x.new_empty(x.shape, dtype=normed_dtype), stats,
            torch.empty_like(stats))


@custom_op_when_compiling(
    "add_layer_norm_forward",
    "(Tensor x, Tensor branch, Tensor? weight, Tensor? bias, float eps, ScalarType total_dtype, "
    "ScalarType normed_dtype) -> (Tensor, Tensor, Tensor, Tensor)",
    _forward_fake)
def forward(x, branch, weight, bias, eps: float, total_dtype, normed_dtype):
    """(total, normed, mean, rstd): total and normed shaped like x, mean and 1/std fp32 per row."""
    width = x.shape[-1]
    total, normed, mean, rstd = _forward_fake(x, branch, weight, bias, eps, total_dtype, normed_dtype)
    rows = mean.numel()
    if rows == 0:
        return total, normed, mean, rstd
    x2, branch2, total2, normed2 = _rows(x), _rows(branch), total.view(rows, width), normed.view(rows, width)
    tile, num_warps, num_stages = launch_config(width)
    launch(_add_layer_norm_fwd, (rows,), (x2, branch2, x2 if weight is None else weight, x2 if bias is None else bias,
                                          total2, normed2, mean, rstd), (
        x2.stride(0), branch2.stride(0), total2.stride(0), normed2.stride(0), width, eps,
    ), dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **tile), num_warps=num_warps,
        num_stages=num_stages)
    return total, normed, mean, rstd


def _backward_fake(grad_normed, grad_total, total, weight, mean, rstd, grad_dtype, branch_grad_dtype=None):
    width = total.shape[-1]
    parts = total.new_empty(width, dtype=torch.float32)
    grad_branch = total.new_empty(total.shape if branch_grad_dtype else (0,), dtype=branch_grad_dtype or grad_dtype)
    return total.new_empty(total.shape, dtype=grad_dtype), grad_branch, parts, torch.empty_like(parts)


@custom_op_when_compiling(
    "add_layer_norm_backward",
    "(Tensor grad_normed, Tensor? grad_total, Tensor total, Tensor? weight, Tensor mean, Tensor rstd, "
    "ScalarType grad_dtype, ScalarType? branch_grad_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)",
    _backward_fake)
def backward(grad_normed, grad_total, total, weight, mean, rstd, grad_dtype, branch_grad_dtype=None):
    """(d total, d branch, d weight, d bias): d total in ``grad_dtype`` shaped like total (the gradient of x, and of
    the branch where ``branch_grad_dtype`` is None); with ``branch_grad_dtype``, d branch is the same gradient
    rounded to that dtype in the same pass (under autocast: the 16-bit branch of an fp32 residual stream), else an
    empty placeholder. The weight and bias gradients fp32 [width] (zero without a weight / bias to use them)."""
    width, rows = total.shape[-1], mean.numel()
    grad_x, grad_branch, _, _ = _backward_fake(grad_normed, grad_total, total, weight, mean, rstd, grad_dtype,
                                               branch_grad_dtype)
    if rows == 0:
        zeros = total.new_zeros(width, dtype=torch.float32)
        return grad_x, grad_branch, zeros, zeros.clone()
    programs = min(rows, BACKWARD_PROGRAMS)
    rows_per_program = cdiv(rows, programs)
    programs = cdiv(rows, rows_per_program)
    weight_parts = total.new_empty(programs, width, dtype=torch.float32)
    bias_parts = torch.empty_like(weight_parts)
    grad_normed2, total2 = _rows(grad_normed), _rows(total)
    grad_total2 = total2 if grad_total is None else _rows(grad_total)
    grad_x2 = grad_x.view(rows, width)
    grad_branch2 = grad_branch.view(rows, width) if branch_grad_dtype else grad_x2  # never written without it
    tile, num_warps, num_stages = launch_config(width)
    launch(_add_layer_norm_bwd, (programs,), (grad_normed2, grad_total2, total2, total2 if weight is None else weight,
                                              mean, rstd, grad_x2, grad_branch2, weight_parts, bias_parts), (
        grad_normed2.stride(0), grad_total2.stride(0), total2.stride(0), grad_x2.stride(0), grad_branch2.stride(0),
        rows, width, rows_per_program,
    ), dict(HAS_GRAD_TOTAL=grad_total is not None, HAS_WEIGHT=weight is not None,
            HAS_GRAD_BRANCH=branch_grad_dtype is not None, **tile), num_warps=num_warps, num_stages=num_stages)
    return grad_x, grad_branch, weight_parts.sum(0), bias_parts.sum(0)
