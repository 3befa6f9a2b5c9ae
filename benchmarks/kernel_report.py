"""Compile the shipped Triton kernels for sm_80 and sm_90 (no GPU needed) and report their resources.

A spill check, not a speed measure. Every attention kernel for every head-dim class and dtype with the portable
configs (``configs_for``, the fallback where the measured table has no entry; these must not spill), and the
patch-embedding, masked-loss and token kernels per dtype, are compiled to cubins by Triton's own
toolchain. ptxas's own log (``-v``) gives registers, stack frame and spill stores and loads, and
Triton's metadata the shared memory. Run as

    python -m benchmarks.kernel_report [--quick] [--csv FILE]
    python -m benchmarks.kernel_report --measured | --tma [--quick] | --split [--quick] | --key-centre [--quick]
    python -m benchmarks.kernel_report --tma | --key-centre [--quick] --without-twins

It exits non-zero if any kernel spills. ``--quick`` compiles one head dim per tile class, sm_90 only
(and every other kernel). ``--without-twins`` compiles the TMA or key-centre kernels alone, not each after its twin
without the option: that each compiles is checked, at half the compile time, with no resources to compare.
``--measured`` lists the measured table's configs (attention_tiles.py), which were chosen by speed on a GPU and
may spill.
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
from dataclasses import asdict, dataclass, replace

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_report compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mimkernels.timing import commit  # noqa: E402
from mimkernels.triton import attention as kernels  # noqa: E402
from mimkernels.triton import losses as loss_kernels  # noqa: E402
from mimkernels.triton import mlp as mlp_kernels  # noqa: E402
from mimkernels.triton import norms as norm_kernels  # noqa: E402
from mimkernels.triton import patch_embed as patch_kernels  # noqa: E402
from mimkernels.triton import tokens as token_kernels  # noqa: E402
from mimkernels.triton.launch import LAUNCH_OPTIONS  # noqa: E402

ARCHS = (80, 90)
HEAD_DIMS = (16, 32, 40, 64, 80, 128, 256)  # every tile class, with padded (40, 80) and exact head dims
QUICK_HEAD_DIMS = (64, 128, 256)
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class Row:
    kernel: str
    arch: str
    dtype: str
    variant: str  # the head dim for attention kernels
    tile: str
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


@dataclass
class Launch:
    """One kernel as its launcher compiles it: every constexpr fixed, pointer element types given."""
    fn: object
    variant: str
    tile: str
    num_warps: int
    num_stages: int
    pointers: dict
    constexprs: dict
    divisible: tuple = ()  # int arguments that real launches see divisible by 16 (Triton specialises on it)


def _signature(fn, pointer_types: dict[str, str], constexprs: dict, divisible: tuple = ()):
    """Types of every argument: pointers as given, floats for the scales, ints (i32) for the rest."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        elif name in ("scale", "qk_scale", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # real launches see 16-byte aligned pointers and token strides divisible by 16 (H * D * elements)
    aligned = [(i,) for i, name in enumerate(fn.arg_names)
               if pointer_types.get(name, "").startswith("*") or (name.startswith("stride_") and name.endswith("n"))
               or name in divisible]
    return signature, {key: [["tt.divisibility", 16]] for key in aligned}


