"""mimkernels' building blocks as ``nn.Module`` s whose parameter names match timm's, to swap into existing code.

``Attention`` holds ``qkv`` / ``proj`` (and ``q_norm`` / ``k_norm`` with ``qk_norm=True``) exactly as
``timm.layers.Attention`` does, so a timm or MAE checkpoint loads unchanged; its ``forward`` also takes a per-sample
``prefix_len`` (AIM's prefix-causal attention, without the dense mask that ml-aim builds). ``PatchEmbed`` holds
the Conv2d ``proj`` (and ``norm``) of ``timm.layers.PatchEmbed`` and runs :func:`mimkernels.patch_embed`, which can
also add the positional embedding and compute only MAE's kept patches. The shipped models are built from them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import mimkernels

from .ops._checks import is_int

__all__ = ["Attention", "PatchEmbed", "check_head_dim"]


def check_head_dim(name: str, dim: int, num_heads: int) -> None:
    """The attention kernels take head dims that are multiples of 8 in [16, 256]; raise ValueError otherwise."""
    head_dim = dim // num_heads if num_heads else 0
    if num_heads < 1 or dim % num_heads or head_dim % 8 or not 16 <= head_dim <= 256:
        raise ValueError(f"{name}: width {dim} over {num_heads} heads must give a head dim that is a multiple "
                         f"of 8 in [16, 256], got {dim / num_heads if num_heads else math.inf:g}")


def _sides(name: str, value) -> tuple[int, int]:
    """``(height, width)`` from a positive int or a pair of them; ValueError naming ``name`` otherwise."""
    sides = (value, value) if is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(sides) != 2 or not all(is_int(side) and side >= 1 for side in sides):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(sides[0]), int(sides[1])


class PatchEmbed(nn.Module):
    """Image to patch tokens ``[B, L, E]``: a Conv2d's weights (``proj``) applied as one GEMM that reads the image
    in place, then ``norm`` (Identity unless ``norm_layer``).

    Args:
        img_size: the model's image size (int or (H, W)); with ``strict_img_size`` other sizes are refused,
            else any multiple of the patch size is embedded. None: any multiple.
        patch_size, in_chans, embed_dim, bias: as timm's PatchEmbed (square patches: an int, or a pair of equal
            ints as timm writes it).
    """

    def __init__(self, img_size: int | tuple[int, int] | None = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True, norm_layer=None,
                 strict_img_size: bool = True):
        super().__init__()
        given = patch_size
        patch_size, patch_width = _sides("patch_size", given)
        if patch_size != patch_width:
            raise ValueError(f"patch_size must be square (mimkernels.patch_embed's patches are), got {given!r}")
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.img_size = None if img_size is None else _sides("img_size", img_size)
        if self.img_size is not None and any(side % patch_size for side in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = None if self.img_size is None else tuple(side // patch_size for side in self.img_size)
        self.num_patches = None if self.grid_size is None else self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def check(self, imgs: torch.Tensor) -> None:
        """Raise ValueError unless ``imgs`` is ``[B, in_chans, H, W]`` of the model's size (if strict)."""
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"imgs must be [batch, {self.in_chans}, height, width], got "
                             f"{tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__}")
        if self.strict_img_size and self.img_size is not None and tuple(imgs.shape[2:]) != self.img_size:
            raise ValueError(f"imgs must be {self.img_size[0]}x{self.img_size[1]} for this model, got "
                             f"{imgs.shape[2]}x{imgs.shape[3]}")

    def forward(self, imgs, *, pos_embed=None, ids_keep=None, mask=None, mask_token=None):
        """``[B, L, E]``, or ``[B, K, E]`` for the patches ``ids_keep [B, K]`` (MAE); with ``mask [B, L]`` and
        ``mask_token`` (E values), each patch is ``x * (1 - m) + mask_token * m`` for its mask value m: masked
        patches (1) are the token (SimMIM, BEiT). ``pos_embed [1, L, E]`` is added after the token, before
        ``norm``, in the same pass."""
        self.check(imgs)
        tokens = mimkernels.patch_embed(imgs, self.proj.weight, self.proj.bias, pos_embed=pos_embed,
                                        ids_keep=ids_keep, mask=mask, mask_token=mask_token)
        return self.norm(tokens)


# Attention layers hand the packed projection to mimkernels.qkv_attention (its backward writes one packed gradient;
# separate q, k, v views cost two copies of it). False: the separate-views path, for A/B timing (bench_models).
PACKED_QKV = True


def attend_qkv(qkv, q_norm, k_norm, *, causal=False, prefix_len=None, scale=None):
    """Attention of a packed projection ``[B, N, 3, H, D]`` -> ``[B, N, H, D]``, with optional per-head norms of q
    and k (``nn.Identity`` for none): :func:`mimkernels.qkv_attention` where nothing sits between the projection
    and the attention, else :func:`mimkernels.attention` on normalised q, k views."""
    if PACKED_QKV and isinstance(q_norm, nn.Identity) and isinstance(k_norm, nn.Identity):
        return mimkernels.qkv_attention(qkv, causal=causal, prefix_len=prefix_len, scale=scale)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = mimkernels.attention(q_norm(q), k_norm(k), v, causal=causal, prefix_len=prefix_len, scale=scale)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention on a packed qkv projection, timm's parameter layout.

    The qkv GEMM's output goes to :func:`mimkernels.qkv_attention` whole (read in place, its gradient written as
    one packed tensor); with ``qk_norm``, q and k are normalised views of it instead. ``qk_norm``
    normalises q and k per head (``norm_layer`` over the head dim) as timm does. Attention-weight dropout has no
    kernel: ``attn_drop`` must be 0.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        check_head_dim("Attention", dim, num_heads)
        if attn_drop:
            raise ValueError(f"attn_drop must be 0: mimkernels' attention has no attention-weight dropout, "
                             f"got {attn_drop}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, prefix_len=None, *, causal: bool = False):
        """``x [B, N, dim]``. Full attention by default; causal with ``causal=True``; prefix-causal (AIM: query i
        sees key j iff ``j <= i or j < prefix_len[b]``) with ``prefix_len``, an int or an integer tensor ``[B]``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x must be a tensor [batch, tokens, {self.qkv.in_features}], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        batch, tokens, dim = x.shape
        out = attend_qkv(self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)), self.q_norm, self.k_norm,
                         causal=causal, prefix_len=prefix_len)
        return self.proj_drop(self.proj(out.reshape(batch, tokens, dim)))
