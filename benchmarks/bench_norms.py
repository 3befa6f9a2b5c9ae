"""The residual add + LayerNorm of a pre-norm block, fused (mimkernels.add_layer_norm) against PyTorch (GPU).

The autocast situation of a training step: the residual stream x is fp32, the branch (attention or MLP output)
bf16; the normed rows go on to a bf16 Linear. Providers, all on the same tensors in this process:
  torch_unfused   ``total = x + branch; F.layer_norm(total, ...)`` under autocast (fp32), then the cast to bf16
                  that the next Linear would do
  torch_compiled  the same under torch.compile (Inductor fuses it)
  mimkernels      add_layer_norm under autocast (normed comes out bf16), auto backend
  mimkernels_triton  the same on the Triton kernels by name
fwd and fwd_bwd (gradients of x, branch, weight and bias) per call, and fwd_bwd_graph: the same fwd+bwd as GPU time
alone (replayed in a CUDA graph; run 10's per-call fwd_bwd of the fused op, 0.6-0.8 ms at every shape with a wide
spread, looked like host time, which a training step hides behind its GPU work). GB/s count the fewest bytes:
forward reads x and branch and writes total and normed (12 bytes a value); the backward reads both output
gradients and total and writes the input gradients (another 16).

    python -m benchmarks.bench_norms [--quick] [--out DIR]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import mimkernels
from benchmarks import common

# name -> (rows = batch x tokens, width): MAE ViT-L encoder, AIM-600M trunk and head, ViT-B
SHAPES = {"mae_vit_l": (256 * 50, 1024), "aim_600m": (64 * 256, 1536), "aim_600m_head": (64 * 255, 2048),
          "vit_b": (256 * 197, 768)}
MODES = ("fwd", "fwd_bwd", "fwd_bwd_graph")
FWD_BYTES, BWD_BYTES = 12, 16  # per value, as the docstring counts


def unfused(x, branch, weight, bias):
    total = x + branch
    return total, F.layer_norm(total, weight.shape, weight, bias).to(torch.bfloat16)


def fused(x, branch, weight, bias):
    return mimkernels.add_layer_norm(x, branch, weight, bias)


def fused_triton(*args):
    with mimkernels.use_backend("triton"):
        return fused(*args)


def providers(compile_backend="inductor"):
    return {"torch_unfused": unfused, "torch_compiled": torch.compile(unfused, backend=compile_backend),
            "mimkernels": fused, "mimkernels_triton": fused_triton}


def _step(fn, args, mode, grads, device):
    def forward():
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn(*args)
    if mode == "fwd":
        return forward  # fwd_bwd and fwd_bwd_graph: the same call, timed per call or as GPU time
    return lambda: torch.autograd.grad(forward(), args, grads)


def run(shapes, dtype, quick, peaks, csv_path=None, *, device="cuda", scale=1, compile_backend="inductor"):
    """``scale`` divides the rows, ``compile_backend`` compiles torch_compiled (CPU tests: aot_eager)."""
    rows_out = []
    for name in shapes:
        rows, width = SHAPES[name]
        rows = max(1, rows // scale)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(rows, width, device=device, generator=gen).requires_grad_()
        branch = torch.randn(rows, width, device=device, generator=gen).to(torch.bfloat16).requires_grad_()
        weight = torch.randn(width, device=device, generator=gen).requires_grad_()
        bias = torch.randn(width, device=device, generator=gen).requires_grad_()
        args = (x, branch, weight, bias)
        grads = (torch.randn_like(x), torch.randn(rows, width, device=device, generator=gen).to(torch.bfloat16))
        expected = _step(unfused, args, "fwd", None, device)()
        shape = f"{name}:R{rows}xD{width}"
        for provider, fn in providers(compile_backend).items():
            got = _step(fn, args, "fwd", None, device)()
            for g, e in zip(got, expected):  # a wrong answer is not timed
                torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
            for mode in MODES:
                min_bytes = rows * width * (FWD_BYTES + (BWD_BYTES if mode != "fwd" else 0))
                times = common.time_mode(_step(fn, args, mode, grads, device), mode, f"{shape:32s} {provider:18s}",
                                         quick=quick, device=device)
                if times is None:  # e.g. a compiled call that cannot be captured
                    continue
                rows_out.append(common.result("add_layer_norm", provider, mode, shape, "fp32+bf16", times, 0,
                                              min_bytes, peaks))
                common.print_memory_row(rows_out[-1])
        if csv_path:
            common.write_csv(csv_path, rows_out, device)
    return rows_out


def main(argv=None) -> int:
    return common.family_main(argv, "Residual add + LayerNorm benchmark", SHAPES, run, "norms.csv")


if __name__ == "__main__":
    sys.exit(main())