def attention_launches(head_dim: int, dtype: torch.dtype, cfgs=None, variant: str = "",
                       stored_ds: bool = False, key_centre: bool = False) -> list[Launch]:
    """The attention kernels as mimkernels.triton.attention launches them for this head dim and dtype: with the
    portable configs (``configs_for``) unless ``cfgs`` are given; the atomic-dQ, delta-computing dQ and per-head
    backwards only with ``cfgs``, where they are set; the stored-dS backward's two kernels (dK/dV storing dS, dQ
    from it) with ``cfgs``' tiles for it where set, else with ``stored_ds`` (kernels.STORED_DS: the dK/dV tile and
    STORED_DS_DQ_TILE), where the dK/dV tile allows it. ``key_centre``: the dQ kernels with the keys' shared part
    taken out of dQ (CENTRE_KEYS "dq"), marked ``+centre``."""
    ty = "*" + DTYPES[dtype]
    portable = cfgs is None
    cfgs = cfgs or kernels.configs_for(head_dim, dtype)
    shape = kernels.shape_args(head_dim, dtype)
    pointers = {name: ty for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Q_TAIL", "O_TAIL", "DO_TAIL",
                                      "DQ_TAIL", "Q_HI", "K_HI", "V_HI", "O_HI", "DO_HI", "DQ_HI", "DK_HI", "DV_HI")}
    pointers.update(LSE="*fp32", DELTA="*fp32", PREFIX="*i64", DQ_ACC="*fp32", DS=ty, DS_TAIL=ty, KC=ty)
    plan = [(kernels._prefix_causal_fwd, cfgs.forward, {}),
            (kernels._prefix_causal_bwd_dkdv, cfgs.backward_dkdv, {"DQ_ATOMIC": False, "STORE_DS": 0}),
            (kernels._prefix_causal_bwd_dq, cfgs.backward_dq, {"DELTA_HERE": False})]
    stored = ((cfgs.backward_dkdv_ds, cfgs.backward_dq_from_ds) if not portable and cfgs.backward_dq_from_ds
              else (cfgs.backward_dkdv, kernels.STORED_DS_DQ_TILE) if stored_ds else None)
    if stored and not (stored[0].split_d and kernels.head_dim_split(head_dim)):
        store_ds = 2 if stored[0].tma else 1  # descriptors, or pointers
        plan.append((kernels._prefix_causal_bwd_dkdv, stored[0], {"DQ_ATOMIC": False, "STORE_DS": store_ds}))
        plan.append((kernels._prefix_causal_bwd_dq_from_ds, stored[1], {}))
    if not portable and cfgs.backward_atomic is not None:
        plan.append((kernels._prefix_causal_bwd_dkdv, cfgs.backward_atomic, {"DQ_ATOMIC": True, "STORE_DS": 0}))
    if not portable and cfgs.backward_dq_delta is not None:
        plan.append((kernels._prefix_causal_bwd_dq, cfgs.backward_dq_delta, {"DELTA_HERE": True}))
    if not portable and cfgs.backward_per_head is not None:
        plan.append((kernels._prefix_causal_bwd_per_head, cfgs.backward_per_head, {}))
    parts = kernels.head_dim_split(head_dim)
    if parts:  # split-head-dim configs run these kernels instead (the launchers' choice; not atomic, not per head)
        split_fn = {kernels._prefix_causal_fwd: kernels._prefix_causal_fwd_split_d,
                    kernels._prefix_causal_bwd_dkdv: kernels._prefix_causal_bwd_dkdv_split_d,
                    kernels._prefix_causal_bwd_dq: kernels._prefix_causal_bwd_dq_split_d}
        split_extra = {"BLOCK_LO": parts[0], "BLOCK_HI": parts[1], "EVEN_HI": sum(parts) == head_dim}
        for i, (fn, cfg, extra) in enumerate(plan):
            if cfg.split_d and fn in split_fn and not extra.get("DQ_ATOMIC"):
                plan[i] = (split_fn[fn], cfg, {**extra, **split_extra})
    launches = []
    for fn, cfg, extra in plan:
        # the dK/dV kernel corrects dQ only where it adds dQ (the launcher's rule)
        centre = key_centre and (fn is not kernels._prefix_causal_bwd_dkdv or extra.get("DQ_ATOMIC", False))
        constexprs = {**shape, "PREFIX_IS_TENSOR": True, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                      "USE_TMA": cfg.tma, "KEY_CENTRE": centre, **extra}
        constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
        if "TAIL_M" in fn.arg_names:  # the launchers use no tail tiles with the atomic dQ
            constexprs["TAIL_M"] = 0 if extra.get("DQ_ATOMIC") else cfg.tail_m
        suffix = (" atomic" if extra.get("DQ_ATOMIC") else " +delta" if extra.get("DELTA_HERE")
                  else " per-head" if fn is kernels._prefix_causal_bwd_per_head else " +ds" if extra.get("STORE_DS")
                  else " from-ds" if fn is kernels._prefix_causal_bwd_dq_from_ds else "")
        suffix += " tma" if cfg.tma else ""
        suffix += f" tail{constexprs['TAIL_M']}" if constexprs.get("TAIL_M") else ""
        suffix += f" split{extra['BLOCK_LO']}+{extra['BLOCK_HI']}" if "BLOCK_LO" in extra else ""
        suffix += " +centre" if constexprs.get("KEY_CENTRE") else ""
        launches.append(Launch(fn, f"D={head_dim}{variant}{suffix}", f"{cfg.block_m}x{cfg.block_n}", cfg.num_warps,
                               cfg.num_stages, _tma_operands(pointers, fn, cfg, DTYPES[dtype], {**shape, **extra},
                                                             extra.get("DQ_ATOMIC", False)) if cfg.tma
                               else pointers, constexprs))
    if not portable:
        return launches
    row_dot = {k: shape[k] for k in ("head_dim", "EVEN_D", "BLOCK_D")} | {"BLOCK_M": kernels.ROW_DOT_BLOCK}
    launches.append(Launch(kernels._bwd_row_dot, f"D={head_dim}", f"{kernels.ROW_DOT_BLOCK}", kernels.ROW_DOT_WARPS,
                           kernels.ROW_DOT_STAGES, pointers, row_dot))
    return launches


