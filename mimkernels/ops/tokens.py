"""MAE token dropping (random_masking, gather_tokens) and restoring (restore_tokens).

Validation, backend choice and autograd. The kernels behind the ``triton`` and ``cuda`` backends are
two row-copy primitives (mimkernels/triton/tokens.py, csrc/tokens*.{cpp,cu}); each op's backward is the
other primitive run the opposite way, organised by output row: no atomics, no zero-fill, no expanded
index tensor.

float64 tokens take the PyTorch reference on every backend (the kernels compute in fp32), so they move exactly.

Index contract: ``ids_keep`` holds distinct patch indices in [0, L) per row, ``ids_restore`` is a
permutation of [0, L) per row (what random_masking returns). On CPU tensors every op checks this and
raises IndexError / ValueError; on CUDA tensors the check costs a host sync, so it runs only when
``MIMKERNELS_CHECK_INDICES=1`` is set before mimkernels is imported. Unchecked out-of-range ids never
read or write out of bounds (gathered rows come out zero, restored rows take the mask token); repeated
ids give an undefined gradient.
"""
from __future__ import annotations

import operator

import torch

from .. import _backend, reference
from ..reference import Masking
from ._autograd import first_derivative_only
from ._checks import (
    FLOAT_DTYPES,
    check_distinct_indices,
    check_float_tensor,
    check_index_tensor,
    described,
    is_int,
    is_real,
    unit_stride,
)

# Both kernel modules offer gather_rows(x, ids, pos, P) and restore_rows(x, ids, token, pos, P).
_KERNELS = {}
if _backend._HAS_TRITON:
    from ..triton import tokens as _triton_kernels

    _KERNELS["triton"] = _triton_kernels
if _backend._HAS_EXTENSION:
    from .. import extension as _extension_kernels

    _KERNELS["extension"] = _extension_kernels


# ----------------------------------------------------------------------------- validation


