"""Every kernel once, forward and backward, on shapes with ragged edges: the program compute-sanitizer watches.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m benchmarks.sanitizer_cases [GROUP ...]

(benchmarks/gpu_check.sh runs it so, after one run without the sanitizer that fills Triton's compile cache).
GROUPs (default all, in this order): attention tma_attention split_attention tokens patch_embed norms mlp tma_mlp;
a run cut short can be finished with the groups it did not reach. Without the caching allocator each tensor is its
own allocation, so a read or write past a tensor's end is outside any allocation and memcheck reports it. The shapes
are small (memcheck slows kernels down many times) and odd: N not a multiple of any tile, head dims that are padded
(40, 80) or split (72, 40, 80), one-token sequences, out-of-range token ids (which must be ignored, never followed).
"""
from __future__ import annotations

import sys

import torch

import mimkernels
from benchmarks.common import switched


def _backward(out, leaves):
    torch.autograd.grad(out, leaves, torch.randn_like(out))


ATTENTION_CASES = [((2, 3, 49, 40), torch.bfloat16), ((2, 2, 197, 80), torch.float16),
                   ((1, 2, 257, 128), torch.bfloat16), ((3, 1, 1, 64), torch.float32),
                   ((1, 2, 130, 256), torch.bfloat16)]


def attention_cases(device):
    for (batch, heads, seq_len, head_dim), dtype in ATTENTION_CASES:
        q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        prefix = torch.randint(0, seq_len + 1, (batch,), device=device)
        _backward(mimkernels.prefix_causal_attention(q, k, v, prefix), (q, k, v))
        _backward(mimkernels.attention(q, k, v), (q, k, v))
        qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        _backward(mimkernels.qkv_attention(qkv, prefix_len=prefix), (qkv,))
        _per_head_backward(q, k, v, prefix)
        _stored_ds_backward(q, k, v, prefix)
        yield (f"attention {batch}x{heads}x{seq_len}x{head_dim} {str(dtype)[6:]} (q, k, v, packed, per-head and "
               "stored-dS backwards)")


def _stored_ds_backward(q, k, v, prefix):
    """The backward with dS stored (kernels.STORED_DS; through a descriptor where the table's dK/dV tile is +tma)."""
    from mimkernels.triton import attention as kernels

    with switched(kernels, "STORED_DS", True):
        _backward(mimkernels.prefix_causal_attention(q, k, v, prefix), (q, k, v))


def _per_head_backward(q, k, v, prefix):
    """The one-program-per-head backward (the table may pick it), with the dK/dV kernel's tile."""
    from dataclasses import replace

    from mimkernels.triton import attention as kernels

    q, k, v = (t.detach() for t in (q, k, v))
    configs = kernels.configs_for_call(q)
    configs = replace(configs, backward_per_head=configs.backward_dkdv)
    out, lse = kernels.forward(q, k, v, prefix, q.shape[-1] ** -0.5, configs)
    kernels.backward(torch.randn_like(out), q, k, v, out, lse, prefix, q.shape[-1] ** -0.5, configs)


def tma_attention_cases(device):
    """The kernels through TMA descriptors (``+tma`` configs, which the tuner may put in the table) on the same
    ragged shapes: boxes that pass N and D, packed views. Only where descriptors are usable (sm_90 and newer)."""
    from dataclasses import replace

    from mimkernels.triton import attention as kernels

    for (batch, heads, seq_len, head_dim), dtype in ATTENTION_CASES[:3]:
        qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device=device, dtype=dtype)
        q, k, v = qkv.unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if not kernels.tma_usable(q, k, v):
            yield f"tma attention {batch}x{heads}x{seq_len}x{head_dim}: not run (no TMA on this GPU)"
            continue
        base = kernels.configs_for(head_dim, dtype)
        tma = kernels.AttentionConfigs(*(replace(cfg, tma=True) for cfg in (base.forward, base.backward_dkdv,
                                                                             base.backward_dq)))
        prefix = torch.randint(0, seq_len + 1, (batch,), device=device)
        out, lse = kernels.forward(q, k, v, prefix, head_dim ** -0.5, tma)
        grad_out = torch.randn_like(out)
        # the stored-dS backward as a table entry would give it: dS stored through descriptors, tail tiles' too,
        # dQ read back through them
        stored_ds = replace(tma, backward_dkdv_ds=kernels.TileConfig.parse("32x64x4x3+tma+tail16"),
                            backward_dq_from_ds=kernels.TileConfig.parse("64x64x4x3+tma"))
        for configs in (tma, replace(tma, backward_dq_delta=tma.backward_dq),
                        replace(tma, backward_per_head=tma.backward_dkdv), stored_ds):
            kernels.backward(grad_out, q, k, v, out, lse, prefix, head_dim ** -0.5, configs)
        kernels.backward(grad_out, q, k, v, out, lse, prefix, head_dim ** -0.5, tma, atomic_dq=True)
        yield f"tma attention {batch}x{heads}x{seq_len}x{head_dim} {str(dtype)[6:]} (forward, five backwards)"