# the operands each attention kernel takes as [B, H, N, D] tensor descriptors under a +tma config: query-tiled
# ones (block_m rows), key-tiled ones (block_n rows) and the tail tiles' (tail_m rows; block_m without a tail)
TMA_OPERANDS = {"_prefix_causal_fwd": ("Q O", "K V", "Q_TAIL O_TAIL"),
                "_prefix_causal_bwd_dkdv": ("Q DO", "K V DK DV", "Q_TAIL DO_TAIL"),
                "_prefix_causal_bwd_dq": ("Q DO DQ", "K V", "Q_TAIL DO_TAIL DQ_TAIL"),
                "_prefix_causal_bwd_per_head": ("Q DO", "K V DK DV", ""),
                "_prefix_causal_bwd_dq_from_ds": ("DQ", "K", ""),  # and DS, below
                # the split-head-dim kernels: each operand as its first (X) and second (X_HI) column block
                "_prefix_causal_fwd_split_d": ("Q O Q_HI O_HI", "K V K_HI V_HI", ""),
                "_prefix_causal_bwd_dkdv_split_d": ("Q DO Q_HI DO_HI", "K V DK DV K_HI V_HI DK_HI DV_HI", ""),
                "_prefix_causal_bwd_dq_split_d": ("Q DO DQ Q_HI DO_HI DQ_HI", "K V K_HI V_HI", "")}


def _tma_operands(pointers: dict, fn, cfg, dtype_name: str, shape: dict, dq_atomic: bool = False) -> dict:
    """``pointers`` with the kernel's TMA operands as the tensor descriptors a ``+tma`` config passes (the atomic
    dK/dV kernel's fp32 dQ accumulator too)."""
    query_tiled, key_tiled, tails = TMA_OPERANDS[fn.__name__]
    tail_rows = cfg.tail_m if cfg.tail_m and not dq_atomic else cfg.block_m
    rows = ({name: cfg.block_m for name in query_tiled.split()} | {name: cfg.block_n for name in key_tiled.split()}
            | {name: tail_rows for name in tails.split()})
    def columns(name):  # a split kernel's blocks are BLOCK_LO or BLOCK_HI columns wide
        return shape.get("BLOCK_HI" if name.endswith("_HI") else "BLOCK_LO", shape["BLOCK_D"])

    descriptors = {name: f"tensordesc<{dtype_name}[1,1,{r},{columns(name)}]>" for name, r in rows.items()}
    if dq_atomic:
        descriptors["DQ_ACC"] = f"tensordesc<fp32[1,1,{cfg.block_m},{shape['BLOCK_D']}]>"
    if shape.get("STORE_DS") == 2:  # the dS buffer, [B, H, N, N], key tiles by query tiles (by tail tiles)
        descriptors["DS"] = f"tensordesc<{dtype_name}[1,1,{cfg.block_n},{cfg.block_m}]>"
        descriptors["DS_TAIL"] = f"tensordesc<{dtype_name}[1,1,{cfg.block_n},{tail_rows}]>"
    if fn.__name__ == "_prefix_causal_bwd_dq_from_ds":  # reads the dS buffer through a descriptor too
        descriptors["DS"] = f"tensordesc<{dtype_name}[1,1,{cfg.block_n},{cfg.block_m}]>"
    return pointers | descriptors


