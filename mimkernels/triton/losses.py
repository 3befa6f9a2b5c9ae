"""MAE / SimMIM masked pixel loss in Triton: one program per patch (or group of patches), the image read in place.

The target patch is gathered straight from the NCHW image in MAE's (p, q, c) order and normalised
on the fly (mean, unbiased variance, eps 1e-6), so neither the patchified target nor the error tensor
is ever written. Patches whose mask weight is 0 read nothing. The backward recomputes the target and
writes d loss / d pred for every patch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._custom_ops import custom_op_when_compiling
from .launch import cdiv, launch, next_power_of_2


@triton.jit
def _patch_rows(MASK, rows, num_rows, num_patches, stride_mb):
    """The batch and patch index of each row (a row = one patch of one image, ``b * L + l``), and its mask weight
    (0 for rows past the end)."""
    inside = rows < num_rows
    batch = (rows // num_patches).to(tl.int64)
    patch = rows % num_patches
    weight = tl.load(MASK + batch * stride_mb + patch, mask=inside, other=0.0).to(tl.float32)
    return batch, patch, weight


@triton.jit
def _target_and_pred(IMG, PRED, batch, patch, weight, stride_ib, stride_ic, stride_ih, stride_iw, stride_pb,
                     stride_pl, patches_w, NORM_PIX: tl.constexpr, PATCH_SIZE: tl.constexpr,
                     CHANNELS: tl.constexpr, BLOCK: tl.constexpr):
    """The (normalised) targets and predictions of a group of patches as fp32 [GROUP, BLOCK] tiles, the lanes of
    each patch in MAE's (p, q, c) order; lanes past a patch, and patches of weight 0, hold 0 and read nothing.
    The patch size and channel count are constants, so the lane -> (row, column, channel) map costs no division
    at run time, and it is computed once for the whole group."""
    patch_numel: tl.constexpr = PATCH_SIZE * PATCH_SIZE * CHANNELS
    offs = tl.arange(0, BLOCK)[None, :]
    channel = offs % CHANNELS
    col = (offs // CHANNELS) % PATCH_SIZE
    row = offs // (CHANNELS * PATCH_SIZE)
    top = (patch // patches_w) * PATCH_SIZE
    left = (patch % patches_w) * PATCH_SIZE
    valid = (offs < patch_numel) & (weight != 0)[:, None]
    pixels = tl.load(IMG + batch[:, None] * stride_ib + channel * stride_ic + (top[:, None] + row) * stride_ih
                     + (left[:, None] + col) * stride_iw, mask=valid, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(pixels, 1) / patch_numel
        centred = tl.where(valid, pixels - mean[:, None], 0.0)
        variance = tl.sum(centred * centred, 1) / (patch_numel - 1)
        target = centred / tl.sqrt(variance + 1e-6)[:, None]
    else:
        target = pixels
    pred = tl.load(PRED + batch[:, None] * stride_pb + patch[:, None] * stride_pl + offs, mask=valid,
                   other=0.0).to(tl.float32)
    return target, pred


@triton.jit
def _masked_patch_loss_fwd(
    IMG, PRED, MASK, PATCH_LOSS,
    stride_ib, stride_ic, stride_ih, stride_iw, stride_pb, stride_pl, stride_mb,
    num_rows, num_patches, patches_w,
    NORM_PIX: tl.constexpr, L1: tl.constexpr, PATCH_SIZE: tl.constexpr, CHANNELS: tl.constexpr,
    BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    """PATCH_LOSS[b * L + l] = mask[b, l] * mean over the patch of the error, for GROUP patches per program."""
    rows = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    batch, patch, weight = _patch_rows(MASK, rows, num_rows, num_patches, stride_mb)
    target, pred = _target_and_pred(IMG, PRED, batch, patch, weight, stride_ib, stride_ic, stride_ih, stride_iw,
                                    stride_pb, stride_pl, patches_w, NORM_PIX, PATCH_SIZE, CHANNELS, BLOCK)
    diff = pred - target  # 0 on every lane that read nothing
    if L1:
        error = tl.abs(diff)
    else:
        error = diff * diff
    tl.store(PATCH_LOSS + rows, weight * tl.sum(error, 1) / (PATCH_SIZE * PATCH_SIZE * CHANNELS),
             mask=rows < num_rows)


@triton.jit
def _masked_patch_loss_bwd(
    IMG, PRED, MASK, SCALE, GRAD_PRED,
    stride_ib, stride_ic, stride_ih, stride_iw, stride_pb, stride_pl, stride_mb, stride_gb, stride_gl,
    num_rows, num_patches, patches_w,
    NORM_PIX: tl.constexpr, L1: tl.constexpr, PATCH_SIZE: tl.constexpr, CHANNELS: tl.constexpr,
    BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    """GRAD_PRED[b, l] = SCALE * mask[b, l] / P * d error / d pred (SCALE = d loss_out / sum(mask)), 0 where the
    weight is 0; GROUP patches per program."""
    rows = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    batch, patch, weight = _patch_rows(MASK, rows, num_rows, num_patches, stride_mb)
    target, pred = _target_and_pred(IMG, PRED, batch, patch, weight, stride_ib, stride_ic, stride_ih, stride_iw,
                                    stride_pb, stride_pl, patches_w, NORM_PIX, PATCH_SIZE, CHANNELS, BLOCK)
    diff = pred - target
    if L1:
        slope = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        slope = 2.0 * diff
    # where(), not a product with the weight: a NaN / inf upstream gradient (an fp16 overflow that GradScaler is
    # about to skip) leaves unscored patches at 0, as in the reference, whose gradient never reaches them
    scale = tl.where(weight != 0, tl.load(SCALE), 0.0)
    grad = slope * (scale * weight / (PATCH_SIZE * PATCH_SIZE * CHANNELS))[:, None]
    offs = tl.arange(0, BLOCK)[None, :]
    tl.store(GRAD_PRED + batch[:, None] * stride_gb + patch[:, None] * stride_gl + offs,
             grad.to(GRAD_PRED.dtype.element_ty), mask=(offs < PATCH_SIZE * PATCH_SIZE * CHANNELS)
             & (rows < num_rows)[:, None])


# Patches per program of both loss kernels. 1: one program per patch, the geometry measured on the H200 (run 1;
# 0.65x the official loss forward at patch 14, a tenth of the copy rate at patch 16). Larger groups give each
# program more bytes in flight and share its index arithmetic; selectable (bench_patch_embed's
# "mimkernels_grouped" provider) until a GPU has measured them.
PATCHES_PER_PROGRAM = 1


def launch_config(patch_size: int, channels: int, group: int | None = None) -> tuple[dict, int, int]:
    """(tile constexprs, num_warps, num_stages) of both loss kernels for patches of ``patch_size`` x
    ``patch_size`` x ``channels`` values: ``group`` (default :data:`PATCHES_PER_PROGRAM`) patches per program,
    each whole in one block. The kernel report compiles exactly this."""
    group = PATCHES_PER_PROGRAM if group is None else group
    if group < 1 or group & (group - 1):
        raise ValueError(f"patches per program must be a power of 2, got {group}")
    block = next_power_of_2(patch_size * patch_size * channels)
    num_warps = 4 if group * block <= 2048 else 8
    return {"PATCH_SIZE": patch_size, "CHANNELS": channels, "BLOCK": block, "GROUP": group}, num_warps, 3


def _args(pred, images, mask, patch_size):
    batch, num_patches, _ = pred.shape
    return (*images.stride(), pred.stride(0), pred.stride(1), mask.stride(0)), (
        batch * num_patches, num_patches, images.shape[3] // patch_size)


@custom_op_when_compiling(
    "triton_masked_patch_loss",
    "(Tensor pred, Tensor images, Tensor mask, int patch_size, bool norm_pix, bool l1) -> Tensor",
    lambda pred, *rest: pred.new_empty(pred.shape[0] * pred.shape[1], dtype=torch.float32))
def masked_patch_loss(pred, images, mask, patch_size: int, norm_pix: bool, l1: bool) -> torch.Tensor:
    """The weighted sum of per-patch mean errors, fp32 [B * L] per patch (summed by the caller)."""
    batch, num_patches, _ = pred.shape
    patch_loss = torch.empty(batch * num_patches, dtype=torch.float32, device=pred.device)
    strides, sizes = _args(pred, images, mask, patch_size)
    tile, num_warps, num_stages = launch_config(patch_size, images.shape[1])
    launch(_masked_patch_loss_fwd, (cdiv(batch * num_patches, tile["GROUP"]),), (images, pred, mask, patch_loss),
           (*strides, *sizes), dict(NORM_PIX=norm_pix, L1=l1, **tile), num_warps=num_warps, num_stages=num_stages)
    return patch_loss


@custom_op_when_compiling(
    "triton_masked_patch_loss_backward",
    "(Tensor pred, Tensor images, Tensor mask, Tensor scale, int patch_size, bool norm_pix, bool l1) -> Tensor",
    lambda pred, *rest: pred.new_empty(pred.shape))
def masked_patch_loss_backward(pred, images, mask, scale, patch_size: int, norm_pix: bool, l1: bool):
    """d loss / d pred, [B, L, P] in pred's dtype; ``scale`` is a 1-element fp32 tensor (no host sync)."""
    batch, num_patches, patch_numel = pred.shape
    grad_pred = torch.empty(batch, num_patches, patch_numel, dtype=pred.dtype, device=pred.device)
    strides, sizes = _args(pred, images, mask, patch_size)
    tile, num_warps, num_stages = launch_config(patch_size, images.shape[1])
    launch(_masked_patch_loss_bwd, (cdiv(batch * num_patches, tile["GROUP"]),),
           (images, pred, mask, scale, grad_pred), (*strides, grad_pred.stride(0), grad_pred.stride(1), *sizes),
           dict(NORM_PIX=norm_pix, L1=l1, **tile), num_warps=num_warps, num_stages=num_stages)
    return grad_pred
