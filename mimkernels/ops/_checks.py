"""Argument checks shared by the ops (public to the package, tested once in tests/test_checks.py).

The predicates (``is_int``, ``is_real``) say only whether a value passes, and each op words its own error; the
``check_*`` functions raise themselves, naming the argument, for checks that read the same in every op.
"""
from __future__ import annotations

import numbers

import torch

from .._backend import env_flag

# Index values are checked on CUDA only when asked (the check syncs with the host); read once, at import:
# compiled code has no environment. Unchecked out-of-range ids never read or write outside the tensors.
CHECK_CUDA_INDICES = env_flag("MIMKERNELS_CHECK_INDICES", False)

# The dtypes the compute kernels (attention, MLP, norms, patch embedding) have tiles for; the ops take these on every
# backend, so what a model accepts does not change with the machine it runs on.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The floating dtypes the ops read where their values only pass through or are cast (tokens, images, biases, position
# embeddings): the kernel dtypes and float64 (references, tests). Not float8 (PyTorch's CPU ops cannot sum or sort
# it, so the backends disagreed) nor complex (a cast to real drops the imaginary part with only a warning).
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def kernels_take(*tensors: torch.Tensor) -> bool:
    """Whether the ops run on these tensors here: the kernels compute in each tensor's dtype (one of
    :data:`KERNEL_DTYPES`), and no ``torch.jit.trace`` is recording, which the ops refuse
    (``_backend.TRACING_REFUSED``). Callers that can run PyTorch's own code instead (a patched model after
    ``model.double()``, a float64 check of a model's numbers, or traced for a TorchScript or legacy ONNX export)
    take it where this is False; under autocast a float64 tensor stays float64, so the check holds there too."""
    return all(tensor.dtype in KERNEL_DTYPES for tensor in tensors) and not torch.jit.is_tracing()


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or NumPy real number (ints included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def patch_side(patch_numel: int, channels: int) -> int:
    """The side p of square patches holding ``patch_numel = p * p * channels`` values, or 0 if there is none.
    ``torch.sym_int`` of a float root, not ``math.isqrt``: torch.compile traces it on symbolic sizes
    (``dynamic=True``); a float64 root of a perfect square below 2^52 is exact, and the product is checked."""
    if channels < 1 or patch_numel % channels:  # images with no channel hold no patch
        return 0
    side = torch.sym_int((patch_numel // channels) ** 0.5)
    return side if side * side * channels == patch_numel else 0


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device``, or None where it is off. Meta tensors (shape
    inference, FLOP counting) have no autocast state, and torch raises when asked for one: None there."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def described(value) -> str:
    """A tensor's dtype and shape, or any other value's type name: what an error message says it got."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool; TypeError naming ``name`` otherwise (a string such as "false" is truthy, and 0 / 1
    usually mean something else by mistake)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_float_tensor(name: str, t) -> None:
    """``t`` is a tensor of one of :data:`FLOAT_DTYPES`; TypeError naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its last dimension is contiguous (what the kernels read in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_mask_values(name: str, mask: torch.Tensor) -> None:
    """A mask of patch weights (1 = masked) is bool, integer or real floating point: a complex one would lose its
    imaginary part, with only a warning, when cast to the fp32 the kernels read."""
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or real floating point, got {mask.dtype}")


def check_images(images, patch_size: int, name: str = "images") -> None:
    """``images`` is ``[B, C, H, W]`` floating point with H and W multiples of the patch size."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, channels, height, width], got shape {tuple(images.shape)}")
    check_float_tensor(name, images)
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"{name}: a height x width of {height}x{width} is not divisible by the patch size "
                         f"{patch_size}")


def check_index_tensor(name: str, ids, batch: int, device: torch.device, length: int | None = None) -> torch.Tensor:
    """``ids`` is an int32/int64 tensor ``[batch, length]`` (any length if None) on ``device``; returns it with a
    unit-stride last dimension. Checks the metadata only: ``check_distinct_indices`` checks the values."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != batch or (length is not None and ids.shape[1] != length):
        expected = f"[{batch}, {length if length is not None else 'K'}]"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the data are on {device}")
    return unit_stride(ids)


def check_distinct_indices(name: str, ids: torch.Tensor, upper: int, *, permutation: bool = False) -> None:
    """Values in ``[0, upper)``, distinct within each row (each row a permutation of ``0..upper-1`` if asked).

    Reads the values, so it syncs with the device: always on the CPU, on CUDA only with
    ``MIMKERNELS_CHECK_INDICES=1``, and never while torch.compile traces.
    """
    checked = ids.device.type == "cpu" or CHECK_CUDA_INDICES
    if not checked or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = ids.min().item(), ids.max().item()
    if low < 0 or high >= upper:
        raise IndexError(f"{name} values must lie in [0, {upper}), got values from {low} to {high}")
    ordered = ids.sort(dim=1).values
    if permutation and (ids.shape[1] != upper
                        or not torch.equal(ordered, torch.arange(upper, device=ids.device).expand_as(ordered))):
        raise ValueError(f"each row of {name} must be a permutation of 0..{upper - 1}")
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError(f"{name} repeats an index within a row; the kept indices must be distinct")