def other_launches(dtype: torch.dtype) -> list[Launch]:
    """Patch embedding, masked loss and token kernels, with every optional input switched on."""
    ty = "*" + DTYPES[dtype]
    precision = kernels.shape_args(64, dtype)["DOT_PRECISION"]
    launches = []
    r, e, k, warps, stages = patch_kernels.FORWARD_CONFIGS[dtype.itemsize]
    for variant, has_ids in (("bias+pos+ids", True), ("bias+pos+mask", False)):  # MAE's rows, or SimMIM's / BEiT's
        launches.append(Launch(
            patch_kernels._patch_embed_fwd, variant, f"{r}x{e}x{k}", warps, stages,
            {"IMG": ty, "W": ty, "BIAS": "*fp32", "POS": "*fp32", "IDS": "*i64", "MASK": "*fp32", "TOKEN": "*fp32",
             "OUT": ty},
            {"HAS_BIAS": True, "HAS_POS": True, "HAS_IDS": has_ids, "HAS_MASK": not has_ids, "BLOCK_R": r,
             "BLOCK_E": e, "BLOCK_K": k, "DOT_PRECISION": precision}))
    e, k, r, warps, stages = patch_kernels.WEIGHT_GRAD_CONFIGS[dtype.itemsize]
    launches.append(Launch(
        patch_kernels._patch_embed_weight_grad, "ids", f"{e}x{k}x{r}", warps, stages,
        {"IMG": ty, "GRAD": ty, "IDS": "*i64", "GRAD_W": "*fp32"},
        {"HAS_IDS": True, "BLOCK_E": e, "BLOCK_K": k, "BLOCK_R": r, "DOT_PRECISION": precision}))
    for group in (1, 8):  # the default one patch per program, and a group (selectable, not yet measured)
        tile, warps, stages = loss_kernels.launch_config(16, 3, group)  # ViT-B/16 patches: 768 values
        for variant, norm_pix, l1 in (("norm_pix", True, False), ("l1", False, True)):  # MAE's loss, SimMIM's
            for fn in (loss_kernels._masked_patch_loss_fwd, loss_kernels._masked_patch_loss_bwd):
                launches.append(Launch(fn, variant, f"{group}x{tile['BLOCK']}", warps, stages,
                                       {"IMG": "*fp32", "PRED": ty, "MASK": "*fp32", "PATCH_LOSS": "*fp32",
                                        "SCALE": "*fp32", "GRAD_PRED": ty},
                                       {"NORM_PIX": norm_pix, "L1": l1, **tile}))
    tile, warps, stages = token_kernels.launch_config(1024)  # wide tokens: the largest width block
    for fn in (token_kernels._gather_rows, token_kernels._restore_rows):
        launches.append(Launch(fn, "pos", f"{tile['BLOCK_R']}x{tile['BLOCK_D']}", warps, stages,
                               {"X": ty, "IDS": "*i64", "POS": "*fp32", "TOKEN": ty, "OUT": ty},
                               {"HAS_POS": True, **tile}))
    backward_tile = {"BLOCK_S": token_kernels.BACKWARD_BLOCK_S, "BLOCK_R": token_kernels.BLOCK_ROWS,
                     "BLOCK_D": token_kernels.BACKWARD_BLOCK_D}
    for variant, scatter in (("scatter+pos+token", True), ("gather+pos", False)):  # restore's backward, gather's
        launches.append(Launch(token_kernels._rows_backward, variant, "{BLOCK_S}x{BLOCK_R}x{BLOCK_D}".format(
                               **backward_tile),
                               token_kernels.BACKWARD_WARPS, token_kernels.BACKWARD_STAGES,
                               {"GRAD": ty, "IDS": "*i64", "OUT": ty, "POS_PARTS": "*fp32", "TOKEN_PARTS": "*fp32"},
                               {"SCATTER": scatter, "SUM_POS": True, "SUM_TOKEN": scatter, **backward_tile}))
    tile, warps, stages = norm_kernels.launch_config(2048)  # AIM's head width: the widest row
    pointers = {"X": "*fp32", "BRANCH": ty, "WEIGHT": "*fp32", "BIAS": "*fp32", "TOTAL": "*fp32", "NORMED": ty,
                "MEAN": "*fp32", "RSTD": "*fp32", "GRAD_NORMED": ty, "GRAD_TOTAL": "*fp32", "GRAD_X": "*fp32",
                "GRAD_BRANCH": ty, "WEIGHT_PARTS": "*fp32", "BIAS_PARTS": "*fp32"}  # fp32 stream under autocast
    switches = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_GRAD_TOTAL": True, "HAS_GRAD_BRANCH": True, **tile}
    for fn in (norm_kernels._add_layer_norm_fwd, norm_kernels._add_layer_norm_bwd):
        launches.append(Launch(fn, "affine", f"{tile['BLOCK']}", warps, stages, pointers,
                               {name: value for name, value in switches.items() if name in fn.arg_names}))
    return launches + mlp_launches(dtype, mlp_kernels.CONFIGS[dtype.itemsize])


