"""Timing and provenance shared by the demo (``python -m mimkernels``) and the repository's benchmarks.

Lives in the package so that an installed wheel times its kernels the same way the benchmarks do.
"""
from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def time_ms(fn, *, quick: bool = False, device: str = "cuda", graph: bool = False) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn()`` in ms.

    On a GPU: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed between calls), so a call
    whose host work outlasts its kernels is timed by its host work. ``graph=True``: the GPU time alone, with
    ``triton.testing.do_bench_cudagraph`` (calls captured back to back in one CUDA graph and replayed, no launch
    or Python time between kernels, L2 not flushed): what the call costs inside a step whose host runs ahead of the
    GPU. Elsewhere (only to exercise a harness, never to report) the wall-clock times of three calls.
    """
    if device != "cuda":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), min(times), max(times)
    import triton.testing

    if graph:
        p50, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100, quantiles=[0.5, 0.2, 0.8])
    else:
        p50, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


def commit() -> str:
    """The mimkernels commit these numbers come from.

    ``MIMKERNELS_COMMIT`` where set (a copied tree's own .git may be stale or absent); else the HEAD of the git
    checkout this package was imported from, with ``-dirty`` for uncommitted changes to tracked files; else
    ``"unknown"`` (an installed wheel). Never the repository that happens to enclose the working directory.
    """
    if os.environ.get("MIMKERNELS_COMMIT"):
        return os.environ["MIMKERNELS_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(_PACKAGE_ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != _PACKAGE_ROOT:
            return "unknown"  # installed into some other repository's tree (a venv inside a checkout)
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str = "cuda") -> str:
    return torch.cuda.get_device_name() if device == "cuda" else device


def provenance(device: str = "cuda") -> dict[str, str]:
    """Where a measurement was taken: device, torch, triton, commit, UTC timestamp."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version, "commit": commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
