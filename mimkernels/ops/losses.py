"""Masked pixel reconstruction loss (MAE, SimMIM): validation, backend choice, autograd."""
from __future__ import annotations

import torch

from .. import _backend, reference
from ._autograd import first_derivative_only
from ._checks import check_bool, check_float_tensor, check_images, check_mask_values, patch_side, unit_stride

_kernels = None
if _backend._HAS_TRITON:
    from ..triton import losses as _kernels


class _MaskedPatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, images, mask, patch_size, norm_pix, l1):
        patch_loss = _kernels.masked_patch_loss(pred, images, mask, patch_size, norm_pix, l1)
        denominator = reference.mask_denominator(mask)
        ctx.save_for_backward(pred, images, mask, denominator)
        ctx.args = patch_size, norm_pix, l1
        return patch_loss.sum() / denominator

    @staticmethod
    @first_derivative_only("masked_patch_loss")
    def backward(ctx, grad_loss):
        pred, images, mask, denominator = ctx.saved_tensors
        scale = (grad_loss.float() / denominator).reshape(1)
        grad_pred = _kernels.masked_patch_loss_backward(pred, images, mask, scale, *ctx.args)
        grad_images = _target_gradient(pred, images, mask, scale, *ctx.args) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_images, None, None, None, None


def _target_gradient(pred, images, mask, scale, patch_size, norm_pix, l1):
    """The loss's gradient in ``images`` (which only a caller asking for it pays for; PyTorch ops, fp32): the error's
    gradient in its target is minus its gradient in ``pred``, taken back through each patch's normalisation (an
    unbiased variance) and patchify. Unscored patches get 0 and are not read, as in the forward."""
    scored = (mask != 0)[..., None]
    target = torch.where(scored, reference.patchify(images, patch_size).float(), 0)
    if norm_pix:
        std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        target = (target - target.mean(dim=-1, keepdim=True)) / std
    error = torch.where(scored, pred.float(), 0) - target
    weight = (mask * scale / pred.shape[-1])[..., None]
    grad_target = -weight * (error.sign() if l1 else 2 * error)
    if norm_pix:  # d target_i / d x_k = (delta_ik - 1/n) / std - target_i * target_k / ((n - 1) * std)
        along_target = (grad_target * target).sum(dim=-1, keepdim=True) / (pred.shape[-1] - 1)
        grad_target = (grad_target - grad_target.mean(dim=-1, keepdim=True) - target * along_target) / std
    height, width = images.shape[2] // patch_size, images.shape[3] // patch_size
    return reference.unpatchify(grad_target, patch_size, height, width).to(images.dtype)


def masked_patch_loss(pred, images, mask, *, norm_pix=True, loss="l2"):
    """Official MAE ``forward_loss`` in one pass: the error of ``pred`` against the patchified images,
    averaged over each patch, then over the patches where ``mask`` is 1.

    Args:
        pred: ``[B, L, p * p * C]`` predictions in MAE's patch order (the patch size is read from it).
        images: ``[B, C, H, W]`` with ``L = (H / p) * (W / p)``; the target, differentiable as in the official
            code (its gradient, computed only when ``images`` requires grad, is PyTorch ops, not a kernel).
        mask: ``[B, L]``, 1 for patches to score (MAE: removed ones); other values weight the patches. Not
            differentiated: a mask that requires grad while grad mode is on is refused (ValueError).
        norm_pix: normalise each target patch by its mean and unbiased variance (eps 1e-6), as MAE.
        loss: ``"l2"`` (MAE) or ``"l1"`` (SimMIM's masked L1, without its 1e-5 in the denominator).

    Returns:
        fp32 scalar, differentiable in pred and images: the weighted sum divided by the sum of the weights,
        whatever their sign (as the official code). Weights summing to 0 divide by 1: a mask of all zeros gives 0
        and a zero gradient (the official code would divide 0 by 0). Patches of weight 0 are never read: non-finite
        predictions or pixels there leave the loss and the gradient finite (the official code's ``0 * nan`` is NaN).
    """
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3:
        raise ValueError(f"pred must be a 3-D float tensor [batch, patches, p * p * C], got "
                         f"{getattr(pred, 'shape', type(pred).__name__)}")
    check_float_tensor("pred", pred)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor [batch, channels, height, width], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    batch, num_patches, patch_numel = pred.shape
    channels = images.shape[1]
    patch_size = patch_side(patch_numel, channels)
    if patch_size < 1:
        raise ValueError(f"pred rows hold {patch_numel} values, not p * p * C for C = {channels} channels")
    check_images(images, patch_size)
    if images.shape[0] != batch or images.device != pred.device:
        raise ValueError(f"images {tuple(images.shape)} on {images.device} do not match pred {tuple(pred.shape)} "
                         f"on {pred.device}")
    patches = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
    if patches != num_patches:
        raise ValueError(f"images hold {patches} patches of size {patch_size}, pred has {num_patches}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, num_patches) or mask.device != pred.device:
        raise ValueError(f"mask must be a tensor of shape ({batch}, {num_patches}) on {pred.device}")
    check_mask_values("mask", mask)
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss must be 'l2' or 'l1', got {loss!r}")
    check_bool("norm_pix", norm_pix)
    if norm_pix and patch_numel < 2:
        raise ValueError("norm_pix needs at least 2 values per patch (unbiased variance)")
    if mask.requires_grad and torch.is_grad_enabled():
        # Its gradient at a weight-0 patch would need that patch's error, which is never computed (not even read).
        raise ValueError("mask must not require grad: masked_patch_loss does not differentiate in the mask weights "
                         "(pass mask.detach())")
    mask = mask.to(torch.float32)
    backend = _backend.select("masked_patch_loss", pred.device, implemented=("triton",))
    if backend == "torch":
        return reference.masked_patch_loss(pred, images, mask, norm_pix=norm_pix, loss=loss).float()
    pred = unit_stride(pred)
    return _MaskedPatchLoss.apply(pred, images, mask.contiguous(), patch_size, norm_pix, loss == "l1")