# the 2-D block of each MLP GEMM operand read or written through a descriptor under a tma tile, per kernel
MLP_BLOCKS = {"_linear_gelu_fwd": {"X": "mk", "W": "nk", "H": "mn", "G": "mn"},
              "_matmul_gelu_grad": {"GRAD": "mk", "W": "kn", "H": "mn", "GRAD_H": "mn"}}


def mlp_launches(dtype: torch.dtype, tile) -> list[Launch]:
    """The MLP's two GEMM kernels with a ``GemmTile`` (its operands as tensor descriptors where ``tile.tma``)."""
    ty = "*" + DTYPES[dtype]
    precision = kernels.shape_args(64, dtype)["DOT_PRECISION"]
    constexprs = {"HAS_BIAS": True, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k,
                  "GROUP_M": tile.group_m, "EVEN_K": False, "DOT_PRECISION": precision, "USE_TMA": tile.tma}
    size = {"m": tile.block_m, "n": tile.block_n, "k": tile.block_k}
    launches = []
    for fn in (mlp_kernels._linear_gelu_fwd, mlp_kernels._matmul_gelu_grad):
        pointers = {name: ty for name in ("X", "W", "BIAS", "H", "G", "GRAD", "GRAD_H")}
        if tile.tma:
            pointers |= {name: f"tensordesc<{DTYPES[dtype]}[{size[block[0]]},{size[block[1]]}]>"
                         for name, block in MLP_BLOCKS[fn.__name__].items()}
        launches.append(Launch(fn, "bias tma" if tile.tma else "bias", f"{tile.block_m}x{tile.block_n}x{tile.block_k}",
                               tile.warps, tile.stages, pointers, constexprs,
                               # model widths (multiples of 16): row strides and sizes
                               tuple(name for name in fn.arg_names if name.startswith("stride_"))
                               + ("cols", "depth")))
    return launches


_PTXAS_LOG = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                        r".*?Used (\d+) registers", re.S)


def compile_one(launch: Launch, arch: int) -> tuple[int, int, int, int, int]:
    """registers, shared bytes, stack bytes, spill store bytes, spill load bytes of one compiled kernel."""
    constexprs = {k: v for k, v in launch.constexprs.items() if k in launch.fn.arg_names}
    pointers = {k: v for k, v in launch.pointers.items() if k in launch.fn.arg_names}
    signature, attrs = _signature(launch.fn, pointers, constexprs, launch.divisible)
    src = ASTSource(launch.fn, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    # a cached cubin would skip ptxas and its log, so compile afresh with the log printed
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages,
                                           **LAUNCH_OPTIONS})
    stack, spill_stores, spill_loads, regs = map(int, _PTXAS_LOG.search(log.getvalue()).groups())
    return regs, compiled.metadata.shared, stack, spill_stores, spill_loads


def measured_report() -> list[Row]:
    """The measured table's configs (attention_tiles.py), each on its own architecture: for information, since a
    config that spills but measured faster may ship."""
    from mimkernels.triton import attention_tiles

    rows = []
    for key in sorted(attention_tiles.MEASURED):
        arch, itemsize, block_d, seq_class = key
        dtype = {2: torch.bfloat16, 4: torch.float32}[itemsize]
        for launch in attention_launches(block_d, dtype, kernels.measured_configs(key), f" N<={seq_class}"):
            rows.append(Row(launch.fn.__name__, f"sm_{arch}", DTYPES[dtype], launch.variant, launch.tile,
                            launch.num_warps, launch.num_stages, *compile_one(launch, arch)))
            print(_format(rows[-1]), flush=True)
    return rows


