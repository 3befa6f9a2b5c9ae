"""MAE / SimMIM masked pixel loss in Triton: one program per patch, the image read in place.

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
from .launch import launch, next_power_of_2


@triton.jit
def _target_and_pred(IMG, PRED, batch, patch, offs, stride_ib, stride_ic, stride_ih, stride_iw, stride_pb,
                     stride_pl, patches_w, patch_size, channels, patch_numel, NORM_PIX: tl.constexpr):
    """This patch's (normalised) target and prediction as fp32 vectors; lanes past the patch hold 0."""
    valid = offs < patch_numel
    channel = offs % channels
    col = (offs // channels) % patch_size
    row = offs // (channels * patch_size)
    top = (patch // patches_w) * patch_size
    left = (patch % patches_w) * patch_size
    pixels = tl.load(IMG + batch * stride_ib + channel * stride_ic + (top + row) * stride_ih
                     + (left + col) * stride_iw, mask=valid, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(pixels, 0) / patch_numel
        centred = tl.where(valid, pixels - mean, 0.0)
        variance = tl.sum(centred * centred, 0) / (patch_numel - 1)
        target = centred / tl.sqrt(variance + 1e-6)
    else:
        target = pixels
    pred = tl.load(PRED + batch * stride_pb + patch * stride_pl + offs, mask=valid, other=0.0).to(tl.float32)
    return target, pred


@triton.jit
def _masked_patch_loss_fwd(
    IMG, PRED, MASK, PATCH_LOSS,
    stride_ib, stride_ic, stride_ih, stride_iw, stride_pb, stride_pl, stride_mb,
    num_patches, patches_w, patch_size, channels, patch_numel,
    NORM_PIX: tl.constexpr, L1: tl.constexpr, BLOCK: tl.constexpr,
):
    """PATCH_LOSS[b * L + l] = mask[b, l] * mean over the patch of the error."""
    pid = tl.program_id(0)
    batch = (pid // num_patches).to(tl.int64)
    patch = pid % num_patches
    weight = tl.load(MASK + batch * stride_mb + patch).to(tl.float32)
    weighted = weight * 0.0
    if weight != 0:
        offs = tl.arange(0, BLOCK)
        target, pred = _target_and_pred(IMG, PRED, batch, patch, offs, stride_ib, stride_ic, stride_ih, stride_iw,
                                        stride_pb, stride_pl, patches_w, patch_size, channels, patch_numel,
                                        NORM_PIX)
        diff = pred - target
        if L1:
            error = tl.abs(diff)
        else:
            error = diff * diff
        weighted = weight * tl.sum(error, 0) / patch_numel
    tl.store(PATCH_LOSS + pid, weighted)


@triton.jit
def _masked_patch_loss_bwd(
    IMG, PRED, MASK, SCALE, GRAD_PRED,
    stride_ib, stride_ic, stride_ih, stride_iw, stride_pb, stride_pl, stride_mb, stride_gb, stride_gl,
    num_patches, patches_w, patch_size, channels, patch_numel,
    NORM_PIX: tl.constexpr, L1: tl.constexpr, BLOCK: tl.constexpr,
):
    """GRAD_PRED[b, l] = SCALE * mask[b, l] / P * d error / d pred (SCALE = d loss_out / sum(mask))."""
    pid = tl.program_id(0)
    batch = (pid // num_patches).to(tl.int64)
    patch = pid % num_patches
    offs = tl.arange(0, BLOCK)
    weight = tl.load(MASK + batch * stride_mb + patch).to(tl.float32)
    grad = tl.zeros([BLOCK], dtype=tl.float32)
    if weight != 0:
        target, pred = _target_and_pred(IMG, PRED, batch, patch, offs, stride_ib, stride_ic, stride_ih, stride_iw,
                                        stride_pb, stride_pl, patches_w, patch_size, channels, patch_numel,
                                        NORM_PIX)
        diff = pred - target
        if L1:
            slope = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        else:
            slope = 2.0 * diff
        grad = slope * (tl.load(SCALE) * weight / patch_numel)
    tl.store(GRAD_PRED + batch * stride_gb + patch * stride_gl + offs, grad.to(GRAD_PRED.dtype.element_ty),
             mask=offs < patch_numel)


def launch_config(patch_numel: int) -> tuple[dict, int, int]:
    """(tile constexprs, num_warps, num_stages) of both loss kernels for patches of ``patch_numel`` values: one
    program per patch, the whole patch in one block. The kernel report compiles exactly this."""
    return {"BLOCK": next_power_of_2(patch_numel)}, 4, 3


def _args(pred, images, mask, patch_size):
    batch, num_patches, patch_numel = pred.shape
    return (*images.stride(), pred.stride(0), pred.stride(1), mask.stride(0)), dict(
        num_patches=num_patches, patches_w=images.shape[3] // patch_size, patch_size=patch_size,
        channels=images.shape[1], patch_numel=patch_numel)


@custom_op_when_compiling(
    "triton_masked_patch_loss",
    "(Tensor pred, Tensor images, Tensor mask, int patch_size, bool norm_pix, bool l1) -> Tensor",
    lambda pred, *rest: pred.new_empty(pred.shape[0] * pred.shape[1], dtype=torch.float32))
def masked_patch_loss(pred, images, mask, patch_size: int, norm_pix: bool, l1: bool) -> torch.Tensor:
    """The weighted sum of per-patch mean errors, fp32 [B * L] per patch (summed by the caller)."""
    batch, num_patches, patch_numel = pred.shape
    patch_loss = torch.empty(batch * num_patches, dtype=torch.float32, device=pred.device)
    strides, sizes = _args(pred, images, mask, patch_size)
    tile, num_warps, num_stages = launch_config(patch_numel)
    launch(_masked_patch_loss_fwd, (batch * num_patches,), (images, pred, mask, patch_loss), (
        *strides, *sizes.values()), dict(NORM_PIX=norm_pix, L1=l1, **tile), num_warps=num_warps,
        num_stages=num_stages)
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
    tile, num_warps, num_stages = launch_config(patch_numel)
    launch(_masked_patch_loss_bwd, (batch * num_patches,), (images, pred, mask, scale, grad_pred), (
        *strides, grad_pred.stride(0), grad_pred.stride(1), *sizes.values(),
    ), dict(NORM_PIX=norm_pix, L1=l1, **tile), num_warps=num_warps, num_stages=num_stages)
    return grad_pred