def _check_tokens(name, x):
    check_float_tensor(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [batch, tokens, dim], got shape {tuple(x.shape)}")


def _check_prefix_count(num_prefix_tokens, tokens, name):
    if not is_int(num_prefix_tokens):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if not 0 <= num_prefix_tokens <= tokens:
        raise ValueError(f"num_prefix_tokens must lie in [0, {tokens}] ({name} has {tokens} tokens), "
                         f"got {num_prefix_tokens}")
    return int(num_prefix_tokens)


def _check_embedding(name, t, rows, dim, x):
    """pos_embed [1, rows, D] or mask_token with D elements ([1, 1, D] or [D]); rows None for mask_token."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    check_float_tensor(name, t)
    if rows is None and t.numel() != dim:
        raise ValueError(f"{name} must hold {dim} values (the token width), got shape {tuple(t.shape)}")
    if rows is not None and tuple(t.shape) != (1, rows, dim):
        raise ValueError(f"{name} must have shape (1, {rows}, {dim}), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the tokens are on {x.device}")
    return unit_stride(t)


# ----------------------------------------------------------------------------- autograd

# Each backward in one pass of the Triton kernel rows_backward (the positional embedding's and the mask token's
# gradients summed in it): restore's backward reads the output gradient once where the two-primitive path reads it
# four times (the kept rows' gather, the token's fill and sum, the sum over the batch), gather's backward writes
# the input gradient once and does not read it back. Selectable, off until a GPU measures it faster (bench_tokens'
# mimkernels_fused_bwd); used where the op runs on the Triton backend.
FUSED_BACKWARD = False


def _fused_backward(backend) -> bool:
    return FUSED_BACKWARD and backend == "triton"


def _inverse(ids, length, fill):
    """inverse[b, ids[b, k]] = k, and ``fill`` where no k points: the map from source rows back to outputs."""
    inverse = ids.new_full((ids.shape[0], length), fill)
    positions = torch.arange(ids.shape[1], device=ids.device, dtype=ids.dtype).expand_as(ids)
    return inverse.scatter_(1, ids.long(), positions)


def place_rows(rows, ids, length, backend="triton", *, num_prefix=0, inverse=None):
    """Rows ``[B, P + K, D]`` put back where ``ids [B, K]`` took them from: ``[B, P + length, D]``, zeros where no
    id points, the P prefix rows copied. The adjoint of gathering rows ``ids`` (how gathered rows' gradients reach
    their sources), in one pass of the restore kernel with a zero mask token. ``inverse`` is ids' inverse map
    (``ids_restore``) where the caller has it; ``backend`` a key of the token kernels ("triton", "extension")."""
    if inverse is None:
        inverse = _inverse(ids, length, fill=ids.shape[1])
    zero_token = rows.new_zeros(rows.shape[-1])
    return _KERNELS[backend].restore_rows(rows.contiguous(), inverse, zero_token, None, num_prefix)


class _GatherRows(torch.autograd.Function):
    """out = gather_rows(x, ids, pos, P); ``inverse`` (ids_restore when the caller has it) drives the backward."""

    @staticmethod
    def forward(ctx, x, ids, pos, num_prefix, inverse, backend):
        ctx.save_for_backward(ids, inverse)
        ctx.num_prefix, ctx.num_src, ctx.backend = num_prefix, x.shape[1], backend
        ctx.pos_dtype = None if pos is None else pos.dtype
        return _KERNELS[backend].gather_rows(x, ids, pos, num_prefix)

    @staticmethod
    @first_derivative_only("gather_tokens")
    def backward(ctx, grad_out):
        ids, inverse = ctx.saved_tensors
        grad_pos = None
        if _fused_backward(ctx.backend):
            if inverse is None:
                inverse = _inverse(ids, ctx.num_src - ctx.num_prefix, fill=ids.shape[1])
            grad_x, pos_sum, _ = _triton_kernels.rows_backward(
                grad_out.contiguous(), inverse, ctx.num_prefix, ids.shape[1], False, ctx.needs_input_grad[2], False)
            if ctx.needs_input_grad[2]:
                grad_pos = pos_sum.unsqueeze(0).to(ctx.pos_dtype)
            return grad_x, None, grad_pos, None, None, None
        grad_x = place_rows(grad_out, ids, ctx.num_src - ctx.num_prefix, ctx.backend, num_prefix=ctx.num_prefix,
                            inverse=inverse)
        if ctx.needs_input_grad[2]:
            grad_pos = grad_x.sum(0, keepdim=True, dtype=torch.float32).to(ctx.pos_dtype)
        return grad_x, None, grad_pos, None, None, None


class _RestoreRows(torch.autograd.Function):
    """out = restore_rows(x_kept, ids_restore, mask_token, pos, P)."""

    @staticmethod
    def forward(ctx, x_kept, ids_restore, mask_token, pos, num_prefix, backend):
        ctx.save_for_backward(ids_restore)
        ctx.num_prefix, ctx.num_kept, ctx.backend = num_prefix, x_kept.shape[1] - num_prefix, backend
        ctx.token_shape, ctx.token_dtype = mask_token.shape, mask_token.dtype
        ctx.pos_dtype = None if pos is None else pos.dtype
        return _KERNELS[backend].restore_rows(x_kept, ids_restore, mask_token.reshape(-1), pos, num_prefix)

    @staticmethod
    @first_derivative_only("restore_tokens")
    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_token = grad_pos = None
        if _fused_backward(ctx.backend):
            grad_x, pos_sum, token_sum = _triton_kernels.rows_backward(
                grad_out, ids_restore, ctx.num_prefix, ctx.num_kept, True, ctx.needs_input_grad[3],
                ctx.needs_input_grad[2])
            if ctx.needs_input_grad[2]:
                grad_token = token_sum.to(ctx.token_dtype).reshape(ctx.token_shape)
            if ctx.needs_input_grad[3]:
                grad_pos = pos_sum.unsqueeze(0).to(ctx.pos_dtype)
            return grad_x if ctx.needs_input_grad[0] else None, None, grad_token, grad_pos, None, None
        if ctx.needs_input_grad[0]:
            ids_keep = _inverse(ids_restore, ids_restore.shape[1], fill=0)[:, :ctx.num_kept]
            grad_x = _KERNELS[ctx.backend].gather_rows(grad_out, ids_keep, None, ctx.num_prefix)
        if ctx.needs_input_grad[2]:
            # the rows that took the token, by a fill, not a product with a 0/1 mask: a NaN / inf upstream on a kept
            # row stays out of it (0 * inf), as in the reference, whose kept rows never read the token
            kept = (ids_restore < ctx.num_kept).unsqueeze(-1)
            grad_token = grad_out[:, ctx.num_prefix:].masked_fill(kept, 0).sum((0, 1), dtype=torch.float32)
            grad_token = grad_token.to(ctx.token_dtype).reshape(ctx.token_shape)
        if ctx.needs_input_grad[3]:
            grad_pos = grad_out.sum(0, keepdim=True, dtype=torch.float32).to(ctx.pos_dtype)
        return grad_x, None, grad_token, grad_pos, None, None


def _backend_for(op, x):
    """"extension" or "triton" (a key of _KERNELS) for ``x``, or None for the PyTorch reference: also for float64
    tokens on every backend, which the kernels would move through fp32 (Triton rounded each value to fp32, the
    extension each value it adds a position to); float64 is for references and numerics checks, not for speed."""
    backend = _backend.select(op, x.device, implemented=("extension", "triton"))
    return None if backend == "torch" or x.dtype == torch.float64 else backend


# ----------------------------------------------------------------------------- public ops


def random_masking(x, mask_ratio, *, noise=None, num_prefix_tokens=0, pos_embed=None) -> Masking:
    """Official MAE random masking: keep the ``K = int(L * (1 - mask_ratio))`` patches of smallest noise.

    Args:
        x: ``[B, P + L, D]`` tokens; the ``P = num_prefix_tokens`` leading ones (cls) pass through unmasked.
        mask_ratio: fraction of patches removed, in [0, 1), leaving at least one patch.
        noise: ``[B, L]`` floats ranking the patches (default ``torch.rand``); the same noise gives
            bit-for-bit the official ``x_masked``, ``mask`` and ``ids_restore``.
        pos_embed: optional ``[1, P + L, D]``, added to the kept rows in the same pass (MAE adds it to
            every token before masking: the same values, with one rounding instead of two).

    Returns:
        ``Masking(x_kept [B, P + K, D], mask [B, L] float32 (1 = removed), ids_restore [B, L], ids_keep [B, K])``.
        Differentiable in x and pos_embed.
    """
    _check_tokens("x", x)
    num_prefix = _check_prefix_count(num_prefix_tokens, x.shape[1], "x")
    pos_embed = _check_embedding("pos_embed", pos_embed, x.shape[1], x.shape[2], x)
    batch, num_patches = x.shape[0], x.shape[1] - num_prefix
    num_kept = kept_count(mask_ratio, num_patches)
    noise = checked_noise(noise, batch, num_patches, x.device)
    backend = _backend_for("random_masking", x)
    if backend is None:
        return reference.random_masking(x, mask_ratio, noise=noise, num_prefix_tokens=num_prefix,
                                         pos_embed=pos_embed)
    mask, ids_restore, ids_keep = _masking_indices(noise, num_kept)
    x = unit_stride(x)
    x_kept = _GatherRows.apply(x, ids_keep, pos_embed, num_prefix, ids_restore, backend)
    return Masking(x_kept, mask, ids_restore, ids_keep)


def masking_indices(noise, mask_ratio):
    """The index half of :func:`random_masking`, for code that gathers the kept patches itself (e.g.
    ``patch_embed(..., ids_keep=ids_keep)`` computes only those). Keeps the ``K = int(L * (1 - mask_ratio))``
    patches of smallest noise, exactly as random_masking does with the same noise.

    Args:
        noise: ``[B, L]`` floating-point tensor ranking the patches (e.g. ``torch.rand(B, L)``).
        mask_ratio: fraction of patches removed, in [0, 1), leaving at least one patch.

    Returns:
        ``(mask [B, L] float32 (1 = removed), ids_restore [B, L] int64, ids_keep [B, K] int64)``.
    """
    if not isinstance(noise, torch.Tensor) or noise.dtype not in FLOAT_DTYPES or noise.dim() != 2:
        raise TypeError(f"noise must be a 2-D floating-point tensor [batch, patches], got {described(noise)}")
    return _masking_indices(noise, kept_count(mask_ratio, noise.shape[1]))


def kept_count(mask_ratio, num_patches):
    """Patches MAE's random masking keeps, ``int(L * (1 - mask_ratio))``; ValueError for a bad ratio or none kept."""
    if not is_real(mask_ratio) or not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    # operator.index: under torch.compile a mask_ratio that changed between calls arrives as a symbolic float, and
    # a size derived from it crashed Dynamo where it reached an autograd.Function ("Source of TruncToInt(...) is
    # None"); this specialises the count instead (one graph per ratio, recompiled on a new one). Eager: a no-op.
    num_kept = operator.index(int(num_patches * (1 - mask_ratio)))
    if num_kept < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of {num_patches}")
    return num_kept


def checked_noise(noise, batch, num_patches, device):
    """``noise`` after checking it is a floating-point ``[batch, num_patches]`` tensor on ``device``; a fresh
    ``torch.rand`` draw (the official code's) when None. For the models, whose noise must match their patch count."""
    if noise is None:
        return torch.rand(batch, num_patches, device=device)
    if not isinstance(noise, torch.Tensor) or noise.dtype not in FLOAT_DTYPES:
        raise TypeError(f"noise must be a floating-point tensor [batch, patches] or None, got {described(noise)}")
    if tuple(noise.shape) != (batch, num_patches) or noise.device != device:
        raise ValueError(f"noise must have shape ({batch}, {num_patches}) on {device}, "
                         f"got {tuple(noise.shape)} on {noise.device}")
    return noise


def _masking_indices(noise, num_kept):
    # argsort keeps its input's strides: a column-major noise gave ids whose rows the kernels, which read ids with
    # unit stride, took for other rows (silently wrong tokens); the contiguous copy makes every id tensor row-major
    ids_shuffle = torch.argsort(noise.contiguous(), dim=1)
    ids_restore = _inverse(ids_shuffle, noise.shape[1], fill=0)  # the inverse permutation: argsort(ids_shuffle)
    mask = (ids_restore >= num_kept).to(torch.float32)
    return mask, ids_restore, ids_shuffle[:, :num_kept]


def gather_tokens(x, ids_keep, *, pos_embed=None):
    """``x[b, ids_keep[b]] (+ pos_embed[0, ids_keep[b]])`` in one pass.

    x ``[B, L, D]``, ids_keep ``[B, K]`` (int32/int64, distinct per row), pos_embed ``[1, L, D]`` or None
    (added in fp32, or float64 for float64 x, and cast to x's dtype). Differentiable in x and pos_embed.
    """
    _check_tokens("x", x)
    ids_keep = check_index_tensor("ids_keep", ids_keep, x.shape[0], x.device)
    pos_embed = _check_embedding("pos_embed", pos_embed, x.shape[1], x.shape[2], x)
    check_distinct_indices("ids_keep", ids_keep, x.shape[1])
    backend = _backend_for("gather_tokens", x)
    if backend is None:
        return reference.gather_tokens(x, ids_keep, pos_embed=pos_embed)
    x = unit_stride(x)
    return _GatherRows.apply(x, ids_keep, pos_embed, 0, None, backend)


def restore_tokens(x_kept, ids_restore, mask_token, *, pos_embed=None, num_prefix_tokens=0):
    """MAE decoder input: the kept tokens unshuffled back to their places, mask tokens elsewhere.

    x_kept ``[B, P + K, D]`` (P prefix rows first), ids_restore ``[B, L]`` (a permutation per row: row l
    takes kept token ``ids_restore[b, l]`` if it is < K, else the mask token), mask_token with D values,
    pos_embed ``[1, P + L, D]`` or None. Returns ``[B, P + L, D]`` in x_kept's dtype. Differentiable in
    x_kept, mask_token and pos_embed.
    """
    _check_tokens("x_kept", x_kept)
    batch, rows, dim = x_kept.shape
    ids_restore = check_index_tensor("ids_restore", ids_restore, batch, x_kept.device)
    num_prefix = _check_prefix_count(num_prefix_tokens, rows, "x_kept")
    num_patches = ids_restore.shape[1]
    if rows - num_prefix > num_patches:
        raise ValueError(f"x_kept has {rows - num_prefix} patch tokens but ids_restore only {num_patches} places")
    if not isinstance(mask_token, torch.Tensor):
        raise TypeError(f"mask_token must be a torch.Tensor, got {type(mask_token).__name__}")
    mask_token = _check_embedding("mask_token", mask_token, None, dim, x_kept)
    pos_embed = _check_embedding("pos_embed", pos_embed, num_prefix + num_patches, dim, x_kept)
    check_distinct_indices("ids_restore", ids_restore, num_patches, permutation=True)
    backend = _backend_for("restore_tokens", x_kept)
    if backend is None:
        return reference.restore_tokens(x_kept, ids_restore, mask_token, pos_embed=pos_embed,
                                        num_prefix_tokens=num_prefix)
    x_kept = unit_stride(x_kept)
    return _RestoreRows.apply(x_kept, ids_restore, mask_token, pos_embed, num_prefix, backend)
