"""Where one attention fwd+bwd spends its time: GPU time per kernel and host time per call (GPU only).

    python -m benchmarks.profile_attention [--shapes aim_600m mae_encoder] [--providers mimkernels sdpa]

A provider whose host time per call exceeds its GPU time is launch-bound: the GPU waits for Python.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks import bench_attention


def _fwd_bwd_step(shape: str, provider: str):
    """One fwd+bwd of ``provider`` on the bf16 inputs of bench_attention's ``shape``."""
    batch, heads, seq_len, head_dim, mask = bench_attention.SHAPES[shape]
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    prefix = torch.randint(1, seq_len, (batch,), device="cuda") if mask == "prefix" else seq_len
    fn = bench_attention.providers(q, k, v, prefix, with_flex=False)[provider][0]
    return lambda: torch.autograd.grad(fn(), (q, k, v), grad_out)


def profile(shape: str, provider: str, steps: int = 20) -> list[str]:
    step = _fwd_bwd_step(shape, provider)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host_ms = (time.perf_counter() - start) * 1e3 / steps  # enqueue time while the GPU keeps up
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    gpu_ms = sum(event.device_time_total for event in events) / steps / 1e3  # every kernel, memset and copy
    lines = [f"== {shape} {provider}: host {host_ms:.3f} ms/call to enqueue, wall {wall_ms:.3f} ms/call, "
             f"GPU {gpu_ms:.3f} ms/call"]
    for event in events[:8]:
        total = event.device_time_total
        if total:
            lines.append(f"   {total / steps / 1e3:8.4f} ms/call  x{event.count // steps:<3d} {event.key[:90]}")
    return lines


def host_profile(shape: str, provider: str = "mimkernels", steps: int = 50) -> str:
    """cProfile of ``steps`` fwd+bwd calls: where the host's enqueue time goes (top functions by own time)."""
    import cProfile
    import io
    import pstats

    step = _fwd_bwd_step(shape, provider)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return f"== host profile {shape} {provider}, {steps} fwd+bwd calls\n" + text.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(bench_attention.SHAPES),
                        default=["aim_600m", "mae_encoder"])
    parser.add_argument("--providers", nargs="+", default=["mimkernels", "sdpa", "sdpa_dense_mask"])
    parser.add_argument("--host", action="store_true", help="cProfile the host side of mimkernels' calls instead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_attention needs a CUDA GPU")
        return 0
    if args.host:
        for shape in args.shapes:
            print(host_profile(shape), flush=True)
        return 0
    for shape in args.shapes:
        for provider in args.providers:
            try:
                with bench_attention.switched(provider):  # a switched provider's path on while it is profiled
                    print("\n".join(profile(shape, provider)), flush=True)
            except KeyError:
                pass  # a provider that does not serve this mask kind
    return 0


if __name__ == "__main__":
    sys.exit(main())
