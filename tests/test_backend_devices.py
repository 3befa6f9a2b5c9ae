"""Which backend runs on which CUDA device: ``auto`` never picks kernels that cannot run on the tensors' GPU.

Triton 3.6+ compiles for compute capability 8.0 and newer; the compiled extension holds code for the archs it was
built for (plus PTX for newer ones), or none at all when no CUDA toolkit was found at install time. Without a GPU
here, the device's answers are stood in for (capability, ROCm build, the extension's probe); the GPU test asks
the real device.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mimkernels
from mimkernels import _backend

HAS_EXTENSION = _backend._HAS_EXTENSION  # built, and loads with this torch
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built here")
CUDA0 = torch.device("cuda", 0)


def _stand_in_gpu(monkeypatch, capability, *, extension_runs=True, rocm=False):
    """cuda:0 answers as a GPU of ``capability``; ``extension_runs``: the extension's probe answers this (None:
    the extension was built without CUDA code, so its probe op does not exist)."""
    from mimkernels import extension  # noqa: F401  (registers torch.ops.mimkernels.*)

    monkeypatch.setattr(_backend, "_CUDA_DEVICE_PROBLEMS", {})
    monkeypatch.setattr(_backend, "_HAS_TRITON", True)
    monkeypatch.setattr(_backend, "_HAS_EXTENSION", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Stand-in GPU")
    monkeypatch.setattr(torch.version, "hip", "6.4" if rocm else None)
    probe = None if extension_runs is None else (lambda index: extension_runs)
    monkeypatch.setattr(torch.ops.mimkernels, "has_cuda_kernels_for", probe, raising=False)


def _auto_choice():
    return _backend.select("gather_rows", CUDA0, implemented=("extension", "triton"))


@needs_extension
@pytest.mark.parametrize("capability, extension_runs, rocm, chosen, why_not", [
    ((9, 0), True, False, "extension", {}),
    ((8, 6), None, False, "triton", {"extension": "built without CUDA code"}),
    ((10, 0), False, False, "triton", {"extension": r"no code for cuda:0 \(compute capability 10.0\)"}),
    ((7, 5), True, False, "extension", {"triton": r"compute capability 8.0 and newer; cuda:0 \(Stand-in GPU\) is 7.5"}),
    ((7, 0), False, False, "torch", {"triton": "is 7.0", "extension": "TORCH_CUDA_ARCH_LIST naming 7.0"}),
    ((9, 4), True, True, "torch", {"triton": "ROCm build", "extension": "ROCm build"}),
])
def test_auto_skips_kernels_the_gpu_cannot_run(monkeypatch, capability, extension_runs, rocm, chosen, why_not):
    """``auto`` takes the first backend that runs on the device; one asked for by name that cannot run raises,
    saying why."""
    _stand_in_gpu(monkeypatch, capability, extension_runs=extension_runs, rocm=rocm)
    assert _auto_choice() == chosen
    for backend in ("triton", "extension"):
        reason = _backend._why_not(backend, CUDA0)
        if backend not in why_not:
            assert reason is None
            continue
        assert reason is not None
        with mimkernels.use_backend(backend), pytest.raises(RuntimeError, match=why_not[backend]):
            _auto_choice()


@needs_extension
def test_the_device_is_probed_once(monkeypatch):
    calls = []
    _stand_in_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(torch.ops.mimkernels, "has_cuda_kernels_for", lambda index: calls.append(index) or False)
    for _ in range(3):
        assert _auto_choice() == "triton"
    assert calls == [0]


@needs_extension
def test_device_check_traces_into_a_compiled_graph(monkeypatch):
    """torch.compile(fullgraph=True) calls the device check once while tracing (no graph break) and keeps its
    answer, as it keeps the backend in force."""
    _stand_in_gpu(monkeypatch, (7, 5), extension_runs=False)

    def choose(x):
        return x + len(_auto_choice())  # "torch": neither the extension nor Triton runs on this stand-in

    compiled = torch.compile(choose, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.full((2,), float(len("torch"))))


@pytest.mark.skipif(not HAS_EXTENSION or not hasattr(torch.ops.mimkernels, "has_cuda_kernels_for"),
                    reason="the compiled extension has no CUDA code here")
def test_extension_probe_answers_for_devices_that_do_not_exist():
    assert torch.ops.mimkernels.has_cuda_kernels_for(-1) is False
    assert torch.ops.mimkernels.has_cuda_kernels_for(torch.cuda.device_count()) is False


@pytest.mark.gpu
def test_this_gpu_runs_the_kernels_it_was_built_for():
    """On the GPU machine (sm_90, the extension built there): Triton and the extension both run."""
    device = torch.device("cuda", torch.cuda.current_device())
    assert _backend._why_not("triton", device) is None
    if HAS_EXTENSION and hasattr(torch.ops.mimkernels, "has_cuda_kernels_for"):
        assert torch.ops.mimkernels.has_cuda_kernels_for(device.index) is True
        assert _backend._why_not("extension", device) is None
        assert "extension" in mimkernels.available_backends()


# A stand-in for an extension built against another torch: found where it is installed, fails when loaded, as
# torch extensions do after a torch upgrade.
_STALE_EXTENSION = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys, warnings

    class StaleLibrary(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name == "mimkernels._C" else None

        def create_module(self, spec):
            raise ImportError("mimkernels/_C.so: undefined symbol: _ZN3c104cuda19CUDAErrorLogCaptureC1Ev")

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, StaleLibrary())
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        import mimkernels
        from mimkernels import _backend
    print("WARNINGS", json.dumps([str(w.message) for w in caught if "mimkernels._C" in str(w.message)]))
    print("BACKENDS", json.dumps(mimkernels.available_backends()))
    x = torch.randn(2, 6, 4, requires_grad=True)
    kept = mimkernels.random_masking(x, 0.5, noise=torch.rand(2, 6)).x_kept  # runs: auto takes another backend
    kept.sum().backward()
    print("RAN", tuple(kept.shape), tuple(x.grad.shape))
    try:
        with mimkernels.use_backend("extension"):
            mimkernels.random_masking(x, 0.5, noise=torch.rand(2, 6))
    except RuntimeError as error:
        print("NAMED", error)
""")


def test_an_extension_that_does_not_load_is_left_out_with_a_warning():
    """An extension built against another torch (after ``pip install -U torch``) fails to load with "undefined
    symbol": ``import mimkernels`` still works, warns once saying how to rebuild, ``auto`` runs the other backends,
    and naming ``extension`` raises with the loader's error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _STALE_EXTENSION], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    warned = json.loads(lines["WARNINGS"])
    assert len(warned) == 1, warned
    assert "does not load with this torch" in warned[0] and "pip install --no-build-isolation -e ." in warned[0]
    assert "undefined symbol" in warned[0]
    assert "extension" not in json.loads(lines["BACKENDS"])
    assert lines["RAN"] == "(2, 3, 4) (2, 6, 4)"
    assert "does not load with this torch" in lines["NAMED"] and "undefined symbol" in lines["NAMED"]
