"""Patch embedding as one Triton GEMM that reads the NCHW image in place (im2col on the fly).

    out[r, e] = sum_k A[r, k] * W[e, k] (+ bias[e]) (+ pos[patch(r), e]),  k = (c, i, j) as in Conv2d's weight

Row r is a patch: all patches of the batch, or only the kept ones (``ids``, MAE), so dropped patches
cost nothing. With a ``mask`` (BEiT, SimMIM: an fp32 value m per patch) row r becomes
``out * (1 - m) + token * m`` before the positional embedding is added. The backward's weight gradient is
the same kind of GEMM, reduced over rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._custom_ops import custom_op_when_compiling
from .launch import cdiv, launch

# By operand width in bytes; no config spills on sm_80 or sm_90 (benchmarks/kernel_report.py).
# forward: (block rows, block embed, block k, warps, stages)
FORWARD_CONFIGS = {2: (64, 64, 32, 4, 2), 4: (32, 64, 32, 4, 1)}
# weight gradient: (block embed, block k, block rows, warps, stages)
WEIGHT_GRAD_CONFIGS = {2: (64, 64, 32, 4, 2), 4: (32, 64, 32, 4, 1)}


@triton.jit
def _patch_rows(rows, total_rows, ids_ptr, stride_ib, rows_per_image, num_patches, HAS_IDS: tl.constexpr):
    """Image index, patch index (within the image) and validity of each row; ids outside [0, L) read nothing."""
    image = rows // rows_per_image
    slot = rows % rows_per_image
    valid = rows < total_rows
    if HAS_IDS:
        patch = tl.load(ids_ptr + image.to(tl.int64) * stride_ib + slot, mask=valid, other=0).to(tl.int32)
        valid = valid & (patch >= 0) & (patch < num_patches)
    else:
        patch = slot
    return image, patch, valid


@triton.jit
def _pixels(img_ptr, image, patch, ks, row_ok, stride_b, stride_c, stride_h, stride_w, patches_w, patch_size,
            k_total):
    """A [rows, k] tile of patch pixels in Conv2d weight order (c, i, j), read from the image in place."""
    channel = ks // (patch_size * patch_size)
    i = (ks // patch_size) % patch_size
    j = ks % patch_size
    top = (patch // patches_w) * patch_size
    left = (patch % patches_w) * patch_size
    ptrs = (img_ptr + image.to(tl.int64)[:, None] * stride_b + channel[None, :] * stride_c
            + (top[:, None] + i[None, :]) * stride_h + (left[:, None] + j[None, :]) * stride_w)
    return tl.load(ptrs, mask=row_ok[:, None] & (ks[None, :] < k_total), other=0.0)


@triton.jit
def _patch_embed_fwd(
    IMG, W, BIAS, POS, IDS, MASK, TOKEN, OUT,
    stride_b, stride_c, stride_h, stride_w, stride_we, stride_ib, stride_mb, stride_pl,
    total_rows, rows_per_image, num_patches, patches_w, patch_size, embed, k_total,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_IDS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    embeds = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    embed_ok = embeds < embed
    image, patch, row_ok = _patch_rows(rows, total_rows, IDS, stride_ib, rows_per_image, num_patches, HAS_IDS)
    acc = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.float32)
    for k_start in range(0, k_total, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        a = _pixels(IMG, image, patch, ks, row_ok, stride_b, stride_c, stride_h, stride_w, patches_w,
                    patch_size, k_total)
        w = tl.load(W + embeds[None, :] * stride_we + ks[:, None], mask=embed_ok[None, :] & (ks[:, None] < k_total),
                    other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + embeds, mask=embed_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_MASK:  # acc * (1 - m) + token * m; m = 0 and m = 1 select without a product (as the reference)
        m = tl.load(MASK + image.to(tl.int64) * stride_mb + patch, mask=row_ok, other=0.0)[:, None]
        token = tl.load(TOKEN + embeds, mask=embed_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(m == 0, acc, tl.where(m == 1, token, acc * (1 - m) + token * m))
    if HAS_POS:
        acc += tl.load(POS + patch[:, None] * stride_pl + embeds[None, :], mask=row_ok[:, None] & embed_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(OUT + rows.to(tl.int64)[:, None] * embed + embeds[None, :], acc.to(OUT.dtype.element_ty),
             mask=(rows < total_rows)[:, None] & embed_ok[None, :])


@triton.jit
def _patch_embed_weight_grad(
    IMG, GRAD, IDS, GRAD_W,
    stride_b, stride_c, stride_h, stride_w, stride_ib,
    total_rows, rows_per_image, num_patches, patches_w, patch_size, embed, k_total,
    HAS_IDS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """GRAD_W[e, k] = sum_r GRAD[r, e] * A[r, k], fp32; GRAD comes scaled by 1 - m on masked rows (0: the token)."""
    embeds = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    embed_ok = embeds < embed
    acc = tl.zeros([BLOCK_E, BLOCK_K], dtype=tl.float32)
    for r_start in range(0, total_rows, BLOCK_R):
        rows = r_start + tl.arange(0, BLOCK_R)
        image, patch, row_ok = _patch_rows(rows, total_rows, IDS, stride_ib, rows_per_image, num_patches, HAS_IDS)
        a = _pixels(IMG, image, patch, ks, row_ok, stride_b, stride_c, stride_h, stride_w, patches_w,
                    patch_size, k_total)
        g = tl.load(GRAD + rows.to(tl.int64)[None, :] * embed + embeds[:, None],
                    mask=row_ok[None, :] & embed_ok[:, None], other=0.0)
        acc = tl.dot(g, a.to(g.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(GRAD_W + embeds[:, None] * k_total + ks[None, :], acc,
             mask=embed_ok[:, None] & (ks[None, :] < k_total))


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward_fake(images, weight, bias, pos, ids, mask, token):
    patch_size = weight.shape[-1]
    rows = ids.shape[1] if ids is not None else (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
    return images.new_empty(images.shape[0], rows, weight.shape[0], dtype=weight.dtype)


@custom_op_when_compiling(
    "triton_patch_embed",
    "(Tensor images, Tensor weight, Tensor? bias, Tensor? pos, Tensor? ids, Tensor? mask, Tensor? token) -> Tensor",
    _forward_fake)
def forward(images, weight, bias, pos, ids, mask, token):
    """[B, rows, E] in weight's dtype; rows = kept patches with ``ids``, else all patches."""
    batch, _, height, width = images.shape
    embed, patch_size = weight.shape[0], weight.shape[-1]
    patches_w = width // patch_size
    num_patches = (height // patch_size) * patches_w
    rows_per_image = ids.shape[1] if ids is not None else num_patches
    w2 = weight.reshape(embed, -1)
    k_total = w2.shape[1]
    out = torch.empty(batch, rows_per_image, embed, dtype=weight.dtype, device=images.device)
    if out.numel() == 0:
        return out
    block_r, block_e, block_k, warps, stages = FORWARD_CONFIGS[weight.dtype.itemsize]
    total_rows = batch * rows_per_image
    dummy = w2
    launch(_patch_embed_fwd, (cdiv(total_rows, block_r), cdiv(embed, block_e)), (
        images, w2, dummy if bias is None else bias, dummy if pos is None else pos,
        dummy if ids is None else ids, dummy if mask is None else mask, dummy if token is None else token, out,
    ), (
        *images.stride(), w2.stride(0), 0 if ids is None else ids.stride(0), 0 if mask is None else mask.stride(0),
        0 if pos is None else pos.stride(1),
        total_rows, rows_per_image, num_patches, patches_w, patch_size, embed, k_total,
    ), dict(HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_IDS=ids is not None, HAS_MASK=mask is not None,
            BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_K=block_k, DOT_PRECISION=_precision(weight.dtype)),
        num_warps=warps, num_stages=stages)
    return out


@custom_op_when_compiling(
    "triton_patch_embed_weight_grad", "(Tensor images, Tensor grad, Tensor? ids, int[] weight_shape) -> Tensor",
    lambda images, grad, ids, weight_shape: images.new_empty(weight_shape, dtype=torch.float32))
def weight_grad(images, grad, ids, weight_shape):
    """d loss / d weight in fp32, shaped like the Conv2d weight; ``grad`` [B, rows, E] contiguous."""
    batch, _, height, width = images.shape
    embed, patch_size = weight_shape[0], weight_shape[-1]
    k_total = weight_shape[1] * patch_size * patch_size
    rows_per_image = grad.shape[1]
    grad_w = torch.empty(embed, k_total, dtype=torch.float32, device=images.device)
    block_e, block_k, block_r, warps, stages = WEIGHT_GRAD_CONFIGS[grad.dtype.itemsize]
    launch(_patch_embed_weight_grad, (cdiv(embed, block_e), cdiv(k_total, block_k)), (
        images, grad, grad if ids is None else ids, grad_w,
    ), (
        *images.stride(), 0 if ids is None else ids.stride(0),
        batch * rows_per_image, rows_per_image, (height // patch_size) * (width // patch_size), width // patch_size,
        patch_size, embed, k_total,
    ), dict(HAS_IDS=ids is not None, BLOCK_E=block_e, BLOCK_K=block_k, BLOCK_R=block_r,
            DOT_PRECISION=_precision(grad.dtype)), num_warps=warps, num_stages=stages)
    return grad_w.reshape(weight_shape)
