"""What the ops' ``autograd.Function`` backwards share: they are first derivatives only, and say so.

A backward that runs kernels writes plain tensors. Asked for a graph of it (``create_graph=True``, e.g. for a
gradient penalty), it would return gradients that depend on nothing, and whatever is built on them would
differentiate to zero without a word. ``torch.autograd.function.once_differentiable`` does not close that: it
only looks at the incoming gradients, and a penalty's gradients reach back through the saved inputs instead.
:func:`first_derivative_only` ties the gradients to every saved tensor and incoming gradient that requires grad,
through a node whose backward raises, so differentiating them again fails loudly (and only then, as PyTorch's own
ops without a double backward do). The PyTorch backend (``mimkernels.use_backend("torch")``) has second
derivatives (for attention, through SDPA's math kernel).
"""
from __future__ import annotations

import functools

import torch


class _SecondDerivativeRaises(torch.autograd.Function):
    """The gradients (the tensors after the first ``num_sources``) unchanged, as views; their backward raises."""

    @staticmethod
    def forward(ctx, op: str, num_sources: int, *tensors):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[num_sources:])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"mimkernels.{ctx.op} has no second derivative: its backward runs kernels. For "
                           "higher-order gradients run it on the PyTorch backend, mimkernels.use_backend('torch') (its "
                           "attention is SDPA: with sdpa_kernel(SDPBackend.MATH))")


def first_derivative_only(op: str):
    """Decorates an ``autograd.Function.backward`` (below ``@staticmethod``): run as written without a graph (the
    usual case, no cost), and with one, return gradients whose own backward raises naming ``op``."""
    def wrap(backward):
        @functools.wraps(backward)
        def checked(ctx, *grad_outputs):
            if not torch.is_grad_enabled():  # no create_graph, and always while torch.compile traces a backward
                return backward(ctx, *grad_outputs)
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            sources = [t for t in (*ctx.saved_tensors, *grad_outputs)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            positions = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            if not sources or not positions:
                return grads
            tied = _SecondDerivativeRaises.apply(op, len(sources), *sources, *(grads[i] for i in positions))
            grads = list(grads)
            for i, g in zip(positions, tied):
                grads[i] = g
            return tuple(grads)

        return checked

    return wrap


def distinct(*tensors):
    """The tensors, each one that was passed before replaced by a view of itself. torch.compile cannot trace an
    ``autograd.Function`` that receives one tensor twice ("duplicate tensor input", e.g. ``attention(x, x, x)``);
    a view costs nothing and its gradient reaches the tensor as before. (``is``, not ``id()``: torch 2.11's Dynamo
    cannot trace ``id()`` of an intermediate tensor.)"""
    out = []
    for t in tensors:
        for earlier in out:
            if t is not None and t is earlier:
                t = t.view_as(t)
                break
        out.append(t)
    return out
