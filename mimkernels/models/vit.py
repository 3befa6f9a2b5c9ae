"""The ViT pieces MAE and AIM share, built on mimkernels' public ops.

Module and parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``blocks.0.attn.qkv``,
``blocks.0.norm1``, ``blocks.0.mlp.fc1``, ...), which is what the official MAE checkpoints hold.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import mimkernels


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


class PatchEmbed(nn.Module):
    """Conv2d weights (``proj``) applied by :func:`mimkernels.patch_embed`: one GEMM that can add the
    positional embedding and compute only the kept patches."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def check(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"imgs must be [batch, {', '.join(map(str, expected))}] for this model, got "
                             f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__}")

    def forward(self, imgs, *, pos_embed=None, ids_keep=None):
        self.check(imgs)
        return mimkernels.patch_embed(imgs, self.proj.weight, self.proj.bias, pos_embed=pos_embed, ids_keep=ids_keep)


class Attention(nn.Module):
    """Multi-head self-attention on a packed qkv projection: q, k and v are strided views of one GEMM's
    output, read in place by the attention kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, prefix_len=None):
        """Full attention when ``prefix_len`` is None, else prefix-causal (int or ``[B]`` tensor)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = mimkernels.attention(qkv[0], qkv[1], qkv[2], prefix_len=prefix_len)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


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


def check_head_dim(name: str, dim: int, num_heads: int) -> None:
    """The attention kernels take head dims that are multiples of 8 in [16, 256]."""
    head_dim = dim // num_heads if num_heads else 0
    if num_heads < 1 or dim % num_heads or head_dim % 8 or not 16 <= head_dim <= 256:
        raise ValueError(f"{name}: width {dim} over {num_heads} heads must give a head dim that is a multiple "
                         f"of 8 in [16, 256], got {dim / num_heads if num_heads else math.inf:g}")
