"""Autoregressive image model (AIM, El-Nouby et al., ICML'24, arXiv 2401.08541) on mimkernels' fused ops.

Pre-training: a ViT trunk without cls token reads the patches in raster order with prefix-causal
attention (patches ``j < S`` visible to every query, the rest causally), and a per-patch MLP head
predicts from position ``i`` the pixels of patch ``i + 1``, normalised per patch. The prefix length S is
drawn per sample, uniformly in ``{1, ..., L - 1}``: at least one prefix patch (a bidirectional context
for the first prediction, which is what lets the trunk switch to full attention downstream) and at
least one predicted patch. The loss counts only the non-prefix patches ``S .. L - 1`` (a prefix of 0 given by
the caller, pure causal attention: ``1 .. L - 1``, patch 0 having no prediction); the prediction of
patch S comes from position S - 1, which sees patches 0 .. S - 1 only, so no prediction sees its target.

Trunk as apple/ml-aim ships it (``aim-v1``): Conv2d patch projection followed by a LayerNorm, fixed 2-D
sin-cos positional embedding, pre-norm blocks whose linear layers have no bias, LayerNorms with eps 1e-6,
a final LayerNorm. The paper describes the pre-training head (sin-cos positions added again before it,
N residual MLP blocks with expansion 4, no biases) but ml-aim does not publish it; ours projects the
trunk output to ``head_embed_dim``, adds the positions, runs ``head_depth`` pre-norm MLP blocks, a
LayerNorm and a linear projection to pixels.
"""
from __future__ import annotations

import numbers
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import mimkernels

from ..ops._checks import check_bool, is_int
from .vit import (
    Block,
    Mlp,
    PatchEmbed,
    block_input_norm,
    block_stack,
    check_head_dim,
    generator_kwargs,
    init_weights,
    mlp_width,
    recomputable,
    run_blocks,
    sincos_pos_embed,
)

_LN = partial(nn.LayerNorm, eps=1e-6)


class MlpBlock(nn.Module):
    """One block of the AIM head: ``x + mlp(norm(x))``, per patch."""

    checkpointed = False  # activation checkpointing (see ``recomputable``)

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = _LN(dim)
        self.mlp = Mlp(dim, mlp_width(dim, mlp_ratio), bias=False)

    @recomputable
    def forward(self, x, *, pending=None, defer_mlp=False):
        """``pending`` and ``defer_mlp`` as :class:`Block`'s (for :func:`run_blocks`)."""
        x, normed = block_input_norm(x, pending, self.norm)
        branch = self.mlp(normed)
        return (x, branch) if defer_mlp else x + branch


