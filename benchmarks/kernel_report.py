"""Compile the shipped attention kernels for sm_80 and sm_90 (no GPU needed) and report their resources.

For every head-dim class, dtype and kernel, the config that ``configs_for`` ships is compiled to a
cubin by Triton's own toolchain. ptxas's own log (``-v``) gives registers, stack frame and spill
stores and loads, and Triton's metadata the shared memory. Run as

    python -m benchmarks.kernel_report [--quick] [--csv FILE]

It exits non-zero if any kernel spills. ``--quick`` compiles one head dim per tile class, sm_90 only.
TRITON_INTERPRET must be unset: the interpreter replaces the compiler.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import sys
from dataclasses import asdict, dataclass

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_report compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.common import commit  # noqa: E402
from mimkernels.triton import attention as kernels  # noqa: E402

ARCHS = (80, 90)
HEAD_DIMS = (16, 32, 40, 64, 80, 128, 256)  # every tile class, with padded (40, 80) and exact head dims
QUICK_HEAD_DIMS = (64, 128, 256)
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class Row:
    kernel: str
    arch: str
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def _signature(fn, pointer_types: dict[str, str], constexprs: dict):
    """Types of every argument: pointers as given, floats for the scales, ints (i32) for the rest."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        elif name in ("scale", "qk_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # real launches see 16-byte aligned pointers and token strides divisible by 16 (H * D * elements)
    aligned = [(i,) for i, name in enumerate(fn.arg_names)
               if name in pointer_types or (name.startswith("stride_") and name.endswith("n"))]
    return signature, {key: [["tt.divisibility", 16]] for key in aligned}


def _launches(head_dim: int, dtype: torch.dtype):
    """(kernel, tile config, pointer types, constexprs) as the launchers in mimkernels.triton.attention use them."""
    ty = "*" + DTYPES[dtype]
    cfgs = kernels.configs_for(head_dim, dtype)
    shape = kernels.shape_args(head_dim, dtype)
    prefix = {"PREFIX_IS_TENSOR": True}
    tensors = {name: ty for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    tensors.update(LSE="*fp32", DELTA="*fp32", PREFIX="*i64")
    row_dot = kernels.TileConfig(kernels.ROW_DOT_BLOCK, 0, 4, 1)
    return [
        (kernels._prefix_causal_fwd, cfgs.forward, tensors, prefix),
        (kernels._prefix_causal_bwd_dkdv, cfgs.backward_dkdv, tensors, prefix),
        (kernels._prefix_causal_bwd_dq, cfgs.backward_dq, tensors, prefix),
        (kernels._bwd_row_dot, row_dot, tensors, {"head_dim": shape["head_dim"], "EVEN_D": shape["EVEN_D"],
                                                  "BLOCK_D": shape["BLOCK_D"]}),
    ], shape


_PTXAS_LOG = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                        r".*?Used (\d+) registers", re.S)


def compile_one(fn, cfg, pointer_types, extra_constexprs, shape, arch: int) -> tuple[int, int, int, int, int]:
    """registers, shared bytes, stack bytes, spill store bytes, spill load bytes of one compiled kernel."""
    constexprs = {k: v for k, v in {**shape, **extra_constexprs}.items() if k in fn.arg_names}
    if "BLOCK_M" in fn.arg_names:
        constexprs["BLOCK_M"] = cfg.block_m
    if "BLOCK_N" in fn.arg_names:
        constexprs["BLOCK_N"] = cfg.block_n
    signature, attrs = _signature(fn, pointer_types, constexprs)
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    # a cached cubin would skip ptxas and its log, so compile afresh with the log printed
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    stack, spill_stores, spill_loads, regs = map(int, _PTXAS_LOG.search(log.getvalue()).groups())
    return regs, compiled.metadata.shared, stack, spill_stores, spill_loads


def report(head_dims=HEAD_DIMS, archs=ARCHS, dtypes=tuple(DTYPES)) -> list[Row]:
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for head_dim in head_dims:
                launches, shape = _launches(head_dim, dtype)
                for fn, cfg, pointers, constexprs in launches:
                    rows.append(Row(fn.__name__, f"sm_{arch}", DTYPES[dtype], head_dim, cfg.block_m, cfg.block_n,
                                    cfg.num_warps, cfg.num_stages,
                                    *compile_one(fn, cfg, pointers, constexprs, shape, arch)))
                    print(_format(rows[-1]), flush=True)
    return rows


def _format(row: Row) -> str:
    flag = "  SPILLS" if row.spills else ""
    return (f"{row.kernel:26s} {row.arch} {row.dtype} D={row.head_dim:<3d} tile {row.block_m:>3d}x{row.block_n:<3d} "
            f"w{row.num_warps} s{row.num_stages}  regs {row.registers:3d}  smem {row.shared_bytes:6d} B  "
            f"stack {row.stack_bytes:4d}  spill st/ld {row.spill_store_bytes}/{row.spill_load_bytes}{flag}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one head dim per tile class, sm_90 only")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    source = commit()  # the code compiled is the code at the start
    rows = report(QUICK_HEAD_DIMS, (90,)) if args.quick else report()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) + ["triton", "commit"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**asdict(row), "triton": triton.__version__, "commit": source})
    spilled = [row for row in rows if row.spills]
    print(f"{len(rows)} kernels compiled with triton {triton.__version__}; {len(spilled)} spill")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
