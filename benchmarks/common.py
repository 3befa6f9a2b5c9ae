"""What every benchmark family shares: timing, measured peaks, the CSV schema, the run's provenance."""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
from dataclasses import dataclass, fields

import torch

from mimkernels.timing import commit, device_name, provenance, time_ms  # noqa: F401  (the benchmarks' API)

CSV_FIELDS = ("kernel", "provider", "mode", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "tflops", "gbps",
              "roofline_pct", "device", "torch", "triton", "commit", "timestamp")


@dataclass(frozen=True)
class Peaks:
    tflops: float  # dense bf16 matmul, measured
    gbps: float  # device-to-device copy, bytes read + written, measured


def measure_peaks(quick: bool = False) -> Peaks:
    """The two ceilings of this GPU, measured now rather than taken from a datasheet."""
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = time_ms(lambda: a @ b, quick=quick)[0]
    src = torch.randn(2**28 // (4 if quick else 1), device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), quick=quick)[0]
    return Peaks(tflops=2 * n**3 / matmul_ms / 1e9, gbps=2 * src.numel() * 4 / copy_ms / 1e6)


@dataclass
class Result:
    kernel: str
    provider: str
    mode: str
    shape: str
    dtype: str
    ms_p50: float
    ms_p20: float
    ms_p80: float
    tflops: float
    gbps: float
    roofline_pct: float


def result(kernel, provider, mode, shape, dtype, times, flops, min_bytes, peaks: Peaks) -> Result:
    """A row with throughput and roofline % (the larger of the compute and memory fractions)."""
    p50, p20, p80 = times
    tflops = flops / p50 / 1e9
    gbps = min_bytes / p50 / 1e6
    roofline = 100 * max(tflops / peaks.tflops, gbps / peaks.gbps)
    return Result(kernel, provider, mode, shape, dtype, p50, p20, p80, tflops, gbps, roofline)


def print_memory_row(row: Result) -> None:
    """One timed row of a memory-bound benchmark: time, GB/s over its minimal bytes, % of the copy bandwidth."""
    print(f"  {row.shape:32s} {row.provider:18s} {row.mode:8s} {row.ms_p50:8.3f} ms  {row.gbps:7.0f} GB/s  "
          f"{row.roofline_pct:5.1f}% of copy", flush=True)


def write_csv(path: str, rows: list[Result], device: str = "cuda") -> None:
    run = provenance(device)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            values = {field.name: getattr(row, field.name) for field in fields(row)}
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()} | run)


