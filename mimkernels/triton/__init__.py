"""Triton kernels and their launchers, one module per op family."""
from .._backend import triton_interpreted

if triton_interpreted():
    from . import _interpreter_masks  # noqa: F401  (int32 masks handed to the interpreter as bool; see there)
