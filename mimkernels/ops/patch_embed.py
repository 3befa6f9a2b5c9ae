"""Patch operations: MAE's patchify / unpatchify (the fused patch embedding itself is issue 4's next step)."""
from __future__ import annotations

import numbers

import torch

from .. import reference


def _check_patch_size(patch_size):
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    return int(patch_size)


def check_images(images, patch_size, name="images"):
    """images is [B, C, H, W] floating point with H and W multiples of the patch size."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, channels, height, width], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {images.dtype}")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"{name} of size {height}x{width} is not divisible by the patch size {patch_size}")


def patchify(images, patch_size):
    """MAE order: images ``[B, C, H, W]`` -> ``[B, (H/p) * (W/p), p * p * C]``, (p, q, c) inside a patch."""
    patch_size = _check_patch_size(patch_size)
    check_images(images, patch_size)
    return reference.patchify(images, patch_size)


def unpatchify(x, patch_size, height, width):
    """Inverse of :func:`patchify`: ``[B, height * width, p * p * C]`` -> ``[B, C, height * p, width * p]``."""
    patch_size = _check_patch_size(patch_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [batch, patches, p * p * C], got {getattr(x, 'shape', x)!r}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} (in patches) must be a positive int, got {value!r}")
    if x.shape[1] != height * width:
        raise ValueError(f"x has {x.shape[1]} patches, but height * width = {height * width}")
    if x.shape[2] % (patch_size * patch_size):
        raise ValueError(f"x rows hold {x.shape[2]} values, not a multiple of patch_size**2 = {patch_size**2}")
    return reference.unpatchify(x, patch_size, height, width)
