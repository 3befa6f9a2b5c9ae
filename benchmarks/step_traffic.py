"""Memory traffic of one training step outside the GEMMs, by op category, per provider: counted on the CPU.

A model of what a GPU step moves, not a timing: one forward + backward under bf16 autocast runs on the CPU, and
every PyTorch op that is not a view counts the bytes of its tensor inputs and outputs (what a kernel that reads
each input once and writes each output once moves). mimkernels' Triton kernels do not run: their launches are
replaced by no-ops (their results do not change which ops run) and each counts the bytes of the tensors it is
handed, as ``ours``. Allocations and views count nothing. GEMM bytes are listed but are not where the providers differ.

Why: the H200 profile of the MAE ViT-L and AIM-600M steps (../shared/gpu-results/2026-11-27-h200/) spent 30-35% of
the step in elementwise ops, copies and casts, LayerNorm and reductions, the part a fusion can remove; this counts
that part for each provider on any machine, so a change is checked before a GPU times it.

    python -m benchmarks.step_traffic [--shapes mae_vit_b aim_600m] [--batch 16] [--providers ...] [--by-op 12]

CPU autocast's op lists differ from CUDA's in a few ops (not in Linear, LayerNorm, GELU, the adds); the CPU's
attention and its gradient are one SDPA op each, as cuDNN's are on the GPU.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import mimkernels
from benchmarks import bench_models
from mimkernels import _backend, models, timing

# ops that move no data: allocations, and views whose schema does not say so
_FREE = {"empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided", "_unsafe_view", "_reshape_alias"}
DEFAULT_PROVIDERS = ("mimkernels", "mimkernels_fused_norm")
# our kernels that are GEMMs (with an epilogue): counted as ``gemm``, beside cuBLAS's
_OUR_GEMMS = ("_linear_gelu_fwd", "_matmul_gelu_grad")
# The CPU's bf16 GEMMs (and convolutions, attention) would take most of the time and their values change no op that
# runs after them: their outputs are zeros of the shape, dtype and strides their meta kernels give.
_NOT_COMPUTED = ("gemm", "attn_sdpa")


def _bytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


class TrafficCount(TorchDispatchMode):
    """Bytes and op counts by category (bench_models' kernel categories applied to aten op names)."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()
        self.ops = collections.Counter()
        self.op_bytes = collections.Counter()  # (category, op or kernel name) -> bytes
        self.op_calls = collections.Counter()

    def add(self, category: str, nbytes: int, op: str = "") -> None:
        self.bytes[category] += nbytes
        self.ops[category] += 1
        self.op_bytes[category, op] += nbytes
        self.op_calls[category, op] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        category = "gemm" if name.startswith("convolution") else bench_models.kernel_category(f"aten::{name}")
        kwargs = kwargs or {}
        out = _shaped_zeros(func, args, kwargs) if category in _NOT_COMPUTED else func(*args, **kwargs)
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not is_view and name not in _FREE:
            self.add(category, _bytes((args, kwargs, out)), name)
        return out



def _shaped_zeros(func, args, kwargs):
    def to_meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    meta = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
    return tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_()
                    if isinstance(t, torch.Tensor) else t, meta)


@contextlib.contextmanager
def kernels_counted_not_run(count: TrafficCount):
    """mimkernels' Triton launches become no-ops that count their tensors' bytes as ``ours`` (our GEMMs as
    ``gemm``), and the Triton backend is usable on CPU tensors without the interpreter (nothing is launched)."""
    from mimkernels.triton import attention, losses, mlp, norms, patch_embed, tokens

    def counted(kernel, grid, tensors, *rest, **options):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        count.add("gemm" if name in _OUR_GEMMS else "ours", _bytes([getattr(t, "base", t) for t in tensors]), name)

    modules = (attention, losses, mlp, norms, patch_embed, tokens)
    launches = [module.launch for module in modules]
    why_not = _backend._why_not
    try:
        for module in modules:
            module.launch = counted
        _backend._why_not = lambda name, device: None if name == "triton" else why_not(name, device)
        yield
    finally:
        for module, original in zip(modules, launches):
            module.launch = original
        _backend._why_not = why_not


def step_traffic(family: str, config: str, batch: int, providers=DEFAULT_PROVIDERS) -> dict:
    """provider -> TrafficCount of one forward + backward (bf16 autocast, CPU) of the model ``config``."""
    torch.manual_seed(0)
    model = getattr(models, config)(**bench_models.model_kwargs(family, config))
    height, width = model.patch_embed.img_size
    imgs = torch.randn(batch, 3, height, width)
    found = {}
    with mimkernels.use_backend("triton"):
        losses = bench_models.providers(family, model, imgs, "cpu")
        for provider in providers:
            if provider not in losses:
                raise ValueError(f"provider {provider!r} is not one of {sorted(losses)}")
            count = found[provider] = TrafficCount()
            with kernels_counted_not_run(count), count:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = losses[provider]()
                loss.backward()
            model.zero_grad(set_to_none=True)
    return found


def report(title: str, counts: dict) -> str:
    categories = sorted({c for count in counts.values() for c in count.bytes}, key=lambda c: (c == "gemm", c))
    lines = [f"## {title}: MB moved per step by op category (op count), GEMMs last",
             f"   {'category':16s}" + "".join(f"{p:>28s}" for p in counts)]
    for category in categories:
        lines.append(f"   {category:16s}" + "".join(f"{c.bytes[category] / 1e6:20.1f} ({c.ops[category]:4d})"
                                                   for c in counts.values()))
    outside = {p: sum(b for cat, b in c.bytes.items() if cat not in ("gemm", "ours")) for p, c in counts.items()}
    lines.append(f"   {'not GEMM, not ours':16s}" + "".join(f"{b / 1e6:27.1f} " for b in outside.values()))
    return "\n".join(lines) + "\n"


def report_by_op(title: str, counts: dict, top: int) -> str:
    """The ``top`` ops (and our kernels) moving the most bytes outside the GEMMs, per provider."""
    lines = [f"## {title}: the {top} ops moving the most MB outside the GEMMs (calls)"]
    for provider, count in counts.items():
        lines.append(f"   {provider}")
        largest = [(key, b) for key, b in count.op_bytes.most_common() if key[0] not in _NOT_COMPUTED][:top]
        lines += [f"     {category:12s} {op:36s} {b / 1e6:12.1f} ({count.op_calls[category, op]:4d})"
                  for (category, op), b in largest]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["mae_vit_b", "aim_600m"], choices=sorted(bench_models.SHAPES))
    parser.add_argument("--batch", type=int, default=8, help="images per step (the bytes scale with it)")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="default: ours, ours with FUSED_ADD_NORM, and the shape's official baseline")
    parser.add_argument("--by-op", type=int, default=0, metavar="N",
                        help="also list each provider's N ops or kernels moving the most bytes outside the GEMMs")
    args = parser.parse_args(argv)
    print("# " + ", ".join(f"{k} {v}" for k, v in timing.provenance("cpu").items()), flush=True)
    for shape in args.shapes:
        family, config, _ = bench_models.SHAPES[shape]
        providers = args.providers or (*DEFAULT_PROVIDERS, bench_models.BASELINES[family])
        title = f"{shape} ({config}, batch {args.batch}, bf16 autocast)"
        counts = step_traffic(family, config, args.batch, providers)
        print(report(title, counts), flush=True)
        if args.by_op:
            print(report_by_op(title, counts, args.by_op), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
