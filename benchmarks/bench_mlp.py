"""A transformer MLP ``fc2(gelu(fc1(x)))``, GELU inside the GEMMs (mimkernels.gelu_mlp) against PyTorch (GPU).

The autocast situation of a training step: fp32 parameters and input rows, bf16 compute. Providers, all on the
same tensors in this process:
  torch_unfused      ``F.linear``, ``F.gelu``, ``F.linear`` under autocast (cuBLAS GEMMs, a GELU pass each way)
  torch_compiled     the same under torch.compile (Inductor; its GEMMs stay cuBLAS by default)
  mimkernels         gelu_mlp under autocast, auto backend
  mimkernels_triton  the same on the Triton kernels by name
  mimkernels_triton@<tile>  with ``--sweep``: each of ``mimkernels.triton.mlp.CANDIDATES`` (fwd_bwd only, the tile
                     in both GEMM kernels: fc1 + GELU forward, fc2's input gradient), the winner being what
                     ``CONFIGS[2]`` should hold on this GPU
fwd and fwd_bwd (gradients of x and all four parameters). TFLOP/s count the six GEMMs (2 x rows x width x hidden
each); GB/s count x, the output and the bf16 weights once (the GEMMs make this compute-bound).

    python -m benchmarks.bench_mlp [--quick] [--sweep] [--out DIR]
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

import mimkernels
from benchmarks import bench_models, common
from mimkernels.triton import mlp as mlp_kernels

# name -> (rows = batch x tokens, width, hidden, bias): MAE ViT-L encoder (B256, 50 tokens), AIM-600M trunk (B64,
# 256 tokens; no bias), ViT-B (B256, 197 tokens)
SHAPES = {"mae_vit_l": (256 * 50, 1024, 4096, True), "aim_600m": (64 * 256, 1536, 6144, False),
          "vit_b": (256 * 197, 768, 3072, True)}
MODES = ("fwd", "fwd_bwd")


def unfused(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def fused(*args):
    return mimkernels.gelu_mlp(*args)


def fused_triton(*args):
    with mimkernels.use_backend("triton"):
        return fused(*args)


@contextlib.contextmanager
def two_byte_tile(config):
    """gelu_mlp's 2-byte tile ``config`` (a CANDIDATES entry) in place of the shipped one, for the forward and the
    backward that run inside (a tile put back when the forward returns would leave the backward's GEMM on the shipped
    tile: run 10's sweep rows timed that mix)."""
    shipped = mlp_kernels.CONFIGS[2]
    mlp_kernels.CONFIGS[2] = config
    try:
        yield
    finally:
        mlp_kernels.CONFIGS[2] = shipped


def tile_name(config) -> str:
    return str(mlp_kernels.GemmTile(*config))


def providers(compile_backend="inductor"):
    return {"torch_unfused": unfused, "torch_compiled": torch.compile(unfused, backend=compile_backend),
            "mimkernels": fused, "mimkernels_triton": fused_triton}


def _step(fn, args, mode, grad, device, dtype, tile=None):
    """One timed call of ``mode``; ``tile``: a 2-byte tile for every gelu_mlp kernel it runs, backward included."""
    def forward():
        with torch.autocast(device, dtype=dtype):
            return fn(*args)
    inputs = [t for t in args if t is not None]
    call = forward if mode == "fwd" else lambda: torch.autograd.grad(forward(), inputs, grad)
    if tile is None:
        return call

    def with_tile():
        with two_byte_tile(tile):
            return call()
    return with_tile


def run(shapes, dtype, quick, peaks, csv_path=None, *, device="cuda", scale=1, compile_backend="inductor",
        sweep=False):
    """``dtype`` is autocast's (bf16; the CPU tests use fp16, which the interpreter multiplies right), ``scale``
    divides the rows and the widths, ``compile_backend`` compiles torch_compiled (CPU tests:
    aot_eager), ``sweep`` adds a fwd_bwd row per tile candidate."""
    rows_out = []
    for name in shapes:
        rows, width, hidden, bias = SHAPES[name]
        rows, width, hidden = (max(16, n // scale) for n in (rows, width, hidden))
        gen = torch.Generator(device=device).manual_seed(0)

        def param(*shape, fan_in, gen=gen):
            return (torch.randn(*shape, device=device, generator=gen) / fan_in ** 0.5).requires_grad_()

        x = torch.randn(rows, width, device=device, generator=gen).requires_grad_()
        args = (x, param(hidden, width, fan_in=width), param(hidden, fan_in=1) if bias else None,
                param(width, hidden, fan_in=hidden), param(width, fan_in=1) if bias else None)
        grad = torch.randn(rows, width, device=device, generator=gen).to(dtype)
        expected = _step(unfused, args, "fwd", None, device, dtype)().float()
        shape = f"{name}:R{rows}xD{width}xH{hidden}"
        label = "fp32+" + str(dtype).removeprefix("torch.")
        timed = {provider: (fn, None) for provider, fn in providers(compile_backend).items()}
        if sweep:
            timed.update({f"mimkernels_triton@{tile_name(c)}": (fused_triton, c) for c in mlp_kernels.CANDIDATES})
        for provider, (fn, tile) in timed.items():
            # a sweep candidate may not fit this GPU (shared memory): reported, the others timed
            outcome = bench_models.guarded(provider, None if "@" in provider else provider, _time_provider, provider,
                                           fn, tile, args, grad, expected, shape, label, (rows, width, hidden), quick,
                                           peaks, device, dtype)
            if isinstance(outcome, str):
                print(f"  {shape:32s} {provider:40s} failed: {outcome}", flush=True)
                continue
            rows_out += outcome
        if sweep:
            print(best_tile_line(name, shape, rows_out), flush=True)
        if csv_path:
            common.write_csv(csv_path, rows_out, device)
    return rows_out


def best_tile_line(name: str, shape: str, rows: list) -> str:
    """``  best tile <name>: <tile> <ms> ms (<x>x the shipped tile's time)``, from this shape's swept fwd_bwd rows
    (gpu_check.sh hands the AIM-600M winner to bench_models --mlp-tile)."""
    swept = [r for r in rows if r.shape == shape and r.mode == "fwd_bwd" and "@" in r.provider]
    shipped = [r for r in rows if r.shape == shape and r.mode == "fwd_bwd" and r.provider == "mimkernels_triton"]
    if not swept:
        return f"  best tile {name}: none (every candidate failed)"
    best = min(swept, key=lambda r: r.ms_p50)
    versus = f" ({shipped[0].ms_p50 / best.ms_p50:.2f}x the shipped tile's speed)" if shipped else ""
    return f"  best tile {name}: {best.provider.split('@')[1]} {best.ms_p50:.3f} ms{versus}"


def _time_provider(provider, fn, tile, args, grad, expected, shape, label, sizes, quick, peaks, device, dtype):
    """The provider's rows (fwd and fwd_bwd; a sweep candidate, ``tile``, fwd_bwd only), after checking its
    forward."""
    got = _step(fn, args, "fwd", None, device, dtype, tile)().float()  # a wrong answer is not timed
    torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())
    rows, width, hidden = sizes
    timed = []
    for mode in MODES:
        if "@" in provider and mode == "fwd":
            continue
        flops = (2 if mode == "fwd" else 6) * 2 * rows * width * hidden  # two GEMMs forward, four more backward
        min_bytes = 2 * (2 * rows * width + 2 * width * hidden) * (1 if mode == "fwd" else 2)
        times = common.time_ms(_step(fn, args, mode, grad, device, dtype, tile), quick=quick, device=device)
        row = common.result("gelu_mlp", provider, mode, shape, label, times, flops, min_bytes, peaks)
        print(f"  {shape:32s} {provider:40s} {mode:8s} {row.ms_p50:8.3f} ms  {row.tflops:6.0f} TFLOP/s  "
              f"{row.roofline_pct:5.1f}% of peak", flush=True)
        timed.append(row)
    return timed


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep = "--sweep" in argv
    if sweep:
        argv.remove("--sweep")
    return common.family_main(argv, "Transformer MLP benchmark (GELU inside the GEMMs)", SHAPES, run, "mlp.csv",
                              run_kwargs={"sweep": sweep})


if __name__ == "__main__":
    sys.exit(main())
