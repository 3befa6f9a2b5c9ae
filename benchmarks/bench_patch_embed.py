"""Patch embedding and masked pixel loss against the usual PyTorch paths (GPU).

Embedding providers: conv2d (timm PatchEmbed: Conv2d on cuDNN, flatten, transpose, + pos_embed; + gather
of the kept patches for MAE; + mask-token blend for SimMIM) and mimkernels (one GEMM reading the image
in place; MAE computes only the kept quarter). Loss providers: official_mae (facebookresearch/mae
forward_loss), mimkernels (one fused kernel, one program per patch) and mimkernels_grouped (the same kernels,
GROUPED_PATCHES patches per program: selectable, not yet measured). bf16, all in this process: fwd and fwd_bwd per
call, fwd_graph and fwd_bwd_graph as GPU time (common.graphed), on which the issue's targets (printed last) are
judged.

    python -m benchmarks.bench_patch_embed [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

import mimkernels
from benchmarks import common, official

# name: (patch, embed)
SHAPES = {"vit_b16": (16, 768), "vit_l16": (16, 1024), "vit_g14": (14, 1536)}
EMBED_MODES = ("full", "mae", "simmim")
MODES = ("fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph")
# Issue 11's targets: fwd+bwd >= 2x Conv2d (+ gather / blend) for the embedding and >= 2x the official loss (per call
# and on GPU time), and >= 60% of the roofline (FLOPs or bytes, whichever bounds) on GPU time, both directions
SPEEDUP_TARGETS = [(EMBED_MODES, mode, "conv2d", 2.0) for mode in ("fwd_bwd", "fwd_bwd_graph")] + [
    (("loss",), mode, "official_mae", 2.0) for mode in ("fwd_bwd", "fwd_bwd_graph")]
ROOFLINE_TARGETS = [((*EMBED_MODES, "loss"), mode, 60.0) for mode in ("fwd_graph", "fwd_bwd_graph")]


def conv2d_path(images, weight, bias, pos, ids_keep=None, mask=None, mask_token=None):
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if mask is not None:
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + mask_token.to(x.dtype) * w
    x = x + pos
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
    return x


def _embedders(images, weight, bias, pos, extra):
    return (("conv2d", lambda: conv2d_path(images, weight, bias, pos, **extra)),
            ("mimkernels", lambda: mimkernels.patch_embed(images, weight, bias, pos_embed=pos, **extra)))


# Patches per program of the loss kernels in the A/B provider (mimkernels.triton.losses.PATCHES_PER_PROGRAM;
# the default, 1, is the "mimkernels" row)
GROUPED_PATCHES = 8


def _losses(images, pred, mask, patch):
    """(provider, fn, patches per program of our loss kernels or None)."""
    return (("official_mae", lambda: official.forward_loss(images, pred, mask, patch), None),
            ("mimkernels", lambda: mimkernels.masked_patch_loss(pred, images, mask), None),
            ("mimkernels_grouped", lambda: mimkernels.masked_patch_loss(pred, images, mask), GROUPED_PATCHES))


def _with_patches_per_program(step, group):
    """``step`` with the loss kernels launched ``group`` patches per program, its backward included."""
    if group is None:
        return step
    from mimkernels.triton import losses as loss_kernels

    def grouped():
        with common.switched(loss_kernels, "PATCHES_PER_PROGRAM", group):
            return step()
    return grouped


def _step(fn, leaves, mode):
    if not mode.startswith("fwd_bwd"):
        return fn

    def forward_backward():
        out = fn()
        grad = out if out.dim() == 0 else out.float().square().mean()
        return torch.autograd.grad(grad, leaves)
    return forward_backward


def shape_inputs(name, images, gen):
    """Shape ``name``'s tensors for ``images``: the Conv2d weight, bias, position embedding and mask token (the
    leaves whose gradients are timed), MAE's kept ids, SimMIM's mask, and the loss's prediction and mask."""
    device, dtype = images.device, images.dtype
    batch, size = images.shape[0], images.shape[-1]
    patch, embed = SHAPES[name]
    patches = (size // patch) ** 2
    k_total = 3 * patch * patch
    weight = (torch.randn(embed, 3, patch, patch, device=device, generator=gen) / k_total**0.5).to(dtype)
    bias = torch.zeros(embed, device=device, dtype=dtype)
    pos = torch.randn(1, patches, embed, device=device, generator=gen).to(dtype)
    token = torch.zeros(1, 1, embed, device=device, dtype=dtype)
    ids_keep = torch.argsort(torch.rand(batch, patches, device=device, generator=gen), 1)[:, :patches // 4]
    mask = torch.rand(batch, patches, device=device, generator=gen) < 0.6
    pred = torch.randn(batch, patches, k_total, device=device, generator=gen).to(dtype).requires_grad_()
    loss_mask = (torch.rand(batch, patches, device=device, generator=gen) < 0.75).float()
    return types.SimpleNamespace(patch=patch, embed=embed, patches=patches, k_total=k_total,
                                 leaves=[t.requires_grad_() for t in (weight, bias, pos, token)],
                                 ids_keep=ids_keep, mask=mask, pred=pred, loss_mask=loss_mask)


def embed_mode_args(inputs, embed_mode):
    """(the extra arguments of ``embed_mode``'s call, the leaves its backward differentiates)."""
    extra = {"mae": {"ids_keep": inputs.ids_keep},
             "simmim": {"mask": inputs.mask, "mask_token": inputs.leaves[3]}}.get(embed_mode, {})
    return extra, inputs.leaves if embed_mode == "simmim" else inputs.leaves[:3]


def run(shapes, dtype, quick, peaks, csv_path=None, *, device="cuda", batch=256, size=224):
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device, generator=gen).to(dtype)
    for name in shapes:
        inputs = shape_inputs(name, images, gen)
        patch, patches, embed = inputs.patch, inputs.patches, inputs.embed
        weight, bias, pos = inputs.leaves[:3]
        for embed_mode in EMBED_MODES:
            extra, grads_of = embed_mode_args(inputs, embed_mode)
            out_rows = batch * (patches // 4 if embed_mode == "mae" else patches)
            flops = 2 * out_rows * embed * inputs.k_total
            pixels_read = images.numel() * (0.25 if embed_mode == "mae" else 1)
            min_bytes = (pixels_read + out_rows * embed) * images.element_size()
            shape = f"{embed_mode}:{name}:B{batch}x{size}px:p{patch}xE{embed}"
            expected = conv2d_path(images, weight, bias, pos, **extra)
            for provider, fn in _embedders(images, weight, bias, pos, extra):
                torch.testing.assert_close(fn(), expected, rtol=3e-2, atol=3e-2)  # a wrong answer is not timed
                for mode in MODES:
                    times = common.time_mode(_step(fn, grads_of, mode), mode, f"{shape:40s} {provider:12s}",
                                             quick=quick, device=device)
                    if times is None:
                        continue
                    factor = 3 if mode.startswith("fwd_bwd") else 1  # backward: weight and input-side GEMMs
                    rows.append(common.result("patch_embed", provider, mode, shape, str(dtype)[6:], times,
                                              factor * flops, factor * min_bytes, peaks))
                    print(f"  {shape:40s} {provider:12s} {mode:8s} {times[0]:8.3f} ms  {rows[-1].tflops:6.1f} TFLOP/s",
                          flush=True)
        pred = inputs.pred
        shape = f"loss:{name}:B{batch}x{size}px:p{patch}"
        loss_bytes = (images.numel() + pred.numel()) * images.element_size()
        for provider, fn, group in _losses(images, pred, inputs.loss_mask, patch):
            for mode in MODES:
                times = common.time_mode(_with_patches_per_program(_step(fn, [pred], mode), group), mode,
                                         f"{shape:40s} {provider:12s}", quick=quick, device=device)
                if times is None:
                    continue
                rows.append(common.result("masked_patch_loss", provider, mode, shape, str(dtype)[6:], times, 0,
                                          loss_bytes * (2 if mode.startswith("fwd_bwd") else 1), peaks))
                print(f"  {shape:40s} {provider:12s} {mode:8s} {times[0]:8.3f} ms  {rows[-1].gbps:7.0f} GB/s",
                      flush=True)
        if csv_path:
            common.write_csv(csv_path, rows, device)
    return rows


targets = common.issue_targets(11, SPEEDUP_TARGETS, ROOFLINE_TARGETS)


def main(argv=None) -> int:
    return common.family_main(argv, "patch embedding and masked loss benchmark", SHAPES, run, "patch_embed.csv",
                              quick_run_kwargs={"batch": 64}, targets=targets)


if __name__ == "__main__":
    sys.exit(main())