def bf16_sm90_table(quick: bool = False) -> list[tuple[int, kernels.AttentionConfigs, str]]:
    """(head dim, configs, variant label) of each bf16 sm_90 entry of the measured table (``quick``: D 128, AIM's)."""
    from mimkernels.triton import attention_tiles

    return [(key[2], kernels.measured_configs(key), f" N<={key[3]}") for key in sorted(attention_tiles.MEASURED)
            if key[0] == 90 and key[1] == 2 and not (quick and key[2] != 128)]


def stored_ds_report(quick: bool = False) -> list[Row]:
    """The stored-dS backward's kernels (kernels.STORED_DS) with the measured table's bf16 sm_90 tiles (``quick``:
    D 128, AIM's), each after the table's own dK/dV and dQ kernels: that they compile, and what storing dS costs."""
    rows = []
    for block_d, cfgs, variant in bf16_sm90_table(quick):
        for launch in attention_launches(block_d, torch.bfloat16, cfgs, variant, stored_ds=True):
            if launch.fn in (kernels._prefix_causal_fwd, kernels._prefix_causal_fwd_split_d):
                continue
            rows.append(_compiled_row(launch))
    return rows


def every_dq_path(head_dim: int, tma: bool) -> kernels.AttentionConfigs:
    """The portable bf16 tiles for ``head_dim`` with every optional backward set to them (atomic, delta in dQ, per
    head, stored dS with STORED_DS_DQ_TILE), through TMA or not, and split where the head dim splits: configs that
    make :func:`attention_launches` compile each kernel that computes dQ."""
    portable = kernels.configs_for(head_dim, torch.bfloat16)
    split = kernels.head_dim_split(head_dim) is not None
    dkdv, dq = (replace(cfg, tma=tma) for cfg in (portable.backward_dkdv, portable.backward_dq))
    return replace(portable, backward_dq=replace(dq, split_d=split), backward_atomic=dkdv, backward_dq_delta=dq,
                   backward_per_head=dkdv, backward_dkdv_ds=dkdv,
                   backward_dq_from_ds=replace(kernels.STORED_DS_DQ_TILE, tma=tma))


def key_centre_report(quick: bool = False, twins: bool = True) -> list[Row]:
    """The kernels that compute dQ, each after the same kernel without CENTRE_KEYS "dq"'s correction where ``twins``
    (what it costs in registers and spills): with the measured table's bf16 sm_90 tiles, then every dQ path
    (:func:`every_dq_path`) at D 64, 80 (split) and 128, through pointers and TMA; ``quick``: the table's D 128
    (AIM's) and every path at D 80 through pointers and at D 128 through TMA (each kernel at least once)."""
    plans = bf16_sm90_table(quick)
    paths = ((80, False), (128, True)) if quick else [(d, tma) for d in (64, 80, 128) for tma in (False, True)]
    plans += [(head_dim, every_dq_path(head_dim, tma), " every-path") for head_dim, tma in paths]
    rows = []
    for head_dim, cfgs, variant in plans:
        pairs = zip(*(attention_launches(head_dim, torch.bfloat16, cfgs, variant, key_centre=centre)
                      for centre in (False, True)))
        for plain, centred in pairs:
            if "+centre" in centred.variant:
                rows += [_compiled_row(plain), _compiled_row(centred)] if twins else [_compiled_row(centred)]
    return rows


