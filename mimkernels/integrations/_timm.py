"""timm's ViT modules on mimkernels' kernels (see mimkernels.integrations)."""
from __future__ import annotations

import warnings

import torch
from timm.layers import GluMlp, LayerNorm, Mlp, PatchEmbed, SwiGLU
from timm.layers.format import Format
from timm.layers.trace_utils import _assert
from timm.models.vision_transformer import Block, VisionTransformer

try:
    from timm.layers import Attention
except ImportError:  # timm before 1.0.17 defined the ViT's Attention in vision_transformer
    from timm.models.vision_transformer import Attention

import mimkernels

from ..models import vit
from ..nn import attend_qkv, check_head_dim
from ..ops._checks import kernels_take
from . import covered_by_patches, release_unsupported, warn_kept


def _mask_arguments(attn_mask: torch.Tensor | None, is_causal: bool) -> dict:
    """The keyword arguments that pass a mask on to an Attention: only those given, since older timm releases'
    Attention.forward takes ``x`` alone (0.9, and 1.0 before 1.0.17) or no ``is_causal``."""
    return {**({"attn_mask": attn_mask} if attn_mask is not None else {}), **({"is_causal": True} if is_causal else {})}


class MimkernelsAttention(Attention):
    """``timm.layers.Attention`` whose attention runs :func:`mimkernels.attention`; same parameters."""

    _mimkernels_patch = True

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        # no kernel for masks, dropout or float64
        if attn_mask is not None or (self.training and self.attn_drop.p > 0) or not kernels_take(x):
            return super().forward(x, **_mask_arguments(attn_mask, is_causal))
        batch, tokens, _ = x.shape
        gate_proj = getattr(self, "gate", None)  # the optional parts differ across timm 1.0 releases
        gate = gate_proj(x).sigmoid() if gate_proj is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        out = attend_qkv(qkv, self.q_norm, self.k_norm, causal=bool(is_causal), scale=self.scale)
        out = out.reshape(batch, tokens, self.num_heads * self.head_dim)
        out = getattr(self, "norm", torch.nn.Identity())(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class MimkernelsPatchEmbed(PatchEmbed):
    """``timm.layers.PatchEmbed`` whose convolution runs :func:`mimkernels.patch_embed`; same parameters."""

    _mimkernels_patch = True

    def forward(self, x: torch.Tensor):
        if not kernels_take(self.proj.weight):
            return super().forward(x)
        batch, _, height, width = x.shape
        patch = self.patch_size[0]
        if self.img_size is not None:  # timm's own checks and messages
            expected_height, expected_width = self.img_size
            if self.strict_img_size:
                _assert(height == expected_height, f"Input height ({height}) doesn't match model ({expected_height}).")
                _assert(width == expected_width, f"Input width ({width}) doesn't match model ({expected_width}).")
            elif not self.dynamic_img_pad:
                _assert(height % patch == 0, f"Input height ({height}) should be divisible by patch size ({patch}).")
                _assert(width % patch == 0, f"Input width ({width}) should be divisible by patch size ({patch}).")
        if self.dynamic_img_pad:
            x = torch.nn.functional.pad(x, (0, (patch - width % patch) % patch, 0, (patch - height % patch) % patch))
        x = covered_by_patches(x, patch)  # strict models may take sides that are no multiple of the patch
        tokens = mimkernels.patch_embed(x, self.proj.weight, self.proj.bias)  # [B, L, E]
        if not self.flatten:
            grid = (x.shape[2] // patch, x.shape[3] // patch, tokens.shape[-1])
            tokens = tokens.reshape(batch, *grid)  # NHWC
            if self.output_fmt == Format.NCHW:
                tokens = tokens.permute(0, 3, 1, 2)
        return self.norm(tokens)


class MimkernelsBlock(Block):
    """``timm...vision_transformer.Block`` whose residual add after attention shares one pass with ``norm2``
    (:func:`mimkernels.add_layer_norm`); same parameters. The add after the MLP stays as it is: fusing it with the
    next block's ``norm1`` would change what a block returns."""

    _mimkernels_patch = True

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        branch = self.drop_path1(self.ls1(self.attn(self.norm1(x), **_mask_arguments(attn_mask, is_causal))))
        x, normed = vit.add_norm(x, branch, self.norm2, fuse=True)
        return x + self.drop_path2(self.ls2(self.mlp(normed)))


class MimkernelsMlp(Mlp):
    """``timm.layers.Mlp`` whose fc1 -> GELU -> fc2 runs :func:`mimkernels.gelu_mlp` (GELU inside the GEMMs); same
    parameters. With dropout while training, or in float64, it runs the original code (no kernel draws dropout
    masks)."""

    _mimkernels_patch = True

    def forward(self, x: torch.Tensor):
        if (self.training and (self.drop1.p > 0 or self.drop2.p > 0)) or not kernels_take(x):
            return super().forward(x)
        return mimkernels.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


SWAPPED = (Block, Mlp, Attention, PatchEmbed)  # the timm classes that patch() may swap for one of the above

# the forward signatures that MimkernelsBlock / MimkernelsAttention reproduce (timm 0.9.16 to 1.0.31)
_BLOCK_FORWARDS = (("self", "x"), ("self", "x", "attn_mask"), ("self", "x", "attn_mask", "is_causal"))
_ATTENTION_FORWARDS = _BLOCK_FORWARDS
_MLP_INPUT_LAYERS = ("fc1", "fc1_g", "fc1_x")  # what each of timm's Mlp / GluMlp / SwiGLU applies to its input


def _block_unsupported(module: Block) -> str | None:
    if reason := release_unsupported("timm", Block, "forward", _BLOCK_FORWARDS):
        return reason
    norm = module.norm2
    if type(norm) not in (torch.nn.LayerNorm, LayerNorm) or getattr(norm, "_fast_norm", False):
        return "its norm2 is not a plain LayerNorm (timm's LayerNormFp32 and fast norm compute otherwise)"
    if len(norm.normalized_shape) != 1:
        return "its norm2 normalises more than the last dimension"
    # Under autocast the fused norm comes out in the autocast dtype, which is what the MLP's first Linear casts
    # the LayerNorm's fp32 output to: the same numbers only where a Linear comes first.
    mlp = module.mlp
    inputs = [getattr(mlp, name) for name in _MLP_INPUT_LAYERS if hasattr(mlp, name)]
    if type(mlp) not in (Mlp, GluMlp, SwiGLU) or not inputs or \
            not all(type(layer) is torch.nn.Linear for layer in inputs):
        return f"its MLP ({type(mlp).__name__}) does not start with a Linear"
    return None


def _mlp_unsupported(module: Mlp) -> str | None:
    if reason := release_unsupported("timm", Mlp, "forward", (("self", "x"),)):
        return reason
    act = module.act
    if type(act) is not torch.nn.GELU or act.approximate != "none":
        return f"its activation ({type(act).__name__}) is not the exact GELU"
    if type(module.fc1) is not torch.nn.Linear or type(module.fc2) is not torch.nn.Linear:
        return "its layers are not Linear (use_conv)"
    if type(module.norm) is not torch.nn.Identity:
        return "it normalises between its layers"
    if not all(isinstance(drop, torch.nn.Dropout) for drop in (module.drop1, module.drop2)):
        return "its dropout is not nn.Dropout"
    return None


def _attention_unsupported(module: Attention) -> str | None:
    if reason := release_unsupported("timm", Attention, "forward", _ATTENTION_FORWARDS):
        return reason
    try:
        check_head_dim("attention", module.num_heads * module.head_dim, module.num_heads)
    except ValueError as error:
        return str(error)
    return None


def _patch_embed_unsupported(module: PatchEmbed) -> str | None:
    if reason := release_unsupported("timm", PatchEmbed, "forward", (("self", "x"),)):
        return reason
    proj = module.proj
    if not isinstance(proj, torch.nn.Conv2d) or proj.groups != 1 or proj.dilation != (1, 1):
        return "its projection is not a plain Conv2d"
    if module.patch_size[0] != module.patch_size[1] or proj.kernel_size != proj.stride or \
            proj.kernel_size != tuple(module.patch_size) or proj.padding != (0, 0):
        return f"its patches are not square and non-overlapping (kernel {proj.kernel_size}, stride {proj.stride})"
    if not module.flatten and module.output_fmt not in (Format.NHWC, Format.NCHW):
        return f"output format {module.output_fmt} is not produced"
    return None


def _note_foreign_attention(model: torch.nn.Module, skipped: dict) -> None:
    """Add to ``skipped`` the blocks of each timm ViT in ``model`` (itself or a submodule) that hold no
    ``Attention`` of timm's own class: their attention (timm's ParallelScalingBlock computes it inside the block;
    DiffAttention, or a subclass, is another module) keeps its code, which a user who asked for attention on the
    kernels should hear about."""
    for prefix, vit_model in model.named_modules():
        if not isinstance(vit_model, VisionTransformer):
            continue
        for name, block in vit_model.blocks.named_children():
            if not any(type(module) in (Attention, MimkernelsAttention) for module in block.modules()):
                holder = getattr(block, "attn", block)
                skipped.setdefault(f"their attention ({type(holder).__name__}) is not timm's Attention", []).append(
                    f"{prefix}.blocks.{name}" if prefix else f"blocks.{name}")


def holds_patchable(model: torch.nn.Module) -> bool:
    """Whether ``model`` or a submodule is a timm ViT or one of the timm modules that :func:`patch` swaps."""
    return any(type(module) in SWAPPED or isinstance(module, VisionTransformer) for module in model.modules())


def patch(model: torch.nn.Module, *, attention: bool, patch_embed: bool, add_norm: bool, gelu_mlp: bool) -> None:
    """Swap the class of each timm ``Block`` / ``Mlp`` / ``Attention`` / ``PatchEmbed`` in ``model`` (a timm ViT, or
    any model built from these modules) that the options ask for and the kernels can run."""
    plan = []
    if add_norm:
        plan.append((Block, MimkernelsBlock, _block_unsupported))
    if gelu_mlp:
        plan.append((Mlp, MimkernelsMlp, _mlp_unsupported))
    if attention:
        plan.append((Attention, MimkernelsAttention, _attention_unsupported))
    if patch_embed:
        plan.append((PatchEmbed, MimkernelsPatchEmbed, _patch_embed_unsupported))
    skipped, dropout, mlp_dropout = {}, [], []
    for name, module in model.named_modules():
        for original, patched, unsupported in plan:
            if type(module) is not original:  # subclasses may change forward: leave them alone
                continue
            reason = unsupported(module)
            if reason is not None:
                skipped.setdefault(reason, []).append(name)
                continue
            module.__class__ = patched
            if isinstance(module, Attention) and module.attn_drop.p > 0:
                dropout.append(name)
            if isinstance(module, Mlp) and (module.drop1.p > 0 or module.drop2.p > 0):
                mlp_dropout.append(name)
    if attention:
        _note_foreign_attention(model, skipped)
    warn_kept(skipped)
    if mlp_dropout:
        warnings.warn(f"mimkernels.integrations: {len(mlp_dropout)} MLP(s) have dropout (proj_drop > 0), which has "
                      f"no kernel: they run the original code while training", stacklevel=3)
    if dropout:
        warnings.warn(f"mimkernels.integrations: {len(dropout)} attention module(s) have attention dropout "
                      f"(attn_drop > 0), which has no kernel: they run the original code while training",
                      stacklevel=3)
