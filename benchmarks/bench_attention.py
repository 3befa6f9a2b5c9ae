"""Attention against what users would run instead (GPU only): prefix-causal (AIM) and full (MAE) shapes.

Providers, all timed in this process on the same inputs. Prefix-causal shapes:
  mimkernels          mimkernels.prefix_causal_attention (Triton; deterministic backward, the default)
  mimkernels_nondet   the same with deterministic=False (the atomic-dQ backward where the tile table measured it
                      faster; for causal attention, PyTorch's SDPA)
  mimkernels_stored_ds  the same with kernels.STORED_DS on for the whole step (dK/dV stores dS, dQ is one matmul
                      per tile pair from it; the table's tiles for it where it has them, else the dK/dV tile and
                      STORED_DS_DQ_TILE; equal to mimkernels where the table chose it)
  mimkernels_centred_keys  the same with ops.attention.CENTRE_KEYS on (each sample and head's mean key subtracted
                      first: the price of that pass)
  mimkernels_centred_dq  the same with CENTRE_KEYS "dq" (the keys' shared part taken out of dQ inside the backward
                      kernels: the price of that correction)
  sdpa_dense_mask     SDPA with the dense bool mask built per call, as apple/ml-aim does
  flex+block_mask     FlexAttention (compiled) including create_block_mask for the batch's prefixes
  flex                FlexAttention with the block mask built beforehand
  sdpa_causal         SDPA is_causal=True (flash backend): same FLOP class, no prefix
  mimkernels_causal   mimkernels.attention(causal=True) on the same q, k, v: ours against sdpa_causal on one mask
                      (deterministic=False routes causal attention to SDPA while this measures slower)
  flash_attn_causal   FlashAttention causal, where the flash_attn package is installed
Full-attention shapes: mimkernels (mimkernels.attention), mimkernels_nondet, mimkernels_stored_ds,
mimkernels_centred_keys, mimkernels_centred_dq, and SDPA as it dispatches by default (sdpa) and forced to each fused
backend (sdpa_flash, sdpa_cudnn, sdpa_efficient).

TFLOP/s count visible pairs only (each provider's own mask); roofline % per benchmarks/common.py. The issue's
targets are printed last as met / missed (never asserted), with the peak memory of one fwd+bwd per provider.

    python -m benchmarks.bench_attention [--quick] [--modes fwd bwd fwd_bwd] [--shapes ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys

import torch
import torch._dynamo
import torch._functorch.config
import torch.nn.functional as F

import mimkernels
from benchmarks import common
from mimkernels.ops import attention as attention_ops
from mimkernels.triton import attention as attention_kernels

# name: (batch, heads, seq_len, head_dim, mask) with mask "prefix" (per-sample prefix in [1, N)) or "full"
SHAPES = {
    "aim_600m": (64, 12, 256, 128, "prefix"),
    "aim_3b": (32, 24, 256, 128, "prefix"),
    "vit_b_n257": (128, 12, 257, 64, "prefix"),
    "vit_h_n257": (64, 16, 257, 80, "prefix"),
    "n1024": (16, 16, 1024, 128, "prefix"),
    "n4096": (4, 16, 4096, 128, "prefix"),
    "mae_encoder": (256, 16, 50, 64, "full"),
    "mae_decoder": (256, 16, 197, 32, "full"),
    "vit_b": (256, 12, 197, 64, "full"),
    # MAE ViT-H/14's encoder: 64 of 256 patches kept, plus the cls token; D = 1280 / 16 = 80 (padded to 128 in a tile)
    "mae_h_encoder": (256, 16, 65, 80, "full"),
}
# fwd_bwd_graph: the same fwd+bwd as fwd_bwd, timed as GPU time in a replayed CUDA graph (common.graphed)
MODES = ("fwd", "bwd", "fwd_bwd", "fwd_bwd_graph")
FLOPS_PER_PAIR_AND_DIM = {"fwd": 4, "bwd": 10, "fwd_bwd": 14, "fwd_bwd_graph": 14}  # 2 matmuls forward, 5 backward
TENSORS_MOVED = {"fwd": 4, "bwd": 8, "fwd_bwd": 12, "fwd_bwd_graph": 12}  # q k v o | q k v o dO dq dk dv | both


def visible_pairs(seq_len: int, prefix: torch.Tensor) -> int:
    """Number of (query, key) pairs the prefix-causal mask lets through, summed over the batch."""
    rows = torch.arange(seq_len, device=prefix.device)
    per_row = torch.maximum(rows[None, :] + 1, prefix.clamp(0, seq_len)[:, None])
    return int(per_row.sum())


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _sdpa_backend(name):
    """A context that forces SDPA onto one fused backend, or None where this torch lacks it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name, None)
    return None if backend is None else (lambda: sdpa_kernel(backend))