@contextlib.contextmanager
def switched(module, name: str, value):
    """``module.name`` (a module-level switch, or an object's attribute) set to ``value`` inside the block, restored
    after: how the benchmarks time a selectable kernel path beside the default."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def provider_switch(switches: dict, provider: str):
    """``provider``'s switch (``switches``: provider -> (module, attribute, value)) on inside the block; nothing for
    a provider without one. Benchmarks hold it around the whole timed step: a switch may be read where the backward
    runs."""
    if provider not in switches:
        return contextlib.nullcontext()
    return switched(*switches[provider])


def graphed(mode: str) -> bool:
    """Whether ``mode`` is timed as GPU time (``fwd_bwd_graph``: the calls replayed in a CUDA graph) rather than per
    call: per call a short kernel sequence is timed by its host work; inside a training step whose host runs ahead
    of the GPU it costs its GPU time. The benchmarks report both; neither replaces the other."""
    return mode.endswith("_graph")


def time_mode(step, mode: str, label: str, *, quick: bool, device: str):
    """:func:`time_ms` of ``step`` for ``mode`` (per call, or GPU time where :func:`graphed`). None, with a line
    saying why, where a graphed call cannot be captured: the other rows of the run stand."""
    try:
        return time_ms(step, quick=quick, device=device, graph=graphed(mode))
    except Exception as error:
        if not graphed(mode):
            raise
        print(f"  {label} {mode}: FAILED, not timed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return None


def speedup_target_lines(rows: list[Result], targets, provider: str = "mimkernels") -> list[str]:
    """One line per target and measured shape: ``provider``'s speedup over the baseline, the target, met / MISSED
    (never asserted). ``targets``: (shape names, mode, baseline, least speedup); a shape name is the part of
    ``Result.shape`` before its first ``:``. Shapes or providers not measured give no line."""
    by = {(r.shape, r.provider, r.mode): r for r in rows}
    lines = []
    for names, mode, baseline, least in targets:
        for r in rows:
            if r.provider != provider or r.mode != mode or r.shape.split(":")[0] not in names:
                continue
            if (theirs := by.get((r.shape, baseline, mode))) is None:
                continue
            speedup = theirs.ms_p50 / r.ms_p50
            lines.append(f"{r.shape:34s} {mode:13s} vs {baseline:16s} {speedup:6.2f}x (target >= {least:.2f}x)  "
                         f"{'met' if speedup >= least else 'MISSED'}")
    return lines


def roofline_target_lines(rows: list[Result], targets, provider: str = "mimkernels") -> list[str]:
    """Like :func:`speedup_target_lines` for ``targets`` (shape names, mode, least roofline %): the larger of the
    FLOP and byte fractions of the measured peaks (:func:`result`)."""
    lines = []
    for names, mode, least in targets:
        for r in rows:
            if r.provider == provider and r.mode == mode and r.shape.split(":")[0] in names:
                lines.append(f"{r.shape:34s} {mode:13s} {r.roofline_pct:5.1f}% of roofline (target >= {least:.0f}%)  "
                             f"{'met' if r.roofline_pct >= least else 'MISSED'}")
    return lines


def speedups(rows: list[Result]) -> list[str]:
    """mimkernels' speed over each other provider, per shape and mode (>1: mimkernels is faster)."""
    ours = {(r.shape, r.mode): r.ms_p50 for r in rows if r.provider == "mimkernels"}
    lines = [f"{'shape':40s} {'mode':8s} {'baseline':18s} speedup"]
    for r in rows:
        if r.provider != "mimkernels" and (r.shape, r.mode) in ours:
            lines.append(f"{r.shape:40s} {r.mode:8s} {r.provider:18s} {r.ms_p50 / ours[r.shape, r.mode]:6.2f}x")
    return lines


def issue_targets(issue: int, speedup_targets, roofline_targets):
    """``targets(rows)`` for :func:`family_main`: a title naming the issue, then the speedup and roofline lines."""
    def targets(rows: list[Result]) -> list[str]:
        return [f"== targets for mimkernels (issue {issue})", *speedup_target_lines(rows, speedup_targets),
                *roofline_target_lines(rows, roofline_targets)]

    return targets


def family_main(argv, description: str, shapes: dict, run, csv_name: str, quick_run_kwargs=None,
                run_kwargs=None, targets=None) -> int:
    """The command line of a benchmark family: --quick, --shapes, --out; bf16; speedups printed last, then
    ``targets(rows)``'s lines where given."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller runs, fewer repeats")
    parser.add_argument("--shapes", nargs="+", choices=list(shapes), default=list(shapes))
    parser.add_argument("--out", default=None, help="folder for the CSV (default: print only)")
    parser.add_argument("--no-plot", action="store_true", help="accepted for the common runner")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{description} needs a CUDA GPU")
        return 0
    peaks = measure_peaks(args.quick)
    print(f"{device_name()}: measured peaks {peaks.tflops:.0f} TFLOP/s bf16, {peaks.gbps:.0f} GB/s copy")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    csv_path = args.out and os.path.join(args.out, csv_name)
    kwargs = {**((quick_run_kwargs or {}) if args.quick else {}), **(run_kwargs or {})}
    rows = run(args.shapes, torch.bfloat16, args.quick, peaks, csv_path, **kwargs)
    print("\n".join(speedups(rows) + (targets(rows) if targets else [])))
    return 0
