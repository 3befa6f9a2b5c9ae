"""Masked autoencoder (He et al., CVPR'22) on mimkernels' fused ops.

Same architecture, constructor arguments, initialisation, ``forward`` and ``state_dict`` keys as
facebookresearch/mae's ``MaskedAutoencoderViT``, so its checkpoints load unchanged. What differs is how
the forward pass runs:

- the patch embedding computes only the kept patches, with the positional embedding added in its
  epilogue (``patch_embed(..., ids_keep=...)``): the official code embeds every patch, then drops 75%;
- the decoder input (mask tokens, unshuffle, positional embedding) is one ``restore_tokens`` pass;
- attention reads q, k, v in place from the packed qkv projection;
- the loss gathers and normalises the target patches on the fly (``masked_patch_loss``).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

import mimkernels

from ..ops._checks import check_bool
from ..ops.tokens import checked_noise
from .vit import Block, PatchEmbed, block_stack, check_head_dim, init_weights, run_blocks, sincos_pos_embed


class MAE(nn.Module):
    """``MaskedAutoencoderViT`` with the official constructor signature."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        check_bool("norm_pix_loss", norm_pix_loss)  # here: the loss op's error came at the first forward
        check_head_dim("encoder", embed_dim, num_heads)
        check_head_dim("decoder", decoder_embed_dim, decoder_num_heads)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid_h, grid_w = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos tables, kept as frozen parameters so that the state_dict keys match the official ones
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid_h, grid_w, cls_token=True), requires_grad=False)
        self.blocks = block_stack("depth", depth, lambda: Block(embed_dim, num_heads, mlp_ratio, norm_layer=norm_layer))
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, grid_h, grid_w, cls_token=True),
                                              requires_grad=False)
        self.decoder_blocks = block_stack("decoder_depth", decoder_depth, lambda: Block(
            decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer=norm_layer))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_embed.patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation: tokens N(0, 0.02), linears Xavier-uniform, norms ones / zeros."""
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_weights)

    # -- the official helper methods
    def patchify(self, imgs):
        """Official method: images ``[B, C, H, W]`` to patch rows ``[B, L, p * p * C]``."""
        return mimkernels.patchify(imgs, self.patch_embed.patch_size)

    def unpatchify(self, x):
        """Official method: patch rows ``[B, L, p * p * C]`` back to images ``[B, C, H, W]``."""
        grid_h, grid_w = self.patch_embed.grid_size
        return mimkernels.unpatchify(x, self.patch_embed.patch_size, grid_h, grid_w)

    def random_masking(self, x, mask_ratio, noise=None):
        """Official method: ``(x_masked, mask, ids_restore)`` for patch tokens ``x [B, L, D]``."""
        kept = mimkernels.random_masking(x, mask_ratio, noise=noise)
        return kept.x_kept, kept.mask, kept.ids_restore

    # -- the forward pass
    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """``(latent [B, 1 + K, E], mask [B, L], ids_restore [B, L])``; ``noise [B, L]`` as in random_masking."""
        self.patch_embed.check(imgs)
        batch, num_patches = imgs.shape[0], self.patch_embed.num_patches
        noise = checked_noise(noise, batch, num_patches, imgs.device)
        mask, ids_restore, ids_keep = mimkernels.masking_indices(noise, mask_ratio)
        x = self.patch_embed(imgs, pos_embed=self.pos_embed[:, 1:], ids_keep=ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)  # promotes to fp32 under autocast, as in the official code
        return run_blocks(self.blocks, x, self.norm), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """Patch predictions ``[B, L, p * p * C]`` from the encoder's output."""
        x = self.decoder_embed(x)
        # the official torch.cat with the mask tokens promotes the stream to their dtype (fp32 under autocast)
        x = x.to(torch.promote_types(x.dtype, self.mask_token.dtype))
        x = mimkernels.restore_tokens(x, ids_restore, self.mask_token, pos_embed=self.decoder_pos_embed,
                                      num_prefix_tokens=1)
        pred = self.decoder_pred(run_blocks(self.decoder_blocks, x, self.decoder_norm))
        # a tensor of its own, not a view: torch 2.15's FSDP2 warns of views among a module's outputs (an in-place op
        # on one would skip the all-gather). One copy of pred; projecting only the patch rows would skip it but split
        # the projection's bias add from its GEMM (aten's linear on a strided input), which rounds differently
        return pred[:, 1:].contiguous()

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error over the removed patches (``mask == 1``), per-patch normalised with norm_pix_loss."""
        return mimkernels.masked_patch_loss(pred, imgs, mask, norm_pix=self.norm_pix_loss)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """``(loss, pred [B, L, p * p * C], mask [B, L])`` as the official model returns them."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


_LN = partial(nn.LayerNorm, eps=1e-6)


def mae_vit_base_patch16(**kwargs) -> MAE:
    """The official MAE with a ViT-B/16 encoder (86M), 8-block 512-wide decoder."""
    return MAE(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN, **kwargs)


def mae_vit_large_patch16(**kwargs) -> MAE:
    """The official MAE with a ViT-L/16 encoder (304M), 8-block 512-wide decoder."""
    return MAE(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN, **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MAE:
    """The official MAE with a ViT-H/14 encoder (632M), 8-block 512-wide decoder."""
    return MAE(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN, **kwargs)


def mae_vit_tiny_patch8(**kwargs) -> MAE:
    """A small MAE for tests and CPU demos: 64 px images, 64 patches of 8 px, 4 + 2 blocks."""
    kwargs = {"img_size": 64, **kwargs}
    return MAE(patch_size=8, embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2,
               decoder_num_heads=4, mlp_ratio=4, norm_layer=_LN, **kwargs)