# providers that are mimkernels with a selectable path switched on for the whole step (a switch may be read where
# the backward runs, so it stays on while the step is timed): name -> (module, attribute, value)
SWITCHED_PROVIDERS = {"mimkernels_stored_ds": (attention_kernels, "STORED_DS", True),
                      "mimkernels_centred_keys": (attention_ops, "CENTRE_KEYS", True),
                      "mimkernels_centred_dq": (attention_ops, "CENTRE_KEYS", "dq")}


def switched(provider: str):
    """``provider``'s switch on (SWITCHED_PROVIDERS) inside the block; nothing for the others."""
    return common.provider_switch(SWITCHED_PROVIDERS, provider)


def providers(q, k, v, prefix, with_flex=True):
    """name -> (callable giving the output, prefix it attends with for FLOP counting). ``prefix`` is an integer
    tensor [B] (prefix-causal shapes) or the int N (full attention)."""
    batch, _, seq_len, _ = q.shape
    if not isinstance(prefix, torch.Tensor):  # full attention
        found = {
            "mimkernels": (lambda: mimkernels.attention(q, k, v), prefix),
            "mimkernels_nondet": (lambda: mimkernels.attention(q, k, v, deterministic=False), prefix),
            "mimkernels_stored_ds": (lambda: mimkernels.attention(q, k, v), prefix),
            "mimkernels_centred_keys": (lambda: mimkernels.attention(q, k, v), prefix),
            "mimkernels_centred_dq": (lambda: mimkernels.attention(q, k, v), prefix),
            "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v), prefix),
        }
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            context = _sdpa_backend(name) if q.is_cuda else None
            if context is not None:
                def forced(context=context):
                    with context():
                        return F.scaled_dot_product_attention(q, k, v)
                found["sdpa_" + name.split("_")[0].lower()] = (forced, prefix)
        return found
    found = {
        "mimkernels": (lambda: mimkernels.prefix_causal_attention(q, k, v, prefix), prefix),
        "mimkernels_nondet": (lambda: mimkernels.prefix_causal_attention(q, k, v, prefix, deterministic=False),
                              prefix),
        "mimkernels_stored_ds": (lambda: mimkernels.prefix_causal_attention(q, k, v, prefix), prefix),
        "mimkernels_centred_keys": (lambda: mimkernels.prefix_causal_attention(q, k, v, prefix), prefix),
        "mimkernels_centred_dq": (lambda: mimkernels.prefix_causal_attention(q, k, v, prefix), prefix),
        "sdpa_dense_mask": (lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mimkernels.prefix_causal_mask(seq_len, prefix)), prefix),
    }
    try:
        flex_attention, create_block_mask = _flex() if with_flex else (None, None)
    except ImportError:
        flex_attention = None
    if flex_attention is not None:
        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (kv_idx < prefix[b])

        def build():
            return create_block_mask(prefix_lm, batch, None, seq_len, seq_len, device=q.device)

        prebuilt = build()
        found["flex+block_mask"] = (lambda: flex_attention(q, k, v, block_mask=build()), prefix)
        found["flex"] = (lambda: flex_attention(q, k, v, block_mask=prebuilt), prefix)
    no_prefix = torch.zeros_like(prefix)
    found["sdpa_causal"] = (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), no_prefix)
    found["mimkernels_causal"] = (lambda: mimkernels.attention(q, k, v, causal=True), no_prefix)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        pass
    else:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        found["flash_attn_causal"] = (lambda: flash_attn_func(qt, kt, vt, causal=True), no_prefix)
    return found


def _relative_error(fn, expected: torch.Tensor) -> float:
    """A provider's forward against the expected output: a wrong answer is not timed."""
    with torch.no_grad():
        got = fn().float()
    return ((got - expected).norm() / expected.norm()).item()


