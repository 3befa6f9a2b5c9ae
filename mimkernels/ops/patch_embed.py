"""Patch embedding (one GEMM over the image read in place) and MAE's patchify / unpatchify."""
from __future__ import annotations

import torch

from .. import _backend, reference
from . import tokens
from ._autograd import first_derivative_only
from ._checks import (
    KERNEL_DTYPES,
    autocast_dtype,
    check_distinct_indices,
    check_float_tensor,
    check_images,
    check_index_tensor,
    check_mask_values,
    is_int,
)

_kernels = None
if _backend._HAS_TRITON:
    from ..triton import patch_embed as _kernels


def _check_patch_size(patch_size):
    if not is_int(patch_size) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    return int(patch_size)


def patchify(images, patch_size):
    """MAE order: images ``[B, C, H, W]`` -> ``[B, (H/p) * (W/p), p * p * C]``, (p, q, c) inside a patch."""
    patch_size = _check_patch_size(patch_size)
    check_images(images, patch_size)
    return reference.patchify(images, patch_size)


def unpatchify(x, patch_size, height, width):
    """Inverse of :func:`patchify`: ``[B, height * width, p * p * C]`` -> ``[B, C, height * p, width * p]``."""
    patch_size = _check_patch_size(patch_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [batch, patches, p * p * C], got {getattr(x, 'shape', x)!r}")
    for name, value in (("height", height), ("width", width)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} (in patches) must be a positive int, got {value!r}")
    if x.shape[1] != height * width:
        hint = ""
        rows, cols = height // patch_size, width // patch_size
        if height % patch_size == 0 and width % patch_size == 0 and rows * cols == x.shape[1]:
            hint = f" (height and width count patches: for a {height}x{width} image pass {rows}, {cols})"
        raise ValueError(f"x has {x.shape[1]} patches, but height * width = {height * width}{hint}")
    if x.shape[2] % (patch_size * patch_size):
        raise ValueError(f"x rows hold {x.shape[2]} values, not a multiple of patch_size**2 = {patch_size**2}")
    return reference.unpatchify(x, patch_size, height, width)


# ----------------------------------------------------------------------------- patch_embed

class _PatchEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, weight, bias, pos_embed, mask_token, ids_keep, mask):
        out = _kernels.forward(images, weight, bias, pos_embed, ids_keep, mask, mask_token)
        ctx.save_for_backward(images, weight, ids_keep, mask)
        ctx.dtypes = [None if t is None else t.dtype for t in (bias, pos_embed, mask_token)]
        ctx.pos_rows = None if pos_embed is None else pos_embed.shape[1]
        ctx.token_shape = None if mask_token is None else mask_token.shape
        return out

    @staticmethod
    @first_derivative_only("patch_embed")
    def backward(ctx, grad_out):
        images, weight, ids_keep, mask = ctx.saved_tensors
        grad = grad_out.contiguous()
        grad_images = grad_weight = grad_bias = grad_pos = grad_token = None
        bias_dtype, pos_dtype, token_dtype = ctx.dtypes
        if ctx.needs_input_grad[3]:  # pos_embed is added after the mask token: every row reaches it
            if ids_keep is None:
                summed = grad.sum(0, dtype=torch.float32)
            else:  # kept rows back in their places (zeros elsewhere), then summed: deterministic, no atomics
                placed = tokens.place_rows(grad, ids_keep, ctx.pos_rows)
                summed = placed.sum(0, dtype=torch.float32)
            grad_pos = summed.to(pos_dtype).unsqueeze(0)
        if mask is not None:  # out = conv * (1 - m) + token * m per row, m = 0 and m = 1 by a select (as the forward)
            m = mask.unsqueeze(-1)
            if ctx.needs_input_grad[4]:  # kept rows left out by the select: a NaN / inf upstream there stays out
                # masked_fill_ on the fresh product, not torch.where: one fp32 [B, L, E] temporary instead of two
                grad_token = (grad * m).masked_fill_(m == 0, 0).sum((0, 1), dtype=torch.float32)
                grad_token = grad_token.to(token_dtype).reshape(ctx.token_shape)
            grad = (grad * (1 - m)).masked_fill_(m == 1, 0).to(grad.dtype)  # rows that took the token: no conv grad
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 1), dtype=torch.float32).to(bias_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _kernels.weight_grad(images, grad, ids_keep, weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_images = _image_grad(grad, weight, ids_keep, images)
        return grad_images, grad_weight, grad_bias, grad_pos, grad_token, None, None


def _image_grad(grad, weight, ids_keep, images):
    """d loss / d images: each patch's pixel gradient (grad @ W) put back in place; dropped patches get 0."""
    batch, channels, height, width = images.shape
    patch = weight.shape[-1]
    pixel_grad = grad @ weight.reshape(weight.shape[0], -1).to(grad.dtype)  # [B, rows, C * p * p]
    if ids_keep is not None:
        full = pixel_grad.new_zeros(batch, (height // patch) * (width // patch), pixel_grad.shape[-1])
        pixel_grad = full.scatter_(1, ids_keep.long().unsqueeze(-1).expand_as(pixel_grad), pixel_grad)
    pixel_grad = pixel_grad.reshape(batch, height // patch, width // patch, channels, patch, patch)
    return pixel_grad.permute(0, 3, 1, 4, 2, 5).reshape(images.shape).to(images.dtype)


def _checked_patch_embed_args(images, weight, bias, pos_embed, ids_keep, mask, mask_token):
    """Raises on any bad argument of :func:`patch_embed`, naming it; returns ids_keep with unit stride (or None)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be [E, C, p, p] (Conv2d layout), got {getattr(weight, 'shape', weight)!r}")
    patch_size = weight.shape[-1]
    check_images(images, patch_size)
    embed, channels = weight.shape[:2]
    if images.shape[1] != channels:
        raise ValueError(f"images have {images.shape[1]} channels, weight expects {channels}")
    if weight.dtype not in KERNEL_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    num_patches = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (embed,)):
        raise ValueError(f"bias must have shape ({embed},), got {getattr(bias, 'shape', bias)!r}")
    if pos_embed is not None and (not isinstance(pos_embed, torch.Tensor)
                                  or tuple(pos_embed.shape) != (1, num_patches, embed)):
        raise ValueError(f"pos_embed must have shape (1, {num_patches}, {embed}), "
                         f"got {getattr(pos_embed, 'shape', pos_embed)!r}")
    if ids_keep is not None and mask is not None:
        raise ValueError("pass ids_keep (MAE) or mask with mask_token (BEiT, SimMIM), not both")
    if (mask is None) != (mask_token is None):
        raise ValueError("mask and mask_token go together")
    if mask_token is not None and not isinstance(mask_token, torch.Tensor):
        raise TypeError(f"mask_token must be a torch.Tensor, got {type(mask_token).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed), ("mask_token", mask_token)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{name} is on {t.device} but images are on {images.device}")
    for name, t in (("bias", bias), ("pos_embed", pos_embed), ("mask_token", mask_token)):
        if t is not None:
            check_float_tensor(name, t)
    if ids_keep is not None:
        ids_keep = check_index_tensor("ids_keep", ids_keep, images.shape[0], images.device)
        check_distinct_indices("ids_keep", ids_keep, num_patches)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (images.shape[0], num_patches):
            raise ValueError(f"mask must have shape ({images.shape[0]}, {num_patches}), "
                             f"got {getattr(mask, 'shape', mask)!r}")
        if mask.device != images.device:
            raise ValueError(f"mask is on {mask.device} but images are on {images.device}")
        check_mask_values("mask", mask)
        if not isinstance(mask_token, torch.Tensor) or mask_token.numel() != embed:
            raise ValueError(f"mask_token must hold {embed} values, got {getattr(mask_token, 'shape', mask_token)!r}")
    return ids_keep


def patch_embed(images, weight, bias=None, *, pos_embed=None, ids_keep=None, mask=None, mask_token=None):
    """Patch embedding ``conv2d(images, weight, bias, stride=p).flatten(2).transpose(1, 2) (+ pos_embed)``
    as one GEMM that reads the image in place.

    Args:
        images: ``[B, C, H, W]``, H and W multiples of p (non-square is fine).
        weight: ``[E, C, p, p]`` (Conv2d layout: timm / MAE checkpoints load unchanged), float16, bfloat16 or
            float32 on every backend; bias ``[E]``. images, bias, pos_embed and mask_token: those or float64.
        pos_embed: ``[1, L, E]`` for the L patches (pass ``pos_embed[:, 1:]`` when it holds a cls row).
        ids_keep: ``[B, K]`` (MAE): compute only these patches; returns ``[B, K, E]``. The kernels never read the
            other patches, so a NaN or inf there reaches no output or gradient (the ``torch`` backend convolves
            every patch, as the official MAE code does, and its weight gradient carries it: 0 * inf).
        mask, mask_token: ``[B, L]`` (bool, integer or float) and E values (BEiT, SimMIM): each patch becomes
            ``x * (1 - m) + mask_token * m`` (m its mask value) before pos_embed is added, as the official
            SimMIM and BEiT code blend it: 1 (True) is the token, 0 the patch, anything between a mix. Not
            together with ids_keep.

    Returns ``[B, L or K, E]`` in weight's dtype (autocast's under ``torch.autocast``), computed with fp32
    accumulation. Differentiable in images, weight, bias, pos_embed and mask_token.
    """
    ids_keep = _checked_patch_embed_args(images, weight, bias, pos_embed, ids_keep, mask, mask_token)
    dtype = autocast_dtype(images.device)
    if dtype is not None:
        weight = weight.to(dtype)
    backend = _backend.select("patch_embed", images.device, implemented=("triton",))
    if backend == "torch":
        return reference.patch_embed(images, weight, bias, pos_embed=pos_embed, ids_keep=ids_keep, mask=mask,
                                     mask_token=mask_token)
    contiguous = [None if t is None else t.contiguous() for t in (weight, bias, pos_embed, mask_token)]
    mask = None if mask is None else mask.to(torch.float32).contiguous()  # the kernel blends in fp32
    return _PatchEmbed.apply(images, *contiguous, ids_keep, mask)
