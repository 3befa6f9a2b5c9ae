"""SimMIM (Xie et al., CVPR'22) with a ViT encoder, on mimkernels' fused ops.

The method as the paper and microsoft/SimMIM define it for ViT: block-wise random masking (mask patches of
32 px, ratio 0.6), a learnable mask token in place of each masked patch's embedding, a full-attention ViT
encoder that sees every token, a one-layer linear prediction head to the raw pixels of each patch, and an L1
loss on the masked patches only. On the fused path the mask token replaces the masked patches inside the
patch-embedding GEMM's epilogue (with the positional embedding added in the same pass), and the loss reads the
target pixels from the image in place. A given mask with values between 0 and 1 blends patch and token, and
weights the loss, by the value, as the official code does.

Where this model differs from microsoft/SimMIM's ``VisionTransformerForSimMIM`` (said here, not hidden):

- positions are fixed 2-D sin-cos embeddings (as MAE's); the official ViT-B config uses a shared relative
  position bias and layer scale 0.1, which need an attention bias our kernels do not take;
- the prediction head is a ``Linear(embed_dim, p * p * 3)`` per patch in MAE's (p, q, c) pixel order; the
  official 1x1 convolution + PixelShuffle is the same map with its outputs in (c, p, q) order, so its weights
  load after a permutation, not as they are;
- the loss is the mean absolute error over the masked patches' pixels: the official code divides the same sum
  by ``(masked pixels + 1e-5) * 3``, a relative difference below 1e-5 / (masked pixels).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

import mimkernels

from ..ops._checks import check_bool, is_int
from .vit import MaskTokenViT, generator_kwargs


def check_mask_ratio(ratio) -> None:
    """Raise ValueError unless ``ratio`` is a number in (0, 1) (SimMIM masks some, not all, of its squares)."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise ValueError(f"mask ratio must lie in (0, 1), got {ratio!r}")


def block_mask(batch: int, grid: int, block: int, ratio: float, *, generator=None, device=None) -> torch.Tensor:
    """SimMIM's block-wise random mask: ``[batch, grid * grid]`` float, 1 = masked.

    The patch grid (``grid`` x ``grid``) is cut into squares of ``block`` x ``block`` patches (a 32 px mask
    patch is 2 x 2 patches of 16 px); ``ceil(ratio * squares)`` of them, chosen uniformly per sample, are
    masked whole, exactly as microsoft/SimMIM's ``MaskGenerator``.
    """
    if not isinstance(block, int) or isinstance(block, bool) or block < 1 or grid % block:
        raise ValueError(f"block must be a positive int dividing the patch grid {grid}, got {block!r}")
    check_mask_ratio(ratio)
    side = grid // block
    squares = side * side
    count = math.ceil(squares * ratio)
    ranks = torch.rand(batch, squares, device=device, **generator_kwargs(generator)).argsort(1).argsort(1)
    masked = (ranks < count).float().view(batch, side, side)
    return masked.repeat_interleave(block, 1).repeat_interleave(block, 2).reshape(batch, grid * grid)


class SimMIM(MaskTokenViT):
    """ViT encoder + linear pixel head, pre-trained by masked-patch L1 regression."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, norm_layer=nn.LayerNorm, mask_patch_size=32, mask_ratio=0.6, norm_pix_loss=False):
        check_bool("norm_pix_loss", norm_pix_loss)  # here: the loss op's error came at the first forward
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_layer)
        patch_size = self.patch_embed.patch_size  # checked there (an int, or timm's pair of equal ints)
        if not is_int(mask_patch_size) or mask_patch_size < 1 or mask_patch_size % patch_size:
            raise ValueError(f"mask_patch_size must be a positive multiple of patch_size {patch_size}, got "
                             f"{mask_patch_size!r}")
        grid_h, grid_w = self.patch_embed.grid_size
        if grid_h != grid_w or grid_h % (mask_patch_size // patch_size):
            raise ValueError(f"a {grid_h}x{grid_w} patch grid is not square in mask patches of {mask_patch_size} px")
        check_mask_ratio(mask_ratio)  # here, not at the first forward
        self.mask_block, self.mask_ratio, self.norm_pix_loss = mask_patch_size // patch_size, mask_ratio, norm_pix_loss
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.init_weights()

    def random_mask(self, batch: int, device=None, generator=None, mask_ratio=None) -> torch.Tensor:
        """A block-wise mask ``[batch, L]`` at this model's mask patch size and ratio (or ``mask_ratio``)."""
        return block_mask(batch, self.patch_embed.grid_size[0], self.mask_block,
                          self.mask_ratio if mask_ratio is None else mask_ratio, generator=generator, device=device)

    def forward(self, imgs, mask_ratio=None, mask=None):
        """``(loss, pred [B, L, p * p * C], mask [B, L])``. ``mask`` (1 = masked) defaults to a fresh block-wise
        one; ``mask_ratio`` (default: the model's) sets its ratio."""
        self.patch_embed.check(imgs)
        if mask is None:
            mask = self.random_mask(imgs.shape[0], imgs.device, mask_ratio=mask_ratio)
        mask = self.checked_mask(imgs, mask)
        pred = self.decoder_pred(self.forward_encoder(imgs, mask)[:, 1:])
        loss = mimkernels.masked_patch_loss(pred, imgs, mask, norm_pix=self.norm_pix_loss, loss="l1")
        return loss, pred, mask


_LN = partial(nn.LayerNorm, eps=1e-6)


def simmim_vit_base_patch16(**kwargs) -> SimMIM:
    """The paper's ViT-B: 224 px, 16 px patches, 32 px mask patches, ratio 0.6."""
    return SimMIM(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, norm_layer=_LN, **kwargs)


def simmim_vit_tiny_patch8(**kwargs) -> SimMIM:
    """A small SimMIM for tests and CPU demos: 64 px images, 8 px patches, 16 px mask patches, 4 blocks."""
    kwargs = {"img_size": 64, "mask_patch_size": 16, **kwargs}
    return SimMIM(patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4, norm_layer=_LN, **kwargs)