def candidate_launch(head_dim: int, kernel: str, tile, variant: str = "") -> Launch:
    """The launch of one tuner ``kernel`` (a key of attention_tuning.CANDIDATES) with ``tile``, bf16, the other
    kernels portable: for the stored-dS ones (which run as a pair) the other of the pair is the portable dK/dV tile or
    STORED_DS_DQ_TILE."""
    portable = kernels.configs_for(head_dim, torch.bfloat16)
    if kernel in ("backward_dkdv_ds", "backward_dq_from_ds"):
        pair = (tile, kernels.STORED_DS_DQ_TILE) if kernel == "backward_dkdv_ds" else (portable.backward_dkdv, tile)
        kept = "+ds" if kernel == "backward_dkdv_ds" else "from-ds"
        cfgs = replace(portable, backward_dkdv_ds=pair[0], backward_dq_from_ds=pair[1])
        return next(launch for launch in attention_launches(head_dim, torch.bfloat16, cfgs, variant)
                    if kept in launch.variant.split())
    # where attention_launches puts each other kernel (an optional backward last: one at most is set here)
    slot = {"forward": 0, "backward_dkdv": 1, "backward_dq": 2}.get(kernel, -1)
    return attention_launches(head_dim, torch.bfloat16, replace(portable, **{kernel: tile}), variant)[slot]


def _compiled_row(launch: Launch, arch: int = 90) -> Row:
    row = Row(launch.fn.__name__, f"sm_{arch}", DTYPES[torch.bfloat16], launch.variant, launch.tile, launch.num_warps,
              launch.num_stages, *compile_one(launch, arch))
    print(_format(row), flush=True)
    return row


def stored_ds_candidates_report(head_dims=(128,)) -> list[Row]:
    """The tuner's stored-dS candidates (attention_tuning.CANDIDATES "backward_dkdv_ds" and "backward_dq_from_ds"),
    bf16 on sm_90: that they compile, and their resources (dS through descriptors under +tma tiles, else pointers)."""
    from mimkernels.triton import attention_tuning

    return [_compiled_row(candidate_launch(head_dim, kernel, kernels.TileConfig.parse(text), " candidate"))
            for head_dim in head_dims for kernel in ("backward_dkdv_ds", "backward_dq_from_ds")
            for text in attention_tuning.CANDIDATES[kernel]]


def report(head_dims=HEAD_DIMS, archs=ARCHS, dtypes=tuple(DTYPES)) -> list[Row]:
    rows = []
    for arch in archs:
        for dtype in dtypes:
            launches = [launch for head_dim in head_dims for launch in attention_launches(head_dim, dtype)]
            for launch in launches + other_launches(dtype):
                rows.append(Row(launch.fn.__name__, f"sm_{arch}", DTYPES[dtype], launch.variant, launch.tile,
                                launch.num_warps, launch.num_stages, *compile_one(launch, arch)))
                print(_format(rows[-1]), flush=True)
    return rows


def candidates_report(option: str, head_dims, twins: bool = True) -> list[Row]:
    """The tuner's candidates (attention_tuning.CANDIDATES) with ``option`` set (``"tma"`` or ``"split_d"``),
    bf16 on sm_90, each after the same tile without it where ``twins``: that they compile, and their resources
    beside the base tiles'."""
    from mimkernels.triton import attention_tuning

    rows = []
    for head_dim in head_dims:
        for kernel in attention_tuning.KERNELS:
            for text in attention_tuning.CANDIDATES[kernel]:
                cfg = kernels.TileConfig.parse(text)
                if not getattr(cfg, option):
                    continue
                for tile in (replace(cfg, **{option: False}), cfg) if twins else (cfg,):
                    rows.append(_compiled_row(candidate_launch(head_dim, kernel, tile)))
    return rows


def tma_candidates_report(head_dims=(64, 80, 128), twins: bool = True) -> list[Row]:
    """The tuner's ``+tma`` candidates and the MLP GEMMs' tma tiles (mlp.CANDIDATES), bf16 on sm_90, the only
    architecture that runs them, each after the same tile through pointers where ``twins``."""
    rows = candidates_report("tma", head_dims, twins)
    for tile in mlp_kernels.CANDIDATES:  # the MLP GEMMs' tma tiles (bench_mlp --sweep), after their pointer twins
        if not tile.tma:
            continue
        pointer_twins = mlp_launches(torch.bfloat16, tile._replace(tma=False)) if twins else []
        for launch in pointer_twins + mlp_launches(torch.bfloat16, tile):
            rows.append(Row(launch.fn.__name__, "sm_90", "bf16", launch.variant, launch.tile, launch.num_warps,
                            launch.num_stages, *compile_one(launch, 90)))
            print(_format(rows[-1]), flush=True)
    return rows