def split_attention_cases(device):
    """The split-head-dim kernels (``+splitd`` configs, which the tuner may put in the table), through pointers and
    TMA descriptors: head dims whose second column block passes D (72, 40) or ends at it (80), packed views, both
    dQ variants."""
    from dataclasses import replace

    from mimkernels.triton import attention as kernels

    for (batch, heads, seq_len, head_dim), dtype in (((2, 2, 197, 80), torch.bfloat16),
                                                      ((2, 3, 49, 40), torch.float16),
                                                      ((1, 2, 130, 72), torch.bfloat16)):
        qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device=device, dtype=dtype)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        base = kernels.configs_for(head_dim, dtype)
        split = kernels.AttentionConfigs(*(replace(cfg, split_d=True) for cfg in (base.forward, base.backward_dkdv,
                                                                                   base.backward_dq)))
        prefix = torch.randint(0, seq_len + 1, (batch,), device=device)
        tma = kernels.AttentionConfigs(*(replace(cfg, tma=True) for cfg in (split.forward, split.backward_dkdv,
                                                                             split.backward_dq)))
        for configs in (split, tma) if kernels.tma_usable(q, k, v) else (split,):
            out, lse = kernels.forward(q, k, v, prefix, head_dim ** -0.5, configs)
            grad_out = torch.randn_like(out)
            for backward in (configs, replace(configs, backward_dq_delta=configs.backward_dq)):
                kernels.backward(grad_out, q, k, v, out, lse, prefix, head_dim ** -0.5, backward)
        yield (f"split attention {batch}x{heads}x{seq_len}x{head_dim} {str(dtype)[6:]} (forward, two backwards; "
               "pointers and, where usable, TMA)")


def _mask_and_restore(batch, device):
    """MAE's token path forward and backward, bf16 tokens with a cls row and fp32 positions: (x, mask token)."""
    x = torch.randn(batch, 1 + 49, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, 1 + 49, 40, device=device, requires_grad=True)
    token = torch.randn(1, 1, 40, device=device, requires_grad=True)
    kept = mimkernels.random_masking(x, 0.75, num_prefix_tokens=1, pos_embed=pos)
    restored = mimkernels.restore_tokens(kept.x_kept, kept.ids_restore, token, pos_embed=pos, num_prefix_tokens=1)
    _backward(restored, (x, pos, token))
    return x, token


def token_cases(device):
    for backend in (name for name in ("triton", "extension") if name in mimkernels.available_backends()):
        with mimkernels.use_backend(backend):
            x, token = _mask_and_restore(3, device)
            if device == "cuda" or backend == "triton":  # the extension's CPU ops raise IndexError instead
                kernels = mimkernels.ops.tokens._KERNELS[backend]
                bad = torch.tensor([[0, -3, 50, 1 << 40], [7, 2, 3, 99], [1, 1, 1, -1]], device=device)
                kernels.gather_rows(x.detach(), bad, None, 1)
                kernels.restore_rows(x.detach()[:, :5], bad, token.detach().reshape(-1), None, 1)
        yield f"tokens ({backend}) incl. out-of-range ids"
    if "triton" in mimkernels.available_backends():  # the one-pass backwards (ops.tokens.FUSED_BACKWARD)
        token_ops = mimkernels.ops.tokens
        with switched(token_ops, "FUSED_BACKWARD", True), mimkernels.use_backend("triton"):
            x, _ = _mask_and_restore(5, device)
            bad = torch.tensor([[0, -3, 50, 1 << 40], [7, 2, 3, 99], [1, 1, 1, -1]], device=device)
            grad = x.detach()[:3]
            token_ops._triton_kernels.rows_backward(grad[:, :5], bad, 1, 4, False, True, False)
            token_ops._triton_kernels.rows_backward(grad[:, :5], bad, 1, 4, True, True, True)
        yield "tokens (triton), one-pass backwards incl. out-of-range ids"


