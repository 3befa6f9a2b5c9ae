"""Launching Triton kernels with less host time: the compiled kernel is reused per argument specialisation.

``kernel[grid](*args)`` binds and specialises every argument in Python on every launch; on the H200 machine
that was about 0.1 ms per launch, and it left one attention fwd+bwd (4 launches) host-bound at 0.7-1.0 ms while
its kernels ran in 0.39 ms (benchmarks/results/nvidia-h200/2026-11-27-run4-*/profile_attention.txt). Here the
first launch per key goes through Triton, which compiles (or loads) the kernel and returns it; later launches
with the same key call the compiled kernel directly. The key holds at least everything Triton specialises on:
each tensor's dtype and 16-byte alignment, every other argument's value (so equal keys specialise equally under
any rule Triton has for ints and floats), every constexpr, the warps, stages and device. The key costs about 15 us
per launch on the 2-core test machine (benchmarks/test_host_overhead.py). Only Triton versions whose launch path
was read are trusted (``_TRUSTED``; 3.6 also ran on the H200); elsewhere, under the interpreter, while
torch.compile traces, or with MIMKERNELS_FAST_LAUNCH=0, every launch goes through Triton as usual.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .._backend import env_flag, triton_interpreted

# CompiledKernel[grid](*all args in signature order) as in these versions (3.9 read against 3.8: the same
# CompiledKernel.__getitem__ and the same kernel.run call at the end of JITFunction.run)
_TRUSTED = ("3.6.", "3.7.", "3.8.", "3.9.")
# FMA contraction on, as every kernel was measured and error-budgeted: Triton 3.9 warns that its default turns it off
# in 3.10 (TRITON_DEFAULT_FP_FUSION); TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
_COMPILED = {}  # key -> (CompiledKernel, the constexpr values in signature order)
_MAX_KEYS = 4096
_LAUNCHED = set()  # kernels that reached the fast path once (tests check that every launcher lines up)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids; ``triton.cdiv`` costs microseconds per host call (a ConstexprFunction)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1); plain Python, as :func:`cdiv`."""
    return 1 << (n - 1).bit_length()


def fast_launch_enabled() -> bool:
    # the variable first: a misspelt value is an error on every machine, not only where the rest holds
    return (env_flag("MIMKERNELS_FAST_LAUNCH", True) and triton.__version__.startswith(_TRUSTED)
            and not triton_interpreted())


_ENABLED = fast_launch_enabled()


def _specialisation(t) -> tuple:
    """What Triton specialises a tensor or tensor-descriptor argument on (besides values that do not change)."""
    if isinstance(t, TensorDescriptor):
        return "descriptor", t.base.dtype, tuple(t.block_shape), t.padding, getattr(t, "round_f32_to_tf32", False)
    return t.dtype, t.data_ptr() & 15


def _device_of(t) -> int:
    return (t.base if isinstance(t, TensorDescriptor) else t).get_device()


def launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, constexprs: dict, *, num_warps: int,
           num_stages: int) -> None:
    """``kernel[grid](*tensors, *scalars, **constexprs, num_warps=..., num_stages=..., **LAUNCH_OPTIONS)``, with the
    host work done once per key.

    The kernel's parameters are, in order: ``tensors`` (or TMA tensor descriptors), then ``scalars`` (ints,
    floats), then ``constexprs``. It runs on the GPU of ``tensors[0]`` (on its current stream), whichever GPU is
    current.
    """
    device = _device_of(tensors[0])
    if device >= 0 and device != torch.cuda.current_device():
        # Triton launches on the current GPU (its stream; the module loaded there), not on the tensors' one: on
        # another GPU the kernel would run unordered with the ops that wrote its inputs, or fault. PyTorch's own ops
        # switch to their tensors' GPU, so here too.
        with torch.cuda.device(device):
            launch(kernel, grid, tensors, scalars, constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    if torch.compiler.is_compiling():  # traced by Dynamo, which takes only its own launch options
        kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    if not _ENABLED:
        kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps, num_stages=num_stages, **LAUNCH_OPTIONS)
        return
    # Tensors by dtype and 16-byte alignment (what Triton specialises on; their addresses change every call), TMA
    # descriptors by dtype and block shape, the scalars by value: equal values specialise equally, whatever
    # Triton's rules for ints and floats are.
    key = (id(kernel), device, num_warps, num_stages, *constexprs.values(), *scalars, *map(_specialisation, tensors))
    cached = _COMPILED.get(key)
    if cached is None:
        if len(_COMPILED) > _MAX_KEYS:  # e.g. a float argument that changes every call: stay bounded
            _COMPILED.clear()
        compiled = kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps, num_stages=num_stages,
                                **LAUNCH_OPTIONS)
        tail = kernel.arg_names[len(tensors) + len(scalars):]
        if sorted(tail) == sorted(constexprs):  # else: keep launching through Triton
            _COMPILED[key] = compiled, tuple(constexprs[name] for name in tail)
            _LAUNCHED.add(kernel)
        return
    compiled, tail_values = cached
    compiled[(*grid, 1, 1)[:3]](*tensors, *scalars, *tail_values)


_CAPABILITY = {}  # torch device -> compute capability as one int (90), or 0 off CUDA


def compute_capability(device: torch.device) -> int:
    if device not in _CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
        _CAPABILITY[device] = 10 * major + minor
    return _CAPABILITY[device]


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can be read and written through TMA tensor descriptors: a Hopper or newer GPU (or the
    interpreter, for the tests), non-empty, 16-byte aligned addresses and strides, a unit last stride."""
    device = tensors[0].device
    if device.type == "cuda":
        if compute_capability(device) < 90:
            return False
    elif not triton_interpreted():
        return False
    for t in tensors:
        *outer, last = t.stride()
        elements_per_16_bytes = 16 // t.element_size()
        if last != 1 or t.data_ptr() & 15 or t.numel() == 0 or any(s % elements_per_16_bytes for s in outer):
            return False
    return True


# TensorDescriptor checks its arguments on construction (about 3 us on the test machine; up to 15 per attention
# fwd+bwd). tma_usable has made those checks and the block shapes are the tile tables' powers of 2, so descriptors
# are built from their fields directly where the class is the plain dataclass this was written against (Triton
# 3.6-3.8: these four fields without defaults, the rest with); otherwise through from_tensor.
_DESCRIPTOR_FIELDS = dataclasses.fields(TensorDescriptor) if dataclasses.is_dataclass(TensorDescriptor) else ()
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in _DESCRIPTOR_FIELDS if f.default is not dataclasses.MISSING}
_DESCRIPTOR_FAST = {f.name for f in _DESCRIPTOR_FIELDS if f.name not in _DESCRIPTOR_DEFAULTS} == {
    "base", "shape", "strides", "block_shape"} and "__post_init__" in vars(TensorDescriptor)


def tensor_descriptor(t: torch.Tensor, block_shape: list) -> TensorDescriptor:
    """``TensorDescriptor.from_tensor(t, block_shape)`` for a tensor that :func:`tma_usable` accepted."""
    if not _DESCRIPTOR_FAST:
        return TensorDescriptor.from_tensor(t, block_shape)
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=t, shape=t.shape, strides=t.stride(), block_shape=block_shape)
    return desc
