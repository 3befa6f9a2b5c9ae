"""timm's ViT modules on mimkernels' kernels (see mimkernels.integrations)."""
from __future__ import annotations

import warnings

import torch
from timm.layers import Attention, PatchEmbed
from timm.layers.format import Format
from timm.layers.trace_utils import _assert

import mimkernels

from ..nn import attend_qkv, check_head_dim


class MimkernelsAttention(Attention):
    """``timm.layers.Attention`` whose attention runs :func:`mimkernels.attention`; same parameters."""

    _mimkernels_patch = True

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or (self.training and self.attn_drop.p > 0):
            return super().forward(x, attn_mask, is_causal)  # no kernel for arbitrary masks or dropout
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
        tokens = mimkernels.patch_embed(x, self.proj.weight, self.proj.bias)  # [B, L, E]
        if not self.flatten:
            grid = (x.shape[2] // patch, x.shape[3] // patch, tokens.shape[-1])
            tokens = tokens.reshape(batch, *grid)  # NHWC
            if self.output_fmt == Format.NCHW:
                tokens = tokens.permute(0, 3, 1, 2)
        return self.norm(tokens)


def _attention_unsupported(module: Attention) -> str | None:
    try:
        check_head_dim("attention", module.num_heads * module.head_dim, module.num_heads)
    except ValueError as error:
        return str(error)
    return None


def _patch_embed_unsupported(module: PatchEmbed) -> str | None:
    proj = module.proj
    if not isinstance(proj, torch.nn.Conv2d) or proj.groups != 1 or proj.dilation != (1, 1):
        return "its projection is not a plain Conv2d"
    if module.patch_size[0] != module.patch_size[1] or proj.kernel_size != proj.stride or \
            proj.kernel_size != tuple(module.patch_size) or proj.padding != (0, 0):
        return f"its patches are not square and non-overlapping (kernel {proj.kernel_size}, stride {proj.stride})"
    if not module.flatten and module.output_fmt not in (Format.NHWC, Format.NCHW):
        return f"output format {module.output_fmt} is not produced"
    return None


def patch(model: torch.nn.Module, *, attention: bool, patch_embed: bool) -> None:
    plan = []
    if attention:
        plan.append((Attention, MimkernelsAttention, _attention_unsupported))
    if patch_embed:
        plan.append((PatchEmbed, MimkernelsPatchEmbed, _patch_embed_unsupported))
    skipped, dropout = {}, []
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
    for reason, names in skipped.items():
        warnings.warn(f"mimkernels.integrations: {len(names)} module(s) keep their original code because {reason} "
                      f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})", stacklevel=3)
    if dropout:
        warnings.warn(f"mimkernels.integrations: {len(dropout)} attention module(s) have attention dropout "
                      f"(attn_drop > 0), which has no kernel: they run the original code while training",
                      stacklevel=3)
