"""Which implementation runs an op: ``auto``, ``torch``, ``triton`` or ``extension``.

The default comes from the ``MIMKERNELS_BACKEND`` environment variable (``auto``
when unset); :func:`use_backend` overrides it for a block of code. A backend
asked for by name that cannot run raises; it never falls back silently. Under
``torch.jit.trace`` every op raises (:data:`TRACING_REFUSED` says why and what to use).

``extension`` is the compiled extension ``mimkernels._C`` (csrc/), which runs C++ on CPU tensors and CUDA on
CUDA tensors. Until 0.2 it was called ``cuda``; that name is still accepted, with a DeprecationWarning.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "extension")
RENAMED = {"cuda": "extension"}  # old name -> new name; the old names go in 0.3
ENV_VAR = "MIMKERNELS_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("mimkernels_backend", default=None)


def env_flag(name: str, default: bool | None) -> bool | None:
    """The on/off environment variable ``name`` (``1`` / ``0``, or true / false, yes / no, on / off in any case);
    ``default`` when unset or empty. Any other value raises ValueError naming the variable: a misspelt switch
    must not leave a feature silently off (or on)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (or true / false, yes / no, on / off), got {os.environ[name]!r}")


def _checked(name, what: str, stacklevel: int = 3) -> str:
    if name in RENAMED:
        warnings.warn(f"{what} {name!r} is deprecated and will be removed in mimkernels 0.3; "
                      f"use {RENAMED[name]!r} (the compiled extension)", DeprecationWarning, stacklevel=stacklevel)
        return RENAMED[name]
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@torch.compiler.assume_constant_result
def current_backend() -> str:
    """The backend name in force here: ``use_backend`` first, then the environment.

    torch.compile calls this once while tracing and bakes the answer into the graph (Dynamo of torch <= 2.11
    cannot trace ``ContextVar.get``): the backend in force when a function is compiled is the one it keeps.
    """
    name = _override.get()
    if name is not None:
        return name
    return _checked(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name``."""
    token = _override.set(_checked(name, "backend name", stacklevel=4))  # past contextlib, at the caller
    try:
        yield
    finally:
        _override.reset(token)


def triton_interpreted() -> bool:
    """True when mimkernels' Triton kernels were built for Triton's CPU interpreter.

    Triton decides when a kernel is defined, that is when mimkernels is imported: TRITON_INTERPRET=1
    must be set before that, and setting it later changes nothing.
    """
    return _TRITON_INTERPRETED


_EXTENSION_NOT_BUILT = "the compiled extension mimkernels._C is not built (pip install -e . with a CUDA toolkit)"


def _load_extension() -> str | None:
    """Load ``mimkernels._C`` (its static initialisers register ``torch.ops.mimkernels.*``): None if it loads, else
    why not. A library that is there but does not load (most often built against another torch: "undefined
    symbol") leaves the extension out with one warning, so that ``import mimkernels`` still works on the other
    backends; naming ``extension`` then raises with this reason."""
    if importlib.util.find_spec("mimkernels._C") is None:
        return _EXTENSION_NOT_BUILT
    try:
        importlib.import_module("mimkernels._C")
    except (ImportError, OSError, RuntimeError) as error:  # RuntimeError: a static initialiser's c10::Error
        reason = (f"the compiled extension mimkernels._C is installed but does not load with this torch "
                  f"({torch.__version__}), most likely because it was built against another one; rebuild it "
                  f"(pip install --no-build-isolation -e . in the source tree, or reinstall mimkernels). "
                  f"{type(error).__name__}: {str(error)[:300]}")
        warnings.warn(reason + ". Its ops run on the other backends until then.", RuntimeWarning, stacklevel=2)
        return reason
    return None


# Looked up once (triton is not imported: TRITON_INTERPRET must be set before it is), and kept as plain values so
# that torch.compile traces the backend choice without a graph break.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_EXTENSION_PROBLEM = _load_extension()
_HAS_EXTENSION = _EXTENSION_PROBLEM is None
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read before the kernels are defined


def _why_not(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _HAS_TRITON:
            return "the triton package is not installed"
        if device.type == "cuda":
            return _cuda_device_problem("triton", device.index)
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"Triton kernels need a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1; got device {device}"
    if not _HAS_EXTENSION:
        return _EXTENSION_PROBLEM or _EXTENSION_NOT_BUILT
    if device.type == "cuda":
        return _cuda_device_problem("extension", device.index)
    if device.type != "cpu":
        return f"the compiled extension runs on CPU and CUDA tensors; got device {device}"
    return None


_CUDA_DEVICE_PROBLEMS: dict[tuple[str, int], str | None] = {}  # (backend, device index) -> why not, or None


@torch.compiler.assume_constant_result
def _cuda_device_problem(backend: str, index: int | None) -> str | None:
    """None if ``backend``'s kernels run on CUDA device ``index``, else why not. Asked once per backend and device;
    torch.compile calls it while tracing and bakes the answer into the graph, as with :func:`current_backend`."""
    if index is None:
        index = torch.cuda.current_device()
    if (backend, index) not in _CUDA_DEVICE_PROBLEMS:
        _CUDA_DEVICE_PROBLEMS[backend, index] = _probe_cuda_device(backend, index)
    return _CUDA_DEVICE_PROBLEMS[backend, index]


def _probe_cuda_device(backend: str, index: int) -> str | None:
    if torch.version.hip is not None:  # AMD GPUs answer as "cuda" devices
        return f"the {backend} kernels are written and tested for NVIDIA GPUs; this torch is a ROCm build"
    major, minor = torch.cuda.get_device_capability(index)
    if backend == "triton":
        if major < 8:
            return (f"Triton 3.6+ supports NVIDIA GPUs of compute capability 8.0 and newer; cuda:{index} "
                    f"({torch.cuda.get_device_name(index)}) is {major}.{minor}")
        return None
    from . import extension  # noqa: F401  (loads the library, which registers its ops)

    has_cuda_kernels_for = getattr(torch.ops.mimkernels, "has_cuda_kernels_for", None)  # CUDA builds only
    if has_cuda_kernels_for is None:
        return ("the compiled extension was built without CUDA code (no CUDA toolkit was found when it was "
                "installed): its ops run on CPU tensors")
    if not has_cuda_kernels_for(index):
        return (f"the compiled extension has no code for cuda:{index} (compute capability {major}.{minor}): "
                f"reinstall it with this GPU visible, or with TORCH_CUDA_ARCH_LIST naming {major}.{minor}")
    return None


def available_backends() -> list[str]:
    """The backends this install can run here, e.g. ``["torch", "triton", "extension"]``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [name for name in BACKENDS[1:] if _why_not(name, device) is None]


# torch.jit.trace records what goes through PyTorch's dispatcher and no Triton launch (a traced graph would keep the
# kernels' empty outputs, not the kernels that fill them), and it hands the ops their sizes as tensors, which the
# checks and the references take for per-sample values: no backend traces right, so none is asked to.
TRACING_REFUSED = ("mimkernels.{op} cannot be recorded by torch.jit.trace (nor by torch.onnx.export(dynamo=False), "
                   "which traces): record the model with torch.export.export or torch.onnx.export(dynamo=True), which "
                   "take mimkernels' ops as custom ops, or trace the original model (a model patched by "
                   "mimkernels.integrations.apply runs its original code under torch.jit.trace)")


def select(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """The backend that runs ``op`` on ``device``; ``implemented`` lists what the op has besides torch."""
    if torch.jit.is_tracing():
        raise RuntimeError(TRACING_REFUSED.format(op=op))
    name = current_backend()
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("extension", "triton"):
                if candidate in implemented and _why_not(candidate, device) is None:
                    return candidate
        return "torch"
    if name != "torch" and name not in implemented:
        raise RuntimeError(f"{op} has no {name!r} implementation; it has: torch, {', '.join(implemented)}")
    reason = _why_not(name, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {name!r} cannot run here: {reason}")
    return name