def patch_embed_cases(device):
    for mode in ("full", "mae", "simmim"):
        images = torch.randn(3, 3, 48, 32, device=device)
        weight = torch.randn(40, 3, 16, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.randn(1, 6, 40, device=device, requires_grad=True)
        kwargs = {"pos_embed": pos}
        if mode == "mae":
            kwargs["ids_keep"] = torch.argsort(torch.rand(3, 6, device=device), 1)[:, :2]
        if mode == "simmim":
            kwargs["mask"] = torch.rand(3, 6, device=device) < 0.5
            kwargs["mask_token"] = torch.zeros(40, device=device)
        _backward(mimkernels.patch_embed(images, weight, **kwargs), (weight, pos))
        pred = torch.randn(3, 6, 3 * 16 * 16, device=device, dtype=torch.bfloat16, requires_grad=True)
        mask = (torch.rand(3, 6, device=device) < 0.75).float()
        _backward(mimkernels.masked_patch_loss(pred, images, mask), (pred,))
        _grouped_loss(pred, images, mask)
        yield f"patch_embed ({mode}) + masked loss (one patch and 8 patches per program)"


def _grouped_loss(pred, images, mask):
    """The loss kernels 8 patches per program (selectable): 18 patches leave the last group part empty."""
    from mimkernels.triton import losses

    with switched(losses, "PATCHES_PER_PROGRAM", 8):
        _backward(mimkernels.masked_patch_loss(pred, images, mask), (pred,))


NORM_CASES = [(1, 40), (3 * 49, 1536), (300, 2048)]  # the last: more rows than backward programs


def norm_cases(device):
    for rows, width in NORM_CASES:
        x = torch.randn(rows, width, device=device, requires_grad=True)
        branch = torch.randn(rows, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight, bias = (torch.randn(width, device=device, requires_grad=True) for _ in range(2))
        with mimkernels.use_backend("triton"):
            total, normed = mimkernels.add_layer_norm(x, branch, weight, bias)
        _backward(total.float().sum() + normed.float().square().sum(), (x, branch, weight, bias))
        yield f"add_layer_norm {rows}x{width}"


# (rows, width, hidden, biases): every size ragged against the 2-byte tiles, or none (the mask-free k loop), fp32
MLP_CASES = [(1, 40, 72, True, torch.bfloat16), (131, 96, 200, False, torch.bfloat16),
             (260, 128, 512, True, torch.float16), (37, 24, 40, True, torch.float32)]


def mlp_cases(device, cases=None):
    for rows, width, hidden, bias, dtype in MLP_CASES if cases is None else cases:
        def param(*shape, dtype=dtype):
            return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

        leaves = [param(rows, width), param(hidden, width), param(hidden) if bias else None, param(width, hidden),
                  param(width) if bias else None]
        with mimkernels.use_backend("triton"):
            out = mimkernels.gelu_mlp(*leaves)
        _backward(out, [leaf for leaf in leaves if leaf is not None])
        yield f"gelu_mlp {rows}x{width}x{hidden} {str(dtype)[6:]}"


def tma_mlp_cases(device):
    """The MLP's GEMMs through TMA descriptors (bench_mlp's sweep may pick a ``tma`` tile), smallest and largest
    candidate, on the 16-bit cases."""
    from mimkernels.triton import launch, mlp

    if not launch.tma_usable(torch.empty(8, 8, device=device, dtype=torch.bfloat16)):
        yield "tma gelu_mlp: not run (no TMA on this GPU)"
        return
    tiles = [tile for tile in mlp.CANDIDATES if tile.tma]
    sixteen_bit = [case for case in MLP_CASES if case[-1] != torch.float32]
    shipped = mlp.CONFIGS[2]
    for tile in (tiles[0], tiles[-1]):
        mlp.CONFIGS[2] = tile
        try:
            yield from (f"{name} {tile}" for name in mlp_cases(device, sixteen_bit))
        finally:
            mlp.CONFIGS[2] = shipped


CASES = {"attention": attention_cases, "tma_attention": tma_attention_cases,
         "split_attention": split_attention_cases, "tokens": token_cases,
         "patch_embed": patch_embed_cases, "norms": norm_cases, "mlp": mlp_cases, "tma_mlp": tma_mlp_cases}


def main(argv=None) -> int:
    groups = sys.argv[1:] if argv is None else argv
    unknown = [group for group in groups if group not in CASES]
    if unknown:
        print(f"unknown case groups {unknown}; choose from {list(CASES)}")
        return 2
    if not torch.cuda.is_available():
        print("sanitizer cases need a CUDA GPU")
        return 0
    for group in groups or CASES:
        for name in CASES[group]("cuda"):
            torch.cuda.synchronize()
            print("ran", name, flush=True)
    print("all cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