def _format(row: Row) -> str:
    flag = "  SPILLS" if row.spills else ""
    return (f"{row.kernel:26s} {row.arch} {row.dtype} {row.variant:12s} tile {row.tile:10s} "
            f"w{row.num_warps} s{row.num_stages}  regs {row.registers:3d}  smem {row.shared_bytes:6d} B  "
            f"stack {row.stack_bytes:4d}  spill st/ld {row.spill_store_bytes}/{row.spill_load_bytes}{flag}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one head dim per tile class, sm_90 only (with --tma: D = 128 only)")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--measured", action="store_true",
                        help="report the measured table's configs instead (spills are listed, not failed)")
    parser.add_argument("--tma", action="store_true",
                        help="compile the TMA candidates (attention tuner, MLP sweep) for sm_90 instead (spills "
                        "listed, not failed)")
    parser.add_argument("--split", action="store_true",
                        help="compile the tuner's split-head-dim candidates at D = 80 for sm_90 instead, each after "
                        "its base tile (with --quick: without; spills listed, not failed)")
    parser.add_argument("--stored-ds", action="store_true",
                        help="compile the stored-dS backward with the measured table's bf16 sm_90 tiles instead, "
                        "beside the table's own backward kernels, then the tuner's stored-dS candidates (with "
                        "--quick: D = 128 only, no candidates; spills listed, not failed)")
    parser.add_argument("--key-centre", action="store_true",
                        help="compile the dQ kernels with CENTRE_KEYS 'dq''s correction, with the measured table's "
                        "bf16 sm_90 tiles and on every dQ path, each after the same kernel without it (with --quick: "
                        "the table's D = 128 and each path once; spills listed, not failed)")
    parser.add_argument("--without-twins", action="store_true",
                        help="with --tma or --key-centre: compile those kernels alone, not each after its twin "
                        "without the option (a check that each compiles, in half the time)")
    args = parser.parse_args(argv)
    if args.without_twins and not (args.tma or args.key_centre):
        parser.error("--without-twins goes with --tma or --key-centre")
    source = commit()  # the code compiled is the code at the start
    if args.key_centre:
        rows = key_centre_report(args.quick, twins=not args.without_twins)
        centred = [row for row in rows if "+centre" in row.variant]
        spills = sum(row.spills for row in centred)
        said = (f"without their twins; spills: {spills} (" if args.without_twins else
                f"each after its twin without; spills: {spills} (twins: {sum(row.spills for row in rows) - spills}; ")
        print(f"{len(centred)} dQ kernels with the keys' shared part taken out compiled for sm_90 with triton "
              f"{triton.__version__}, {said}allowed: a GPU measures them)")
        return 0
    if args.stored_ds:
        rows = stored_ds_report(args.quick) + ([] if args.quick else stored_ds_candidates_report((64, 80, 128)))
        stored = [row for row in rows if {"+ds", "from-ds"} & set(row.variant.split())]
        print(f"{len(stored)} stored-dS kernels compiled for sm_90 with triton {triton.__version__}; spills: "
              f"{sum(row.spills for row in stored)} (allowed: a GPU measures them)")
        return 0
    if args.measured:
        rows = measured_report()
        print(f"{len(rows)} kernels of the measured table compiled with triton {triton.__version__}; "
              f"{sum(row.spills for row in rows)} spill (allowed: chosen by measured speed)")
        return 0
    if args.tma:
        rows = tma_candidates_report((128,) if args.quick else (64, 80, 128), twins=not args.without_twins)
        tma = [row for row in rows if "tma" in row.variant.split()]
        spills = sum(row.spills for row in tma)
        pointer = sum(row.spills for row in rows) - spills
        said = (f"without their pointer twins; spills: {spills} TMA" if args.without_twins else
                f"each after its pointer twin; spills: {spills} TMA, {pointer} pointer")
        print(f"{len(tma)} TMA candidates compiled for sm_90 with triton {triton.__version__}, {said} (allowed: the "
              "tuner measures them)")
        return 0
    if args.split:
        rows = candidates_report("split_d", (80,), twins=not args.quick)
        split = [row for row in rows if " split" in row.variant]
        print(f"{len(split)} split-head-dim candidates compiled for sm_90 with triton {triton.__version__}; spills: "
              f"{sum(row.spills for row in split)} (allowed: the tuner measures them)")
        return 0
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
