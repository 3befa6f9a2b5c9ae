"""Argument checks shared by the ops: what counts as an int or a real number, and the unit-stride rule.

Each op words its own error (naming the argument and what it needed); these say only whether a value passes.
"""
from __future__ import annotations

import numbers

import torch


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or NumPy real number (ints included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its last dimension is contiguous (what the kernels read in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