def _timed(fn, mode, q, k, v, grad_out, quick):
    timing = {"quick": quick, "device": q.device.type}
    if mode == "fwd":
        return common.time_ms(fn, **timing)
    if mode == "bwd":
        out = fn()
        return common.time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True), **timing)
    return common.time_ms(lambda: torch.autograd.grad(fn(), (q, k, v), grad_out), graph=common.graphed(mode),
                          **timing)


def _peak_mib(fn, q, k, v, grad_out) -> float:
    """Peak memory of one fwd+bwd above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(), (q, k, v), grad_out)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run(shapes, modes, dtype, quick, peaks, csv_path=None, *, device="cuda", batch=None, with_flex=True,
        memory=None, table=None):
    """Time every provider on every shape; the CSV is rewritten after each shape, so a cut-off run keeps its rows.

    ``memory``, a dict, receives {(shape, provider): peak MiB of one fwd+bwd} (GPU only).
    ``device="cpu"`` with a small ``batch`` (and ``table`` of shapes) only exercises the harness (tests): its
    times mean nothing.
    """
    rows = []
    if with_flex:
        # Flex compiles once per shape; past Dynamo's recompile limit it would silently run eagerly (dense, slow),
        # and its compiled backward donates buffers, which the bwd-only timing (retain_graph) cannot reuse.
        torch._functorch.config.donated_buffer = False
    for name in shapes:
        if with_flex:
            torch._dynamo.reset()
        samples, heads, seq_len, head_dim, mask = (table or SHAPES)[name]
        samples = batch or samples
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(samples, heads, seq_len, head_dim, device=device, dtype=dtype, generator=gen)
                   .requires_grad_() for _ in range(3))
        grad_out = torch.randn_like(q)
        if mask == "prefix":
            prefix = torch.randint(1, seq_len, (samples,), device=device, generator=gen)
        else:
            prefix = seq_len
        shape = f"{name}:B{samples}xH{heads}xN{seq_len}xD{head_dim}"
        min_bytes = q.numel() * q.element_size()
        with torch.no_grad():
            expected = mimkernels.attention(q, k, v, prefix_len=prefix).float()
        for provider, (fn, attended_prefix) in providers(q, k, v, prefix, with_flex).items():
            if attended_prefix is prefix and (error := _relative_error(fn, expected)) > 2e-2:
                print(f"  {shape} {provider}: skipped, its output differs from mimkernels' by {error:.2e} (relative)")
                continue
            counted = attended_prefix if isinstance(attended_prefix, torch.Tensor) else \
                torch.full((samples,), attended_prefix, device=device)
            pairs = visible_pairs(seq_len, counted) * heads
            for mode in modes:
                if provider == "flex+block_mask" and mode in ("bwd", "fwd_bwd_graph"):
                    continue  # the block mask is built in the forward only; building it is host work, not graphed
                try:
                    with switched(provider):
                        times = _timed(fn, mode, q, k, v, grad_out, quick)
                except Exception as err:  # a baseline that cannot run this shape is reported, not fatal
                    print(f"  {shape} {provider} {mode}: skipped ({type(err).__name__}: {str(err)[:120]})")
                    continue
                rows.append(common.result("attention", provider, mode, shape, str(dtype)[6:], times,
                                          FLOPS_PER_PAIR_AND_DIM[mode] * pairs * head_dim,
                                          TENSORS_MOVED[mode] * min_bytes, peaks))
                print(f"  {shape:34s} {provider:18s} {mode:13s} {times[0]:8.3f} ms  {rows[-1].tflops:6.1f} TFLOP/s  "
                      f"{rows[-1].roofline_pct:5.1f}% roofline", flush=True)
            if memory is not None and device == "cuda":
                with contextlib.suppress(Exception), switched(provider):
                    memory[name, provider] = _peak_mib(fn, q, k, v, grad_out)
        if csv_path:
            common.write_csv(csv_path, rows, device)
        del q, k, v, grad_out, expected
    return rows


# The targets: (shapes, mode, baseline provider, least speedup of mimkernels over it). A speedup below 1
# is a cap on our time relative to the baseline's (0.87: at most 1.15x the baseline's time).
SPEEDUP_TARGETS = [
    (("aim_600m", "aim_3b"), "fwd_bwd", "sdpa_dense_mask", 1.5),
    (("aim_600m", "aim_3b"), "fwd_bwd", "flex", 2.0),
    (("aim_600m", "aim_3b"), "fwd_bwd", "flex+block_mask", 10.0),
    (("aim_600m", "aim_3b"), "fwd_bwd", "sdpa_causal", 1 / 1.15),
    (("n1024", "n4096"), "fwd_bwd", "flex", 1.15),
    (("n1024", "n4096"), "fwd_bwd", "sdpa_dense_mask", 2.5),
    (("vit_b_n257", "vit_h_n257"), "fwd_bwd", "sdpa_dense_mask", 2.0),
    (("vit_b_n257", "vit_h_n257"), "fwd_bwd", "flex", 1.2),
    (("mae_encoder", "mae_decoder", "vit_b"), "fwd_bwd", "sdpa", 1.0),
    (("mae_encoder", "mae_decoder", "vit_b"), "fwd", "sdpa", 1.0),
]
RATE_TARGETS = [("n4096", "fwd", 500.0), ("n4096", "bwd", 380.0)]  # TFLOP/s over visible pairs


def targets(rows: list[common.Result], memory: dict, provider: str = "mimkernels") -> list[str]:
    """One line per target and shape: measured value, target, met / missed (nothing is asserted). Each speedup
    target is checked per call and, where the mode has a GPU-time twin (fwd_bwd_graph), on GPU time too."""
    by = {(r.shape.split(":")[0], r.provider, r.mode): r for r in rows}
    timed = [(shapes, timing, baseline, least) for shapes, mode, baseline, least in SPEEDUP_TARGETS
             for timing in ((mode, f"{mode}_graph") if f"{mode}_graph" in MODES else (mode,))]
    lines = [f"== targets for {provider}", *common.speedup_target_lines(rows, timed, provider)]
    for shape, mode, rate in RATE_TARGETS:
        if (row := by.get((shape, provider, mode))) is not None:
            verdict = "met" if row.tflops >= rate else "MISSED"
            lines.append(f"{shape:12s} {mode:13s} {row.tflops:6.1f} TFLOP/s (target >= {rate:.0f})  {verdict}")
    for shape in dict.fromkeys(s for s, _ in memory):
        if (shape, provider) in memory and (shape, "flex") in memory:
            ours, flex = memory[shape, provider], memory[shape, "flex"]
            verdict = "met" if ours <= flex * 1.001 else "MISSED"
            lines.append(f"{shape:12s} peak fwd+bwd {ours:7.0f} MiB vs flex {flex:7.0f} MiB  {verdict}")
    return lines


# Where deterministic=False could hand a mask to SDPA: (mask, shapes, our provider, SDPA's provider on that mask)
ROUTING_EVIDENCE = [
    ("causal", ("aim_600m", "aim_3b"), "mimkernels_causal", "sdpa_causal"),
    ("full", ("mae_encoder", "mae_decoder", "vit_b", "mae_h_encoder"), "mimkernels", "sdpa"),
]


def routing(rows: list[common.Result], device: str = "cuda") -> list[str]:
    """Whether ``deterministic=False``'s choice between our kernels and SDPA (ops/attention.py,
    ``_sdpa_measured_faster``) agrees with this run's GPU time (fwd_bwd_graph) on each mask and shape."""
    from mimkernels.ops.attention import _sdpa_measured_faster

    by = {(r.shape.split(":")[0], r.provider, r.mode): r for r in rows}
    lines = ["== deterministic=False: our kernels or SDPA, against this run's GPU time (fwd_bwd_graph)"]
    for mask, shapes, ours, sdpa in ROUTING_EVIDENCE:
        for shape in shapes:
            mine, theirs = by.get((shape, ours, "fwd_bwd_graph")), by.get((shape, sdpa, "fwd_bwd_graph"))
            if mine is None or theirs is None:
                continue
            _, heads, seq_len, head_dim, _ = SHAPES[shape]
            q = torch.empty(1, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16)
            routed = _sdpa_measured_faster(q, 0 if mask == "causal" else seq_len, deterministic=False)
            speedup = theirs.ms_p50 / mine.ms_p50
            verdict = "agrees" if (speedup < 1) == routed else "DISAGREES"
            lines.append(f"{shape:12s} {mask:6s} ours {speedup:5.2f}x {sdpa:12s} -> routed to "
                         f"{'SDPA' if routed else 'ours':4s}  {verdict}")
    return lines


