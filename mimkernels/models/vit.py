"""The ViT pieces MAE and AIM share, built on mimkernels' public ops.

Module and parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``blocks.0.attn.qkv``,
``blocks.0.norm1``, ``blocks.0.mlp.fc1``, ...), which is what the official MAE checkpoints hold. Attention and
PatchEmbed are the public modules of :mod:`mimkernels.nn`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import Attention, PatchEmbed, check_head_dim

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "check_head_dim", "init_weights", "sincos_pos_embed"]


def sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, *, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding ``[1, (1 +) grid_h * grid_w, embed_dim]`` (float32).

    Patches in raster order; the first half of the channels encodes the column, the second half the row,
    each as ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000 ** (-i / (D / 4))``: MAE's
    ``get_2d_sincos_pos_embed`` (square grids) and ml-aim's ``SinCosPosEmbed``. A cls row, if asked, is zero.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    quarter = embed_dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table])
    return table.float().unsqueeze(0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` without drop-path or layer scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 bias: bool = True, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=bias)

    def forward(self, x, prefix_len=None):
        x = x + self.attn(self.norm1(x), prefix_len)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights with zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, PatchEmbed):  # like a Linear over the flattened patch, as MAE does
        nn.init.xavier_uniform_(module.proj.weight.view(module.proj.weight.shape[0], -1))
