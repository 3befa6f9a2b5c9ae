"""pytest plugin for ``triton_cache warm --parts tests``: the ``gpu`` tests on CPU tensors, their kernels compiled.

Loaded with ``-p benchmarks.pretend_gpu_tests`` before tests/conftest.py is imported, it makes the process look like
one with an sm_90 GPU (``torch.cuda.is_available()`` and the few queries the tests make) and sends every tensor the
tests put on "cuda" to the CPU, where :func:`benchmarks.triton_cache.pretend_hopper` compiles each Triton kernel for
sm_90 and skips its launch. A skipped launch leaves its output unwritten, which the tests' checks would fail at
the first kernel, so the checks are off (run under ``python -O``, and ``torch.testing.assert_close`` does nothing):
each test runs on to its end and every kernel it launches is compiled with the specialisation it gets on the GPU.
Whether a test passes here says nothing about the code (its exceptions only say it stopped early). Run by
``triton_cache warm --parts tests``; MIMKERNELS_WARM_TRITON_KEY (set by ``warm``) is the GPU machine's
triton_key; unset, this Triton's own.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

# what runs on the CPU without meaning anything for the GPU's compile cache: Inductor's own code (C++ here, Triton
# there), CUDA graphs and streams, several GPUs, tensors past 2^31 elements
LEFT_OUT = ("test_compile.py", "test_large_tensors.py", "test_multi_gpu.py")
LEFT_OUT_WORDS = ("torch_compile", "inductor", "cuda_graph", "captures")

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("benchmarks.pretend_gpu_tests compiles real kernels: unset TRITON_INTERPRET")


def _on_the_cpu(device):
    """``device`` with every CUDA device replaced by the CPU (strings, torch.device and ints as torch takes them)."""
    if isinstance(device, int) and not isinstance(device, bool):  # a CUDA device index
        return "cpu"
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


class CudaOnTheCpu(TorchFunctionMode):
    """Every ``device=`` of a torch call, ``Tensor.to(device)`` and ``Tensor.cuda()`` land on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _on_the_cpu(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_on_the_cpu(arg) for arg in args)
        return func(*args, **kwargs)


def _pretend_cuda() -> None:
    """torch.cuda's queries answer as one sm_90 GPU would, its no-result calls do nothing, and CUDA autocast is the
    CPU's (the tensors are there)."""
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.get_device_capability = lambda device=None: (9, 0)
    cuda.get_device_name = lambda device=None: "pretend sm_90 (benchmarks.pretend_gpu_tests)"
    cuda.mem_get_info = lambda device=None: (80 << 30, 80 << 30)
    cuda.max_memory_allocated = lambda device=None: 0
    for name in ("synchronize", "set_device", "empty_cache", "reset_peak_memory_stats", "manual_seed",
                 "manual_seed_all"):
        setattr(cuda, name, lambda *args, **kwargs: None)
    cuda.device = lambda device=None: contextlib.nullcontext()
    autocast = torch.autocast

    class autocast_on_the_cpu(autocast):  # noqa: N801 (torch's name)
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    torch.autocast = autocast_on_the_cpu
    # with python -O (assert statements gone): a test goes on past the checks its skipped launches fail
    torch.testing.assert_close = lambda *args, **kwargs: None


_pretend_cuda()
from benchmarks import triton_cache  # noqa: E402 (after torch.cuda pretends: mimkernels reads it at import)

triton_cache.pretend_hopper(os.environ.get("MIMKERNELS_WARM_TRITON_KEY") or None)
CudaOnTheCpu().__enter__()  # for the whole process: pytest's fixtures and tests alike


def pytest_collection_modifyitems(config, items):
    kept = [item for item in items if "gpu" in item.keywords
            and os.path.basename(str(item.fspath)) not in LEFT_OUT
            and not any(word in item.name.lower() for word in LEFT_OUT_WORDS)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def pytest_report_header(config):
    return ("benchmarks.pretend_gpu_tests: a pretend sm_90 GPU on CPU tensors, every Triton launch skipped, checks "
            "off: kernels compiled for Triton's cache, no test verdict")