class AIM(nn.Module):
    """AIM: prefix-causal ViT trunk + per-patch MLP head, trained to predict the next patch."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=1536, depth=24, num_heads=12,
                 head_depth=12, head_embed_dim=2048, mlp_ratio=4.0, norm_pix_loss=True):
        super().__init__()
        check_bool("norm_pix_loss", norm_pix_loss)  # here: the loss op's error came at the first forward
        check_head_dim("trunk", embed_dim, num_heads)
        if not is_int(head_embed_dim) or head_embed_dim < 4 or head_embed_dim % 4:  # its 2-D sin-cos positions
            raise ValueError(f"head_embed_dim must be a positive multiple of 4, got {head_embed_dim!r}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        if self.patch_embed.num_patches < 2:
            raise ValueError("AIM needs at least 2 patches per image (a prefix and a patch to predict)")
        grid_h, grid_w = self.patch_embed.grid_size
        self.patch_norm = _LN(embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, grid_h, grid_w), persistent=False)
        self.blocks = block_stack("depth", depth, lambda: Block(embed_dim, num_heads, mlp_ratio, qkv_bias=False,
                                                                 bias=False, norm_layer=_LN))
        self.norm = _LN(embed_dim)

        self.head_embed = nn.Linear(embed_dim, head_embed_dim, bias=False)
        self.register_buffer("head_pos_embed", sincos_pos_embed(head_embed_dim, grid_h, grid_w), persistent=False)
        self.head_blocks = block_stack("head_depth", head_depth, lambda: MlpBlock(head_embed_dim, mlp_ratio))
        self.head_norm = _LN(head_embed_dim)
        self.head_pred = nn.Linear(head_embed_dim, self.patch_embed.patch_size**2 * in_chans, bias=False)
        self.norm_pix_loss = norm_pix_loss
        self.apply(init_weights)

    @property
    def num_patches(self) -> int:
        """Patches per image, the sequence length the trunk sees."""
        return self.patch_embed.num_patches

    def sample_prefix_len(self, batch: int, device=None, generator=None) -> torch.Tensor:
        """Prefix lengths ``[batch]`` (int64), uniform in ``{1, ..., L - 1}``."""
        return torch.randint(1, self.num_patches, (batch,), device=device, **generator_kwargs(generator))

    def forward_features(self, imgs, prefix_len=None):
        """Trunk output ``[B, L, E]`` (after the final norm). ``prefix_len=None``: full bidirectional
        attention (downstream use); else prefix-causal attention with that prefix (int or ``[B]`` tensor)."""
        x = self.patch_norm(self.patch_embed(imgs)) + self.pos_embed
        return run_blocks(self.blocks, x, self.norm, prefix_len)

    def forward_head(self, features):
        """Per-patch pixel predictions ``[B, rows, p * p * C]`` from trunk features ``[B, rows, E]`` of the
        first ``rows`` positions."""
        positions = self.head_pos_embed[:, : features.shape[1]]
        return self.head_pred(run_blocks(self.head_blocks, self.head_embed(features), self.head_norm,
                                         pending=positions))

    def forward(self, imgs, prefix_len=None):
        """``(loss, pred)``: pred ``[B, L, p * p * C]`` holds at row l the prediction of patch l (made at
        position l - 1; row 0 is zero, patch 0 is never predicted), in normalised pixels when
        ``norm_pix_loss``; the loss averages over the patches past the prefix (and past patch 0: with a prefix of
        0, pure causal attention, patches 1 to L - 1). ``prefix_len``: int below L or ``[B]`` integer tensor, drawn
        per sample in [1, L) when None; a tensor's sample with a prefix of L or more has no patch scored."""
        self.patch_embed.check(imgs)
        batch, num_patches = imgs.shape[0], self.num_patches
        if prefix_len is None:
            prefix_len = self.sample_prefix_len(batch, imgs.device)
        elif isinstance(prefix_len, bool) or not isinstance(prefix_len, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"prefix_len must be None, an int or an integer tensor [batch], got "
                            f"{type(prefix_len).__name__}")
        elif not isinstance(prefix_len, torch.Tensor) and prefix_len >= num_patches:
            # (a tensor's entries are not read on the host: that would wait for the GPU)
            raise ValueError(f"prefix_len must be below the {num_patches} patches: the loss scores the patches after "
                             f"the prefix, and a prefix of {prefix_len} leaves none; got {prefix_len}")
        features = self.forward_features(imgs, prefix_len)
        pred = F.pad(self.forward_head(features[:, :-1]), (0, 0, 1, 0))
        positions = torch.arange(num_patches, device=imgs.device)
        prefix = prefix_len.reshape(-1, 1) if isinstance(prefix_len, torch.Tensor) else prefix_len
        # the loss scores the patches after the prefix; patch 0 has no prediction, so not it either (prefix 0)
        mask = ((positions >= prefix) & (positions > 0)).float().expand(batch, num_patches)
        loss = mimkernels.masked_patch_loss(pred, imgs, mask, norm_pix=self.norm_pix_loss)
        return loss, pred


def _aim(embed_dim, num_heads, depth, **kwargs) -> AIM:
    return AIM(**{"img_size": 224, "patch_size": 14, "embed_dim": embed_dim, "depth": depth,
                  "num_heads": num_heads, **kwargs})


def aim_600m(**kwargs) -> AIM:
    """AIM-600M: a ViT trunk 1536 wide, 24 blocks, 12 heads, patch 14 at 224 px."""
    return _aim(1536, 12, 24, **kwargs)


def aim_1b(**kwargs) -> AIM:
    """AIM-1B: a ViT trunk 2048 wide, 24 blocks, 16 heads, patch 14 at 224 px."""
    return _aim(2048, 16, 24, **kwargs)


def aim_3b(**kwargs) -> AIM:
    """AIM-3B: a ViT trunk 3072 wide, 24 blocks, 24 heads, patch 14 at 224 px."""
    return _aim(3072, 24, 24, **kwargs)


def aim_7b(**kwargs) -> AIM:
    """AIM-7B: a ViT trunk 4096 wide, 32 blocks, 32 heads, patch 14 at 224 px."""
    return _aim(4096, 32, 32, **kwargs)


def aim_tiny(**kwargs) -> AIM:
    """A small AIM for tests and CPU demos: 64 px images, 64 patches of 8 px, 4 blocks, a 2-block head."""
    return AIM(**{"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4,
                  "head_depth": 2, "head_embed_dim": 128, **kwargs})
