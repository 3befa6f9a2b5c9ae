"""Masks reach Triton's CPU interpreter as bool arrays (TRITON_INTERPRET=1 only; compiled kernels are untouched).

The interpreter tags a comparison's result with its operands' type, so a scalar condition broadcast into a block
(``(cols < width) & (row < rows)``) reaches a masked load, store or atomic as an int32 array of 0 and 1. Triton
3.6-3.8 read such a mask as true where nonzero; 3.9's native load, store and atomics refuse it ("mask has
unsupported dtype"), which failed the demo's self-check and the tests on the CPU. The kernels are right as written
(compiled, the mask is int1), so the interpreter is handed the same mask as bool.
"""
import numpy as np
from triton.runtime import interpreter

_Builder = interpreter.InterpreterBuilder


def _as_bool(mask):
    # only a handle holding a non-bool array is changed (Triton 3.8's descriptor loads pass plain arrays)
    if isinstance(mask, interpreter.TensorHandle) and isinstance(mask.data, np.ndarray) and mask.data.dtype != np.bool_:
        return interpreter.TensorHandle(mask.data != 0, mask.dtype)
    return mask


def _load(self, ptrs, mask, *args, **kwargs):
    return _load.original(self, ptrs, _as_bool(mask), *args, **kwargs)


def _store(self, ptrs, value, mask, *args, **kwargs):
    return _store.original(self, ptrs, value, _as_bool(mask), *args, **kwargs)


def _atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
    return _atomic_rmw.original(self, op, ptr, val, _as_bool(mask), *args, **kwargs)


for _name, _wrapper in (("create_masked_load", _load), ("create_masked_store", _store),
                        ("create_atomic_rmw", _atomic_rmw)):
    _current = getattr(_Builder, _name)
    if getattr(_current, "__module__", None) != __name__:  # once, also if this module is loaded again
        _wrapper.original = _current
        setattr(_Builder, _name, _wrapper)
