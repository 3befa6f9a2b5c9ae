"""``python -m mimkernels``: check every shipped kernel, time them (GPU), then pre-train MAE and AIM briefly.

On a GPU the kernels run compiled; on a CPU they run through Triton's interpreter on small shapes,
and timings are skipped (they would measure the interpreter). The demo training runs use the built-in
photos: tiny models on a CPU, base-size ones on a GPU; each writes a checkpoint and a reconstruction PNG.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

import mimkernels
from mimkernels import _backend, reference, timing

HAS_GPU = torch.cuda.is_available()

# relative error (in the 2-norm) allowed against float64, per dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_attention(batch, heads, seq_len, head_dim, dtype, device) -> tuple[float, float]:
    """Worst relative error of the output and of dq, dk, dv against the float64 reference."""
    gen = torch.Generator(device=device).manual_seed(seq_len)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, generator=gen)
               .to(dtype).requires_grad_() for _ in range(3))
    prefix = torch.randint(0, seq_len + 1, (batch,), device=device, generator=gen)
    grad_out = torch.randn(batch, heads, seq_len, head_dim, device=device, generator=gen).to(dtype)
    with mimkernels.use_backend("triton"):
        out = mimkernels.prefix_causal_attention(q, k, v, prefix)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = reference.prefix_causal_attention(q64, k64, v64, prefix)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    return _relative_error(out, out64), max(_relative_error(g, w) for g, w in zip(grads, grads64))


def check_tokens(backend, batch, patches, dim, dtype, device) -> tuple[float, float]:
    """MAE encoder masking (+ pos) and decoder restore (+ pos): worst relative error of outputs and gradients."""
    gen = torch.Generator(device=device).manual_seed(patches)
    x = torch.randn(batch, 1 + patches, dim, device=device, generator=gen).to(dtype).requires_grad_()
    pos = torch.randn(1, 1 + patches, dim, device=device, generator=gen).requires_grad_()
    token = torch.randn(1, 1, dim, device=device, generator=gen).requires_grad_()
    noise = torch.rand(batch, patches, device=device, generator=gen)

    def decoder_input(ops, x, pos, token):
        kept = ops.random_masking(x, 0.75, noise=noise, num_prefix_tokens=1, pos_embed=pos)
        return ops.restore_tokens(kept.x_kept, kept.ids_restore, token, pos_embed=pos, num_prefix_tokens=1)

    with mimkernels.use_backend(backend):
        out = decoder_input(mimkernels, x, pos, token)
    grad_out = torch.randn(out.shape, device=device, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (x, pos, token), grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, pos, token)]
    out64 = decoder_input(reference, *leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    return _relative_error(out, out64), max(_relative_error(g, w) for g, w in zip(grads, grads64))


def check_patch_embed(batch, size, patch, embed, dtype, device) -> tuple[float, float]:
    """Kept-patch embedding (MAE) and the masked loss: worst relative error of outputs and gradients."""
    gen = torch.Generator(device=device).manual_seed(embed)
    images = torch.randn(batch, 3, size, size, device=device, generator=gen)
    weight = (torch.randn(embed, 3, patch, patch, device=device, generator=gen) / (3 * patch * patch) ** 0.5)
    weight = weight.to(dtype).requires_grad_()
    pos = torch.randn(1, (size // patch) ** 2, embed, device=device, generator=gen).requires_grad_()
    ids_keep = torch.argsort(torch.rand(batch, (size // patch) ** 2, device=device, generator=gen), 1)[:, :2]
    pred = torch.randn(batch, (size // patch) ** 2, 3 * patch * patch, device=device, generator=gen).to(dtype)
    pred.requires_grad_()
    mask = (torch.rand(batch, (size // patch) ** 2, device=device, generator=gen) < 0.75).float()
    with mimkernels.use_backend("triton"):
        out = mimkernels.patch_embed(images, weight, pos_embed=pos, ids_keep=ids_keep)
        loss = mimkernels.masked_patch_loss(pred, images, mask)
    grad_out = torch.randn(out.shape, device=device, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (weight, pos), grad_out) + torch.autograd.grad(loss, pred)
    leaves64 = [t.detach().double().requires_grad_() for t in (weight, pos, pred)]
    out64 = reference.patch_embed(images.double(), leaves64[0], pos_embed=leaves64[1], ids_keep=ids_keep)
    loss64 = reference.masked_patch_loss(leaves64[2], images.double(), mask.double())
    grads64 = torch.autograd.grad(out64, leaves64[:2], grad_out.double()) + torch.autograd.grad(loss64, leaves64[2])
    return (max(_relative_error(out, out64), _relative_error(loss, loss64)),
            max(_relative_error(g, w) for g, w in zip(grads, grads64)))


def check_add_layer_norm(rows, width, dtype, device) -> tuple[float, float]:
    """The residual add + LayerNorm (fp32 residual stream, ``dtype`` branch): worst relative error of the sum, the
    normed rows and the gradients of x, branch, weight and bias."""
    gen = torch.Generator(device=device).manual_seed(width)
    x = torch.randn(rows, width, device=device, generator=gen).requires_grad_()
    branch = torch.randn(rows, width, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (1 + torch.randn(width, device=device, generator=gen) / 2).requires_grad_()
    bias = torch.randn(width, device=device, generator=gen).requires_grad_()
    with mimkernels.use_backend("triton"):
        total, normed = mimkernels.add_layer_norm(x, branch, weight, bias)
    grad_total, grad_normed = torch.randn_like(total), torch.randn_like(normed)
    grads = torch.autograd.grad((total, normed), (x, branch, weight, bias), (grad_total, grad_normed))
    leaves64 = [t.detach().double().requires_grad_() for t in (x, branch, weight, bias)]
    total64, normed64 = reference.add_layer_norm(*leaves64)
    grads64 = torch.autograd.grad((total64, normed64), leaves64, (grad_total.double(), grad_normed.double()))
    return (max(_relative_error(total, total64), _relative_error(normed, normed64)),
            max(_relative_error(g, w) for g, w in zip(grads, grads64)))


def check_gelu_mlp(rows, width, hidden, dtype, device) -> tuple[float, float]:
    """The MLP with GELU inside its GEMMs: worst relative error of the output and the five gradients."""
    gen = torch.Generator(device=device).manual_seed(hidden)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype).requires_grad_()

    leaves = [randn(rows, width), randn(hidden, width, scale=width ** -0.5), randn(hidden),
              randn(width, hidden, scale=hidden ** -0.5), randn(width)]
    with mimkernels.use_backend("triton"):
        out = mimkernels.gelu_mlp(*leaves)
    grad_out = torch.randn(out.shape, device=device, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = reference.gelu_mlp(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    return _relative_error(out, out64), max(_relative_error(g, w) for g, w in zip(grads, grads64))


def self_check(device: str) -> tuple[bool, list[str]]:
    """Every kernel of the backends installed here against the float64 reference: (all passed, backends that
    could not be checked here)."""
    if HAS_GPU:
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        attention_shapes = ((8, 12, 197, 64), (4, 16, 257, 80), (2, 12, 256, 128), (1, 2, 1025, 40))
        token_shapes = ((64, 196, 768), (8, 49, 40))
        embed_shapes = ((16, 224, 16, 768), (4, 224, 14, 1536))
        norm_shapes = ((64 * 197, 768), (8 * 256, 1536), (5, 40))
        mlp_shapes = ((8 * 197, 768, 3072), (4 * 256, 1536, 6144), (5, 40, 100))
    else:  # the interpreter is slow, and its bf16 tl.dot is broken (the token ops have no dot)
        dtypes = (torch.float16, torch.float32)
        attention_shapes = ((2, 2, 49, 64), (2, 1, 197, 80))
        token_shapes, embed_shapes, norm_shapes = ((2, 49, 40),), ((2, 32, 16, 40),), ((2 * 50, 64),)
        mlp_shapes = ((2 * 50, 64, 256),)
    available = mimkernels.available_backends()
    checks = [("prefix_causal_attention", check_attention, dtypes, attention_shapes),
              ("patch_embed + loss", check_patch_embed, dtypes, embed_shapes),
              ("add_layer_norm", check_add_layer_norm, dtypes, norm_shapes),
              ("gelu_mlp", check_gelu_mlp, dtypes, mlp_shapes)] if "triton" in available else []
    unchecked = [backend for backend in ("triton", "extension") if backend not in available]
    for backend in unchecked:
        print(f"{backend} kernels not checked: {_backend._why_not(backend, torch.device(device))}")
    for backend in (name for name in ("extension", "triton") if name in available):
        checks.append((f"mae tokens ({backend})", functools.partial(check_tokens, backend),
                       (torch.bfloat16, torch.float16, torch.float32), token_shapes))
    print(f"{'kernel':26s} {'dtype':9s} {'shape':16s} {'out err':>9s} {'grad err':>9s}")
    ok = True
    for name, check, check_dtypes, shapes in checks:
        for dtype in check_dtypes:
            for shape in shapes:
                out_err, grad_err = check(*shape, dtype, device)
                passed = max(out_err, grad_err) <= TOLERANCE[dtype]
                ok &= passed
                print(f"{name:26s} {str(dtype)[6:]:9s} {','.join(map(str, shape)):16s} "
                      f"{out_err:9.2e} {grad_err:9.2e}  {'ok' if passed else 'FAIL'}")
    return ok, unchecked


# the hot paths at the shapes of the papers' recipes (bf16): AIM-600M attention (B64 H12 N256 D128, prefix-causal),
# the MAE ViT-B encoder (B256, 50 tokens, 12 heads of 64), MAE tokens and kept-patch embedding at ViT-B/16, 224 px
SPEED_SHAPES = {"aim_attention": (64, 12, 256, 128), "mae_attention": (256, 12, 50, 64),
                "mae_tokens": (64, 196, 768), "mae_patch_embed": (64, 224, 16, 768)}


def _fwd_bwd(forward, leaves):
    """A callable running forward + backward (the training step's cost), with a fixed output gradient."""
    grad_out = forward().detach().clone().normal_()
    return lambda: torch.autograd.grad(forward(), leaves, grad_out)


def speed_cases(shapes: dict, device: str, dtype=torch.bfloat16) -> list:
    """(name, what the baseline is, mimkernels callable, baseline callable): fwd+bwd of each hot path."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=device, generator=gen).to(dtype).requires_grad_(grad)

    def label(name, key):
        return f"{name} {'x'.join(map(str, shapes[key]))}"

    def prefix_causal_case(batch, heads, seq_len, head_dim):
        q, k, v = (randn(batch, heads, seq_len, head_dim) for _ in range(3))
        prefix = torch.randint(1, seq_len, (batch,), device=device, generator=gen)

        def dense_mask():  # built per call, as apple/ml-aim does
            return mimkernels.prefix_causal_mask(seq_len, prefix)

        return (label("prefix-causal attention", "aim_attention"), "SDPA + dense bool mask",
                _fwd_bwd(lambda: mimkernels.prefix_causal_attention(q, k, v, prefix), (q, k, v)),
                _fwd_bwd(lambda: sdpa(q, k, v, attn_mask=dense_mask()), (q, k, v)))

    def full_case(batch, heads, seq_len, head_dim):
        q, k, v = (randn(batch, heads, seq_len, head_dim) for _ in range(3))
        return (label("full attention", "mae_attention"), "SDPA",
                _fwd_bwd(lambda: mimkernels.attention(q, k, v), (q, k, v)), _fwd_bwd(lambda: sdpa(q, k, v), (q, k, v)))

    def tokens_case(batch, patches, dim):
        x, pos, token = randn(batch, 1 + patches, dim), randn(1, 1 + patches, dim), randn(1, 1, dim)
        noise = torch.rand(batch, patches, device=device, generator=gen)

        def mask_and_restore(ops):
            kept = ops.random_masking(x, 0.75, noise=noise, num_prefix_tokens=1, pos_embed=pos)
            return ops.restore_tokens(kept.x_kept, kept.ids_restore, token, pos_embed=pos, num_prefix_tokens=1)

        return (label("MAE mask + restore", "mae_tokens"), "PyTorch reference",
                _fwd_bwd(lambda: mask_and_restore(mimkernels), (x, pos, token)),
                _fwd_bwd(lambda: mask_and_restore(reference), (x, pos, token)))

    def patch_embed_case(batch, size, patch, embed):
        images = randn(batch, 3, size, size, grad=False)
        weight, pos = randn(embed, 3, patch, patch), randn(1, (size // patch) ** 2, embed)
        order = torch.argsort(torch.rand(batch, (size // patch) ** 2, device=device, generator=gen), 1)
        ids_keep = order[:, : order.shape[1] // 4]  # MAE keeps a quarter

        def embed_kept(ops):
            return ops.patch_embed(images, weight, pos_embed=pos, ids_keep=ids_keep)

        return (label("kept-patch embedding", "mae_patch_embed"), "PyTorch reference (conv, then gather)",
                _fwd_bwd(lambda: embed_kept(mimkernels), (weight, pos)),
                _fwd_bwd(lambda: embed_kept(reference), (weight, pos)))

    sdpa = torch.nn.functional.scaled_dot_product_attention
    return [prefix_causal_case(*shapes["aim_attention"]), full_case(*shapes["mae_attention"]),
            tokens_case(*shapes["mae_tokens"]), patch_embed_case(*shapes["mae_patch_embed"])]


def speed_check(shapes: dict, device: str, dtype=torch.bfloat16) -> list[tuple[str, float, float]]:
    """Print and return (case, mimkernels ms, baseline ms) of one fwd+bwd per hot path, measured here and now.

    A quick look, not the benchmark: `make bench` in a checkout times every provider, shape and mode.
    """
    print(f"fwd+bwd, {str(dtype)[6:]}, on {timing.device_name(device)} (medians; >1x: mimkernels faster)")
    rows = []
    for name, baseline_name, ours, baseline in speed_cases(shapes, device, dtype):
        ours_ms = timing.time_ms(ours, quick=True, device=device)[0]
        baseline_ms = timing.time_ms(baseline, quick=True, device=device)[0]
        rows.append((name, ours_ms, baseline_ms))
        print(f"  {name:40s} {ours_ms:8.3f} ms   {baseline_name} {baseline_ms:8.3f} ms   "
              f"{baseline_ms / ours_ms:5.2f}x")
    return rows


def demo_training(out: Path, steps: int) -> list:
    """Short MAE and AIM pre-training runs on the built-in photos; returns their summaries."""
    from . import train

    if HAS_GPU:  # base-size models, bf16 autocast; lrs a few times the papers' scaled ones, for a short run
        runs = [("mae", "mae_vit_base_patch16", 64, 1.5e-4), ("aim", "aim_600m", 32, 3e-4)]
    else:  # tiny models in fp32 with a higher lr, so that a few hundred steps show learning
        runs = [("mae", "mae_vit_tiny_patch8", 32, 2e-3), ("aim", "aim_tiny", 32, 1e-3)]
    summaries = []
    for model, config, batch, lr in runs:
        print(f"\n== training {model} ({config}) on the built-in photos ==")
        args = train.parse_args([model, "--config", config, "--data", "builtin", "--steps", str(steps),
                                 "--batch-size", str(batch), "--lr", str(lr), "--out", str(out / model),
                                 "--log-every", str(max(1, steps // 10)), "--workers", "4" if HAS_GPU else "0"])
        summaries.append(train.train(args, device=torch.device("cuda" if HAS_GPU else "cpu")))
    return summaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimkernels", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps of each demo training run")
    parser.add_argument("--out", default="runs/demo", help="folder for the demo checkpoints and PNGs")
    parser.add_argument("--no-train", action="store_true", help="only the kernel self-check (and GPU timings)")
    args = parser.parse_args(argv)
    if args.steps < 1:  # refused before the self-check, not by the training CLI after it
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not HAS_GPU and not _backend.triton_interpreted() and _backend._HAS_TRITON:
        # the kernels were defined when mimkernels was imported: start again with the interpreter on
        os.execve(sys.executable, [sys.executable, "-m", "mimkernels", *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    device = "cuda" if HAS_GPU else "cpu"
    interpreted = _backend.triton_interpreted() and _backend._HAS_TRITON
    where = torch.cuda.get_device_name() if HAS_GPU else "CPU (Triton interpreter)" if interpreted else "CPU"
    print(f"mimkernels {mimkernels.__version__} | torch {torch.__version__} | {where}")
    print(f"backends available here: {', '.join(mimkernels.available_backends())}\n")
    started = time.perf_counter()
    ok, unchecked = self_check(device)
    print()
    if not HAS_GPU:
        interpreter = ": on this machine the kernels run through the Triton interpreter" if interpreted else ""
        print(f"Timings need a GPU{interpreter}. See `make bench` on a CUDA machine.")
    else:
        speed_check(SPEED_SHAPES, device)
    summaries = [] if args.no_train else demo_training(Path(args.out), args.steps)
    print("\n" + "=" * 30 + " summary " + "=" * 30)
    print("self-check:", ("all kernels match the reference" if ok else "FAILED")
          + "".join(f"; {backend}'s not checked (not available here)" for backend in unchecked))
    for summary in summaries:
        trend = "falling" if summary.last_loss < summary.first_loss else "NOT falling"
        print("\n".join(summary.lines()).replace(", loss", f", loss ({trend})", 1))
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