def floors(shapes, peaks: common.Peaks) -> list[str]:
    """The two lower bounds per shape and mode (FLOPs over peak rate, minimal bytes over bandwidth), no GPU needed.

    Uses the benchmark's own batch and a uniform prefix drawn with the same seed on the CPU.
    """
    lines = [f"{'shape':34s} {'mode':8s} {'GFLOP':>7s} {'MB':>7s} {'compute ms':>10s} {'memory ms':>9s}  bound"]
    for name in shapes:
        batch, heads, seq_len, head_dim, mask = SHAPES[name]
        prefix = torch.randint(1, seq_len, (batch,), generator=torch.Generator().manual_seed(0))
        if mask == "full":
            prefix = torch.full((batch,), seq_len)
        pairs = visible_pairs(seq_len, prefix) * heads
        for mode in MODES:
            flops = FLOPS_PER_PAIR_AND_DIM[mode] * pairs * head_dim
            megabytes = TENSORS_MOVED[mode] * batch * heads * seq_len * head_dim * 2 / 1e6  # 16-bit operands
            compute_ms, memory_ms = flops / peaks.tflops / 1e9, megabytes / peaks.gbps
            lines.append(f"{f'{name}:B{batch}xH{heads}xN{seq_len}xD{head_dim}':34s} {mode:8s} {flops / 1e9:7.0f} "
                         f"{megabytes:7.0f} {compute_ms:10.3f} {memory_ms:9.3f}  "
                         f"{'memory' if memory_ms > compute_ms else 'compute'}")
    return lines


