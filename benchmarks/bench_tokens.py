"""MAE token dropping and restoring against the official MAE code path and plain torch.gather (GPU).

Two jobs, each timed fwd and fwd_bwd, all providers on the same inputs in this process:
  encoder  x + pos_embed, random masking (keep 25%), gather of the kept tokens
  decoder  mask tokens appended, unshuffle with ids_restore, cls row kept in front, + decoder pos_embed
Providers: official_mae (facebookresearch/mae's code: ids expanded D-fold with repeat, cat, gather),
torch_gather (the same with an expanded, not repeated, index), mimkernels (auto backend: the compiled
extension if built, else Triton), mimkernels_triton (the Triton kernels by name), mimkernels_fused_bwd (the
Triton kernels with each backward in one pass, ops.tokens.FUSED_BACKWARD: selectable, not yet measured).

GB/s count the fewest bytes each job must move (kept rows read and written; the backward writes the
whole input gradient); roofline % is against the device copy bandwidth measured in the same run. fwd and fwd_bwd
are timed per call (at these sizes mostly host time), fwd_graph and fwd_bwd_graph as GPU time (common.graphed):
what a training step whose host runs ahead pays, and what the issue's targets (printed last) are judged on.

    python -m benchmarks.bench_tokens [--quick] [--out DIR]
"""
from __future__ import annotations

import sys

import torch

import mimkernels
from benchmarks import common, official
from mimkernels.ops import tokens as token_ops

SHAPES = {"mae_base": (196, 768), "mae_large": (196, 1024)}  # patches, width (decoder width as the encoder's)
MASK_RATIO = 0.75
MODES = ("fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph")
# Issue 11's targets for the token ops, per job: fwd+bwd >= 2.5x the official MAE code (per call and on GPU time),
# and >= 60% of the copy bandwidth on GPU time, forward and forward + backward
SPEEDUP_TARGETS = [(("encoder", "decoder"), mode, "official_mae", 2.5) for mode in ("fwd_bwd", "fwd_bwd_graph")]
ROOFLINE_TARGETS = [(("encoder", "decoder"), mode, 60.0) for mode in ("fwd_graph", "fwd_bwd_graph")]


def official_encoder(x, pos, noise):
    return official.random_masking(x + pos, MASK_RATIO, noise)[0]


def gather_encoder(x, pos, noise):
    ids_keep = torch.argsort(noise, dim=1)[:, :int(x.shape[1] * (1 - MASK_RATIO))]
    return torch.gather(x + pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _mimkernels(backend, fn):
    """``fn`` on ``backend`` (the backward runs on the backend its forward chose)."""
    def run(*args):
        with mimkernels.use_backend(backend):
            return fn(*args)
    return run


# ops.tokens.FUSED_BACKWARD is read where the backward runs, so it stays on for the whole timed step (a switch set
# around the forward alone timed the backward it was meant to replace): name -> (module, attribute, value)
SWITCHED_PROVIDERS = {"mimkernels_fused_bwd": (token_ops, "FUSED_BACKWARD", True)}


def providers(job):
    if job == "encoder":
        def ours(x, pos, noise):
            return mimkernels.random_masking(x, MASK_RATIO, noise=noise, pos_embed=pos).x_kept

        return {"official_mae": official_encoder, "torch_gather": gather_encoder,
                "mimkernels": _mimkernels("auto", ours), "mimkernels_triton": _mimkernels("triton", ours),
                "mimkernels_fused_bwd": _mimkernels("triton", ours)}

    def ours(x, ids_restore, mask_token, pos):
        return mimkernels.restore_tokens(x, ids_restore, mask_token, pos_embed=pos, num_prefix_tokens=1)

    return {"official_mae": official.decoder_input,
            "torch_gather": lambda *args: official.decoder_input(*args, repeat=False),
            "mimkernels": _mimkernels("auto", ours), "mimkernels_triton": _mimkernels("triton", ours),
            "mimkernels_fused_bwd": _mimkernels("triton", ours)}


def job_inputs(job, batch, patches, dim, dtype, device):
    """(arguments, the tensors to differentiate, minimal bytes for fwd and for fwd_bwd)."""
    gen = torch.Generator(device=device).manual_seed(0)
    kept = int(patches * (1 - MASK_RATIO))
    size = torch.tensor([], dtype=dtype).element_size()
    if job == "encoder":
        x = torch.randn(batch, patches, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
        pos = torch.randn(1, patches, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
        noise = torch.rand(batch, patches, device=device, generator=gen)
        fwd = 2 * batch * kept * dim * size  # read the kept rows, write them
        return (x, pos, noise), (x, pos), fwd, fwd + batch * (kept + patches) * dim * size
    x = torch.randn(batch, 1 + kept, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    ids_restore = torch.argsort(torch.rand(batch, patches, device=device, generator=gen), dim=1)
    mask_token = torch.randn(1, 1, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    pos = torch.randn(1, 1 + patches, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    fwd = batch * (2 + kept + patches) * dim * size  # read kept rows, write every row
    return (x, ids_restore, mask_token, pos), (x, mask_token, pos), fwd, 2 * fwd


def _step(fn, args, leaves, grad_out, mode, provider):
    """One timed call of ``mode``, with ``provider``'s switch on for all of it."""
    def step():
        with common.provider_switch(SWITCHED_PROVIDERS, provider):
            out = fn(*args)
            return out if not mode.startswith("fwd_bwd") else torch.autograd.grad(out, leaves, grad_out)
    return step


def run(shapes, dtype, quick, peaks, csv_path=None, *, device="cuda", batch=256):
    rows = []
    for name in shapes:
        patches, dim = SHAPES[name]
        for job in ("encoder", "decoder"):
            args, leaves, fwd_bytes, fwd_bwd_bytes = job_inputs(job, batch, patches, dim, dtype, device)
            shape = f"{job}:{name}:B{batch}xL{patches}xD{dim}"
            expected = official_encoder(*args) if job == "encoder" else official.decoder_input(*args)
            for provider, fn in providers(job).items():
                try:
                    out = fn(*args)
                except RuntimeError as err:  # e.g. a backend not available here
                    print(f"  {shape} {provider}: skipped ({str(err)[:120]})")
                    continue
                torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)  # a wrong answer is not timed
                grad_out = torch.randn_like(out)
                for mode in MODES:
                    min_bytes = fwd_bwd_bytes if mode.startswith("fwd_bwd") else fwd_bytes
                    step = _step(fn, args, leaves, grad_out, mode, provider)
                    times = common.time_mode(step, mode, f"{shape} {provider}", quick=quick, device=device)
                    if times is None:
                        continue
                    rows.append(common.result("mae_tokens", provider, mode, shape, str(dtype)[6:], times, 0,
                                              min_bytes, peaks))
                    common.print_memory_row(rows[-1])
        if csv_path:
            common.write_csv(csv_path, rows, device)
    return rows


targets = common.issue_targets(11, SPEEDUP_TARGETS, ROOFLINE_TARGETS)


def main(argv=None) -> int:
    return common.family_main(argv, "MAE token drop/restore benchmark", SHAPES, run, "tokens.csv", targets=targets)


if __name__ == "__main__":
    sys.exit(main())
