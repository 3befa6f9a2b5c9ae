"""The ViT pieces MAE and AIM share, built on mimkernels' public ops.

Module and parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``blocks.0.attn.qkv``,
``blocks.0.norm1``, ``blocks.0.mlp.fc1``, ...), which is what the official MAE checkpoints hold. Attention and
PatchEmbed are the public modules of :mod:`mimkernels.nn`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mimkernels

from ..nn import Attention, PatchEmbed, check_head_dim
from ..ops._checks import check_mask_values, is_int, is_real, kernels_take

# True: every residual add is fused with the LayerNorm that follows it (mimkernels.add_layer_norm): in a block, the
# attention branch's add with norm2; across blocks (``run_blocks``), the MLP branch's add with the next block's
# norm1, or with the final norm after the last block. Off until a GPU measures it faster than the adds plus
# LayerNorms it replaces (bench_models' mimkernels_fused_norm provider is that A/B).
FUSED_ADD_NORM = False
# True: each Mlp runs as mimkernels.gelu_mlp (GELU inside its two GEMMs, Triton GEMMs for fc1's forward and fc2's
# input gradient, cuBLAS for the other four). Off until a GPU measures it faster than cuBLAS plus the GELU passes
# (bench_mlp; bench_models' mimkernels_fused_mlp provider is the step's A/B).
FUSED_GELU_MLP = False

__all__ = ["Attention", "Block", "MaskTokenViT", "Mlp", "PatchEmbed", "check_head_dim", "generator_kwargs",
           "add_norm", "block_input_norm", "init_weights", "recomputable", "run_blocks", "sincos_pos_embed"]


def generator_kwargs(generator) -> dict:
    """``{"generator": generator}``, or nothing for None: an explicit ``generator=None`` makes ``torch.rand`` /
    ``randint`` fail to trace under torch.compile once the batch size is symbolic (torch 2.11 and 2.14)."""
    return {} if generator is None else {"generator": generator}


def recomputable(forward):
    """Decorates a block's ``forward``: when the block's ``checkpointed`` is True and autograd records, the
    forward runs under non-reentrant activation checkpointing (its activations are recomputed in the backward
    instead of kept: memory for about one more forward). ``mimkernels.parallel.checkpoint_activations`` sets it.
    The block's own module hooks (FSDP's) stay outside the recomputed region."""

    def run(self, *args, **kwargs):
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
        return forward(self, *args, **kwargs)

    run.__doc__, run.__name__, run.__qualname__ = forward.__doc__, forward.__name__, forward.__qualname__
    return run


def sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, *, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding ``[1, (1 +) grid_h * grid_w, embed_dim]`` (float32).

    Patches in raster order; the first half of the channels encodes the column, the second half the row,
    each as ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000 ** (-i / (D / 4))``: MAE's
    ``get_2d_sincos_pos_embed`` (square grids) and ml-aim's ``SinCosPosEmbed``. A cls row, if asked, is zero.
    """
    if not is_int(embed_dim) or embed_dim < 4 or embed_dim % 4:
        raise ValueError(f"embed_dim must be a positive multiple of 4 for a 2-D sin-cos embedding, got {embed_dim!r}")
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


def add_norm(x, branch, norm, *, fuse=None):
    """``(x + branch, norm(x + branch))``: one pass of :func:`mimkernels.add_layer_norm` when ``fuse`` (None:
    FUSED_ADD_NORM), ``norm`` a LayerNorm over the last dim and the branch of x's shape and of a kernel dtype; else the
    add (broadcasting) and then the norm. ``norm`` must compute what ``nn.LayerNorm.forward`` does (a subclass may, as
    timm's does without its "fast norm"; the caller vouches for that)."""
    if ((FUSED_ADD_NORM if fuse is None else fuse) and isinstance(norm, nn.LayerNorm)
            and len(norm.normalized_shape) == 1 and branch.shape == x.shape
            and kernels_take(x, branch)):
        return mimkernels.add_layer_norm(x, branch, norm.weight, norm.bias, eps=norm.eps)
    x = x + branch
    return x, norm(x)


