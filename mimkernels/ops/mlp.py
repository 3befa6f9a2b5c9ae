"""A transformer's MLP with its GELU inside the GEMMs: validation, backend choice, autograd."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, reference
from ._autograd import first_derivative_only
from ._checks import KERNEL_DTYPES, autocast_dtype, unit_stride

_kernels = None
if _backend._HAS_TRITON:
    from ..triton import mlp as _kernels


class _GeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        rows = x.reshape(-1, x.shape[-1])
        hidden, activated = _kernels.linear_gelu(unit_stride(rows), unit_stride(fc1_weight), fc1_bias)
        out = F.linear(activated, fc2_weight, fc2_bias)
        ctx.save_for_backward(rows, fc1_weight, fc2_weight, hidden, activated)
        ctx.shape = x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @first_derivative_only("gelu_mlp")
    def backward(ctx, grad_out):
        rows, fc1_weight, fc2_weight, hidden, activated = ctx.saved_tensors
        grad = unit_stride(grad_out.reshape(-1, grad_out.shape[-1]))
        needs = ctx.needs_input_grad
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if any(needs[:3]):
            grad_hidden = _kernels.matmul_gelu_grad(grad, unit_stride(fc2_weight), hidden)
            if needs[0]:
                grad_x = (grad_hidden @ fc1_weight).reshape(ctx.shape)
            if needs[1]:
                grad_w1 = grad_hidden.t() @ rows
            if needs[2]:
                grad_b1 = grad_hidden.sum(0)  # accumulated in fp32 inside, as Linear's backward
        if needs[3]:
            grad_w2 = grad.t() @ activated
        if needs[4]:
            grad_b2 = grad.sum(0)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def _check_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    for name, t in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [out_features, in_features], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    hidden, width = fc1_weight.shape
    if width != x.shape[-1]:
        raise ValueError(f"fc1_weight {tuple(fc1_weight.shape)} expects {width} input features, x has {x.shape[-1]}")
    if fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight {tuple(fc2_weight.shape)} expects {fc2_weight.shape[1]} input features, fc1 "
                         f"gives {hidden}")
    for name, t, size in (("fc1_bias", fc1_bias, hidden), ("fc2_bias", fc2_bias, fc2_weight.shape[0])):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,)):
            raise ValueError(f"{name} must be None or a tensor of shape ({size},), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    for name, t in (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight),
                    ("fc2_bias", fc2_bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if autocast_dtype(x.device) is None and t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; outside autocast all must share one dtype "
                            "(as F.linear)")


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """A transformer's MLP, ``fc2(gelu(fc1(x)))`` with exact (erf) GELU, with the GELU done inside the GEMMs:
    fc1's writes the activation beside its output, and in the backward the fc2 input-gradient GEMM applies
    GELU's derivative before writing, so no GELU pass reads or writes the hidden activations of its own.

    Args:
        x: ``[..., in_features]`` fp16, bf16 or fp32 (any strides).
        fc1_weight, fc1_bias: ``[hidden, in_features]`` and ``[hidden]`` or None (``mlp.fc1.weight`` / ``.bias``).
        fc2_weight, fc2_bias: ``[out_features, hidden]`` and ``[out_features]`` or None.

    All of one dtype, or any float dtypes under ``torch.autocast`` (computed in autocast's dtype, as ``F.linear``
    would). Returns ``[..., out_features]``; equal to
    ``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)`` (the reference,
    ``mimkernels.reference.gelu_mlp``) up to the rounding of the hidden activations, which are stored in the
    compute dtype as the unfused ops store them. Differentiable in every tensor.
    """
    _check_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    backend = _backend.select("gelu_mlp", x.device, implemented=("triton",))
    if backend == "torch":
        return reference.gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = tensors
    return _GeluMlp.apply(x, fc1_weight, None if fc1_bias is None else fc1_bias.contiguous(), fc2_weight, fc2_bias)