def plot(rows: list[common.Result], path: str, device: str = "cuda") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    shapes = list(dict.fromkeys(r.shape for r in rows))
    names = list(dict.fromkeys(r.provider for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    width = 0.8 / len(names)
    for ax, mode in zip(axes[0], modes):
        for i, provider in enumerate(names):
            values = {r.shape: r.tflops for r in rows if r.mode == mode and r.provider == provider}
            ax.bar([s + i * width for s in range(len(shapes))], [values.get(s, 0) for s in shapes], width,
                   label=provider)
        ax.set_title(f"{mode} ({rows[0].dtype})")
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))], [s.split(":")[0] for s in shapes])
        ax.set_ylabel("TFLOP/s over visible pairs")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"prefix-causal attention on {common.device_name(device)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="prefix-causal attention benchmark (GPU)")
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--out", default=None, help="folder for the CSV and PNG (default: print only)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--floors", nargs=2, type=float, metavar=("TFLOPS", "GBPS"),
                        help="print the roofline floors for these peak rates and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if args.floors:
        print("\n".join(floors(args.shapes, common.Peaks(*args.floors))))
        return 0
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU: timings through the Triton interpreter would mean nothing")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    peaks = common.measure_peaks(args.quick)
    print(f"{torch.cuda.get_device_name()}: measured peaks {peaks.tflops:.0f} TFLOP/s bf16, {peaks.gbps:.0f} GB/s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    memory = {}
    rows = run(args.shapes, args.modes, dtype, args.quick, peaks, args.out and os.path.join(args.out, "attention.csv"),
               memory=memory)
    print("\n".join(common.speedups(rows)))
    for shape, provider in memory:
        print(f"memory {shape:12s} {provider:18s} {memory[shape, provider]:8.0f} MiB peak over one fwd+bwd")
    if args.out:
        with open(os.path.join(args.out, "attention_memory.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["shape", "provider", "peak_mib_fwd_bwd", "device", "commit"])
            for (shape, provider), mib in memory.items():
                writer.writerow([shape, provider, f"{mib:.1f}", common.device_name(), common.commit()])
    print("\n".join(targets(rows, memory) + targets(rows, memory, "mimkernels_nondet")
                    + targets(rows, memory, "mimkernels_stored_ds") + routing(rows)))
    if args.out and not args.no_plot:
        plot(rows, os.path.join(args.out, "attention.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