def run_blocks(blocks, x, norm, *args, pending=None):
    """``norm(blocks[-1](... blocks[0](x + pending, *args) ..., *args))``: a stack of pre-norm blocks and the norm
    after it; ``pending`` (e.g. a positional embedding) is added to the input first, broadcasting.

    With FUSED_ADD_NORM each block hands its last branch (the MLP's output) to the next one un-added
    (``defer_mlp=True``), which adds it in the same pass as its first norm (``pending=``); the final norm adds the
    last one. Every residual add then shares a pass with a LayerNorm; only the first block's norm1 runs alone.
    Blocks are called as modules, so hooks (FSDP's) and activation checkpointing see each block as before; a block
    always returns a new tensor (FSDP warns about outputs that are views of inputs): a block of only an MLP branch
    needs an initial ``pending`` for that, or it hands its input back.
    """
    if not FUSED_ADD_NORM or not len(blocks):
        if pending is not None:
            x = x + pending
        for block in blocks:
            x = block(x, *args)
        return norm(x)
    for block in blocks:
        x, pending = block(x, *args, pending=pending, defer_mlp=True)
    return add_norm(x, pending, norm)[1]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        if FUSED_GELU_MLP:
            return mimkernels.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(self.fc1(x)))


def block_input_norm(x, pending, norm):
    """A block's input ``x + pending`` (``pending`` None: x) and its first norm of it; one pass with FUSED_ADD_NORM."""
    return (x, norm(x)) if pending is None else add_norm(x, pending, norm)


def block_stack(name: str, depth, make_block) -> nn.ModuleList:
    """``depth`` blocks, each from ``make_block()``. ValueError naming ``name`` unless ``depth`` is an int >= 0
    (0: none): ``range`` would take a negative depth for none, silently, and a float with a TypeError of its own."""
    if not is_int(depth) or depth < 0:
        raise ValueError(f"{name} must be a non-negative int, got {depth!r}")
    return nn.ModuleList(make_block() for _ in range(depth))


def mlp_width(dim: int, mlp_ratio) -> int:
    """An MLP's hidden width, ``int(dim * mlp_ratio)`` as timm and MAE compute it. ValueError unless ``mlp_ratio``
    is a finite positive number that gives at least 1 (a ratio of 0 built empty layers, a negative one failed in
    torch with a negative tensor size)."""
    if not is_real(mlp_ratio) or not 0 < mlp_ratio < math.inf or int(dim * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio must be a positive number giving a hidden width of at least 1 for width {dim}, "
                         f"got {mlp_ratio!r}")
    return int(dim * mlp_ratio)


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` without drop-path or layer scale)."""

    checkpointed = False  # activation checkpointing (see ``recomputable``)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 bias: bool = True, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_width(dim, mlp_ratio), bias=bias)

    @recomputable
    def forward(self, x, prefix_len=None, *, pending=None, defer_mlp=False):
        """``x [B, N, dim]`` -> ``[B, N, dim]``; ``prefix_len`` as :class:`Attention`'s. For :func:`run_blocks`:
        ``pending`` is a branch not yet added (the block's input is ``x + pending``), and ``defer_mlp=True``
        returns ``(x, mlp_branch)`` instead of their sum."""
        x, normed = block_input_norm(x, pending, self.norm1)
        x, normed = add_norm(x, self.attn(normed, prefix_len), self.norm2)
        branch = self.mlp(normed)
        return (x, branch) if defer_mlp else x + branch


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


class MaskTokenViT(nn.Module):
    """The encoder SimMIM and BEiT share: every patch embedded, the masked ones replaced by a learnable mask token
    (inside the patch-embedding GEMM, positions added in the same pass), a cls token, fixed sin-cos positions,
    pre-norm blocks with full attention, a final norm. Subclasses add their head, then call ``init_weights``."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_layer):
        super().__init__()
        check_head_dim("encoder", embed_dim, num_heads)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid_h, grid_w = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid_h, grid_w, cls_token=True), requires_grad=False)
        self.blocks = block_stack("depth", depth, lambda: Block(embed_dim, num_heads, mlp_ratio, norm_layer=norm_layer))
        self.norm = norm_layer(embed_dim)

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(init_weights)

    def checked_mask(self, imgs, mask) -> torch.Tensor:
        """``mask`` as float32 on the images' device, after checking it is ``[B, L]``."""
        batch, num_patches = imgs.shape[0], self.patch_embed.num_patches
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, num_patches):
            raise ValueError(f"mask must be a [{batch}, {num_patches}] tensor, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        check_mask_values("mask", mask)
        return mask.to(device=imgs.device, dtype=torch.float32)

    def forward_encoder(self, imgs, mask):
        """``[B, 1 + L, E]``: the cls token, then every patch, the masked ones (``mask`` 1) the mask token."""
        x = self.patch_embed(imgs, pos_embed=self.pos_embed[:, 1:], mask=mask, mask_token=self.mask_token)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(imgs.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        return run_blocks(self.blocks, x, self.norm)
