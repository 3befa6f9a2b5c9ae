"""dQ's error against float64 when every key of a head shares a large part (a key bias), for each CENTRE_KEYS mode.

Keys are unit noise plus one vector per head whose columns are ``shared`` times N(0, 1); q, v and the output
gradient are unit noise; per-sample prefixes. Prints, per shared size, dQ's largest error over dQ's largest value
for our kernels with CENTRE_KEYS off, True (keys centred first) and "dq" (the kernels' dQ correction), and for SDPA
with the dense mask on the same inputs. A precision measure, not a timing: it runs anywhere (on the CPU through the
Triton interpreter, so set TRITON_INTERPRET=1 there, and keep the shape small).

    TRITON_INTERPRET=1 python -m benchmarks.shared_key_error [--shape 2 4 197 64] [--dtype fp16]
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

import mimkernels
from mimkernels import reference
from mimkernels.ops import attention as attention_ops

from . import common

MODES = {"ours": False, "ours_centred_keys": True, "ours_centred_dq": "dq"}


def inputs(shape, shared: float, dtype, seed: int = 0):
    """q, k, v, the output gradient (values of ``dtype``, held in float64 on the CPU: the reference sees exactly
    what the kernels see) and per-sample prefixes."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    k += shared * torch.randn(1, shape[1], 1, shape[3], generator=gen, dtype=torch.float64)
    prefix = torch.randint(0, shape[2] + 1, (shape[0],), generator=gen)
    return (*(t.to(dtype).double() for t in (q, k, v, grad_out)), prefix)


def dq_of(attend, q, k, v, grad_out, dtype, device):
    """dQ of ``attend(q, k, v)`` with the inputs rounded to ``dtype`` on ``device``, as float64 on the CPU."""
    leaf = q.to(device, dtype).requires_grad_()
    out = attend(leaf, k.to(device, dtype), v.to(device, dtype))
    (grad,) = torch.autograd.grad(out, leaf, grad_out.to(device, dtype))
    return grad.double().cpu()


def relative_dq_errors(shape, shared: float, dtype, device) -> dict[str, float]:
    q, k, v, grad_out, prefix = inputs(shape, shared, dtype)
    prefix_here = prefix.to(device)
    want = dq_of(lambda q, k, v: reference.prefix_causal_attention(q, k, v, prefix), q, k, v, grad_out,
                 torch.float64, "cpu")
    mask = mimkernels.prefix_causal_mask(shape[2], prefix_here)
    runs = {name: (lambda q, k, v: mimkernels.prefix_causal_attention(q, k, v, prefix_here),
                   common.switched(attention_ops, "CENTRE_KEYS", mode)) for name, mode in MODES.items()}
    runs["sdpa_dense_mask"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               contextlib.nullcontext())
    errors = {}
    for name, (attend, switch) in runs.items():
        with switch, mimkernels.use_backend("triton"):
            got = dq_of(attend, q, k, v, grad_out, dtype, device)
        errors[name] = ((got - want).abs().max() / want.abs().max()).item()
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=4, type=int, default=[2, 4, 197, 64], metavar=("B", "H", "N", "D"))
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--shared", nargs="+", type=float, default=[0, 1, 4, 8, 32, 128])
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(f"dQ: largest error against float64 over largest value; {args.dtype}, B H N D = {args.shape}, "
          f"per-sample prefixes, {common.device_name(device)}")
    print(f"{'shared':>7s} " + " ".join(f"{name:>18s}" for name in (*MODES, "sdpa_dense_mask")))
    for shared in args.shared:
        errors = relative_dq_errors(tuple(args.shape), shared, dtype, device)
        print(f"{shared:7g} " + " ".join(f"{errors[name]:18.1e}" for name in (*MODES, "sdpa_dense_mask")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
