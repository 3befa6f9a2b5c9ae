"""The residual add of a pre-norm block fused with the LayerNorm after it: validation, backend choice, autograd."""
from __future__ import annotations

import contextlib

import torch

from .. import _backend, reference
from ._autograd import distinct, first_derivative_only
from ._checks import FLOAT_DTYPES, KERNEL_DTYPES, autocast_dtype, described, is_real

_kernels = None
if _backend._HAS_TRITON:
    from ..triton import norms as _kernels


def _promoted(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.result_type`` for two of KERNEL_DTYPES (any mix is float32), in plain Python that Dynamo traces."""
    return a if a == b else torch.float32


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, normed_dtype):
        total_dtype = _promoted(x.dtype, branch.dtype)
        total, normed, mean, rstd = _kernels.forward(x, branch, weight, bias, eps, total_dtype, normed_dtype)
        ctx.save_for_backward(total, weight, mean, rstd)
        ctx.dtypes = (x.dtype, branch.dtype, None if weight is None else weight.dtype,
                      None if bias is None else bias.dtype)
        return total, normed

    @staticmethod
    @first_derivative_only("add_layer_norm")
    def backward(ctx, grad_total, grad_normed):
        total, weight, mean, rstd = ctx.saved_tensors
        x_dtype, branch_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if grad_normed is None:  # only total was used: the add's gradient
            grad_normed = torch.zeros_like(total)
        # The gradient comes in total's (promoted) dtype; where x's dtype differs, or else the branch's (an fp32
        # stream with a 16-bit branch under autocast), the kernel also writes it in that dtype in the same pass.
        # The casts below are no-ops then (both differ only for mixed 16-bit inputs: one cast remains).
        other = x_dtype if x_dtype != total.dtype else branch_dtype
        grad, grad_other, grad_weight, grad_bias = _kernels.backward(
            grad_normed, grad_total, total, weight, mean, rstd, total.dtype, other if other != total.dtype else None)
        if other == total.dtype:
            grad_other = grad
        grad_x, grad_branch = (grad_other, grad) if x_dtype != total.dtype else (grad, grad_other)
        grad_weight = grad_weight.to(weight_dtype) if weight_dtype else None
        grad_bias = grad_bias.to(bias_dtype) if bias_dtype else None
        return grad_x.to(x_dtype), grad_branch.to(branch_dtype), grad_weight, grad_bias, None, None


def add_layer_norm(x, branch, weight=None, bias=None, *, eps=1e-5):
    """``total = x + branch`` and ``LayerNorm(total)`` over the last dim in one pass: a pre-norm transformer block's
    residual step (``x = x + attn(norm1(x)); y = norm2(x)``). Returns ``(total, normed)``.

    Args:
        x, branch: tensors of one shape and device (fp16, bf16, fp32; the residual stream and the branch output
            may differ in dtype, as under autocast: total has their promoted dtype, as ``x + branch`` would).
        weight, bias: the LayerNorm's affine parameters ``[width]`` (``norm.weight``, ``norm.bias``) or None.
        eps: added to the variance, as ``nn.LayerNorm``'s ``eps``.

    The norm is computed in fp32 (as autocast runs LayerNorm) and returned in total's dtype, or under autocast in
    autocast's dtype: what the next Linear would cast it to, so no cast kernel follows. Equal to
    ``total = x + branch; F.layer_norm(total.float(), ...).to(dtype)`` up to fp32 rounding (the reference:
    ``mimkernels.reference.add_layer_norm``). Gradients flow to x, branch, weight and bias.
    """
    for name, t in (("x", x), ("branch", branch)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if branch.shape != x.shape or branch.device != x.device:
        raise ValueError(f"branch {tuple(branch.shape)} on {branch.device} must match x {tuple(x.shape)} on "
                         f"{x.device}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    width = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (width,) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be None or a float tensor (float16, bfloat16, float32 or float64) of shape "
                             f"({width},), got {described(t)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not is_real(eps) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    autocast = autocast_dtype(x.device)
    normed_dtype = _promoted(x.dtype, branch.dtype) if autocast is None else autocast
    backend = _backend.select("add_layer_norm", x.device, implemented=("triton",))
    if backend == "torch":
        with contextlib.nullcontext() if autocast is None else torch.autocast(x.device.type, enabled=False):
            return reference.add_layer_norm(x, branch, weight, bias, eps=float(eps), out_dtype=normed_dtype)
    # the kernels read weight and bias with unit stride (an expanded or sliced one read other values)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    return _AddLayerNorm.apply(*distinct(x, branch, weight, bias), float(eps), normed_dtype)
