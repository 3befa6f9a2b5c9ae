"""Choosing attention tile configs by measured speed on the GPU at hand.

Two users: ``python -m benchmarks.tune_attention`` (sweeps the benchmark shapes on a GPU and rewrites
``attention_tiles.py``) and ``MIMKERNELS_AUTOTUNE=1`` (sweeps the shape of a call whose GPU and shape class
the table lacks, once per class and process). Every trial is checked against the float32 reference before it
is timed: a fast wrong config is never chosen.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from .. import reference
from . import attention as kernels
from .attention import AttentionConfigs, TileConfig

# Candidate tiles per kernel ("block_m x block_n x warps x stages"). The first H200 sweep (shared results,
# 2026-11-27) found the winners among bigger tiles than the spill-free ones; these span them and their neighbours.
CANDIDATES = {
    "forward": ("128x32x4x4", "128x64x4x3", "128x64x8x3", "128x64x8x4", "128x128x8x2", "128x128x8x3",
                "64x64x4x3", "64x64x4x4", "64x32x4x4", "64x128x4x3"),
    "backward_dkdv": ("32x128x8x3", "32x128x4x3", "32x64x4x3", "32x64x8x2", "64x128x8x2", "64x128x8x3",
                      "64x64x4x2", "64x64x4x3", "16x128x8x3"),
    "backward_dq": ("64x32x4x3", "64x32x4x4", "64x64x4x3", "128x32x4x3", "128x32x8x3", "128x64x8x2",
                    "128x64x8x3", "128x128x8x2"),
    "backward_atomic": ("32x128x8x3", "32x64x4x3", "64x64x4x3", "64x128x8x2", "64x128x8x3", "32x128x4x3"),
    # the fixed row-dot pre-pass, timed only to compare dQ + pre-pass with the dQ kernel that computes delta
    "backward_row_dot": (f"{kernels.ROW_DOT_BLOCK}x0x{kernels.ROW_DOT_WARPS}x{kernels.ROW_DOT_STAGES}",),
    "backward_dq_delta": ("64x32x4x3", "64x64x4x3", "128x32x4x3", "128x64x8x3", "64x32x8x3", "64x64x8x3"),
}
# Candidates added after the first H200 sweep, which found every D = 128 winner at 4 warps and the dK/dV one
# spilling (64x64x4x2): the same tiles with 8 warps, to be measured by the next session with a GPU.
for _kernel, _extra in (("forward", ("64x64x8x3", "64x128x8x3")), ("backward_dkdv", ("64x64x8x2", "64x64x8x3")),
                        ("backward_dq", ("64x32x8x3", "64x64x8x3"))):
    CANDIDATES[_kernel] += _extra
# The kernels through TMA tensor descriptors (Hopper; elsewhere these run as the pointer tiles they name): on sm_90
# they compile to fewer registers than the same pointer tiles, without the spills of the measured D = 128 winners
# (benchmarks/kernel_report.py --tma), in more shared memory (deeper TMA pipelining). Only a GPU says if faster.
for _kernel, _extra in (
        ("forward", ("64x64x4x3", "64x64x4x4", "128x64x8x3", "128x32x4x4", "128x128x8x2", "64x128x4x3")),
        ("backward_dkdv", ("64x64x4x2", "64x64x4x3", "32x64x4x3", "64x128x8x3", "64x128x8x2", "32x128x8x3")),
        ("backward_dq", ("64x32x4x3", "64x64x4x3", "128x64x8x3", "128x32x4x3")),
        ("backward_dq_delta", ("64x32x4x3", "64x64x4x3", "128x64x8x3")),
        # dQ added by TMA bulk reduce-adds, one per tile pair, instead of an fp32 atomic per element (2026-12-01)
        ("backward_atomic", ("64x64x4x2", "64x64x4x3", "64x128x8x3", "32x128x8x3", "32x64x4x3"))):
    CANDIDATES[_kernel] += tuple(f"{text}+tma" for text in _extra)
# The whole deterministic backward in one program per (batch, head) (2026-12-01, not yet measured): dK/dV tiles,
# since its inner loop is the dK/dV kernel's plus one matmul and one fp32 read-modify-write of dQ per tile pair.
# Wide key tiles (block_n 128) mean fewer dQ writers per query tile, hence less fp32 traffic.
CANDIDATES["backward_per_head"] = ("32x128x8x3", "64x128x8x3", "64x64x4x3", "32x64x4x3", "64x128x8x3+tma",
                                   "32x128x8x3+tma", "64x64x4x3+tma", "32x64x4x3+tma")
# Tail tiles (2026-12-04, nineteenth session; not yet measured): run 9's winners with the rows past the last whole
# query tile done 16 at a time. At N = 197 a 128-row forward tile wastes 59 of its 256 rows, a 64-row one 59 too; 16-row
# tails cut that to 11. Timed only where N leaves such rows (candidates_for): elsewhere they are their base tiles.
for _kernel, _extra in (("forward", ("128x32x4x4+tma", "128x32x4x4", "64x64x4x3", "64x64x4x3+tma")),
                        ("backward_dkdv", ("32x64x4x3", "64x64x4x2+tma", "64x64x4x2")),
                        ("backward_dq", ("64x32x4x3", "64x32x4x3+tma", "128x32x4x3+tma")),
                        ("backward_dq_delta", ("64x32x4x3", "64x32x4x3+tma"))):
    CANDIDATES[_kernel] += tuple(f"{text}+tail16" for text in _extra)
# A head dim that is not a power of 2 in two column blocks (2026-12-04, twentieth session; not yet measured): D = 80
# pads to 128 columns, so 37.5% of the tiles' matmul work and registers were padding; 64 + 16 columns are 80. Run
# 10's fastest tiles at D = 80 and their neighbours. Timed only where D splits (candidates_for):
# elsewhere they are their base tiles.
for _kernel, _extra in (
        ("forward", ("128x32x4x4", "64x64x4x3", "64x32x4x4", "128x64x8x3", "128x64x4x3", "64x64x8x3")),
        ("backward_dkdv", ("32x64x4x3", "64x64x4x2", "64x64x4x3", "32x128x8x3", "64x64x8x2")),
        ("backward_dq", ("64x32x4x3", "128x32x4x3", "64x64x4x3", "128x64x8x3")),
        ("backward_dq_delta", ("64x32x4x3", "128x32x4x3", "64x64x4x3")),
        # and through TMA (two descriptors per operand), as run 10's D = 80 winners read
        ("forward", ("128x32x4x4+tma", "64x64x4x3+tma")), ("backward_dkdv", ("64x64x4x2+tma", "32x64x4x3+tma")),
        ("backward_dq", ("128x32x4x3+tma", "64x32x4x3+tma")), ("backward_dq_delta", ("64x32x4x3+tma",))):
    CANDIDATES[_kernel] += tuple(f"{text}+splitd" for text in _extra)
# The backward with dS stored (built 2026-12-04, in the tuner since the twenty-second session; not yet measured): the
# dK/dV kernel also storing dS^T (run 9 / 10's dK/dV winners and neighbours: the store adds registers, so the best
# tile may move), and dQ as one matmul per tile pair from it (through pointers or TMA). Compiled for sm_90 at D 128
# under Triton 3.6 (the GPU's) / 3.9 (kernel_report --stored-ds): dK/dV through descriptors spills 152 / 28 bytes at
# 64x64x4x2+tma (148 / 40 with tails), none / 120 at 64x64x4x3+tma and 64x128x8x3+tma, none at 32x64x4x3+tma;
# through pointers 184-400 bytes; dQ from dS spills nowhere but at 64x128x4x3 under 3.9 (24; its +tma twin: none).
# Timed where the buffer fits (STORED_DS_MAX_BYTES): not at N 4096.
CANDIDATES["backward_dkdv_ds"] = ("64x64x4x2+tma", "64x64x4x2+tma+tail16", "64x64x4x3+tma", "64x128x8x3+tma",
                                  "32x64x4x3", "32x64x4x3+tail16", "32x64x4x3+tma", "64x64x8x2", "32x128x8x3")
CANDIDATES["backward_dq_from_ds"] = ("64x64x4x3", "64x32x4x3", "128x64x8x3", "64x128x4x3", "128x128x8x3",
                                     "32x64x4x3", "64x64x4x3+tma", "128x64x8x3+tma", "64x128x4x3+tma",
                                     "128x128x8x3+tma")
# Not swept on Hopper (compute capability 90) since runs 9 and 10 (H200, 6 and 9 shapes;
# benchmarks/results/nvidia-h200/2026-12-04-run9-* and -run10-*, tune/tune_attention.csv): each took at least 1.2x
# the time of its kernel's fastest tile at every shape of both, so timing them again there only costs compiles (18 of
# a shape's 95 at AIM-600M). Other GPUs (an A100's autotune) still try them; their +tail16 / +splitd twins and the
# stored-dS kernels' tiles of the same shape are other candidates and stay.
MEASURED_SLOW = {90: {
    "forward": ("128x128x8x2", "128x128x8x2+tma", "128x64x4x3", "64x128x4x3", "64x128x4x3+tma", "64x128x8x3",
                "64x64x8x3"),
    "backward_dkdv": ("16x128x8x3", "32x64x8x2", "64x64x4x3", "64x64x4x3+tma", "64x64x8x2", "64x64x8x3"),
    "backward_dq": ("128x64x8x2", "64x32x8x3", "64x64x8x3"),
    "backward_dq_delta": ("64x32x8x3", "64x64x8x3"),
}}
assert all(set(slow) <= set(CANDIDATES[kernel]) for tiles in MEASURED_SLOW.values() for kernel, slow in tiles.items())
STORED_DS_KERNELS = ("backward_dkdv_ds", "backward_dq_from_ds")
# the order of a sweep: the two backwards that never won in runs 9 and 10 last (where a deadline cuts first)
KERNELS = ("forward", "backward_dkdv", "backward_dq", "backward_row_dot", "backward_dq_delta", *STORED_DS_KERNELS,
           "backward_per_head", "backward_atomic")
assert sorted(KERNELS) == sorted(CANDIDATES)
TOLERANCE = {2: 2e-2, 4: 1e-4}  # relative error vs the float32 reference above which a trial is wrong


@dataclass
class Problem:
    """Inputs of one attention call and the float32 reference results the trials are checked against."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    prefix: int | torch.Tensor  # an int in [0, N] or an integer tensor [B]
    scale: float
    want: dict | None = None  # "out", "dq", "dk", "dv" in float32


@dataclass
class Trial:
    kernel: str
    config: str
    ms: float | None  # None: it failed (compile error, out of resources) or was wrong
    error: float | None  # largest relative error of its outputs against the reference
    note: str = ""


def make_problem(batch, heads, seq_len, head_dim, dtype, prefix="random", device="cuda", seed=0,
                 with_reference=True) -> Problem:
    """``prefix``: "random" (per-sample in [1, N), AIM), "full" (N: MAE), "causal" (0), or an int."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, grad_out = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, generator=gen)
                         for _ in range(4))
    if prefix == "random":
        prefix = torch.randint(1, max(seq_len, 2), (batch,), device=device, generator=gen)
    else:
        prefix = {"full": seq_len, "causal": 0}.get(prefix, prefix)
    problem = Problem(q, k, v, grad_out, prefix, head_dim ** -0.5)
    if with_reference:
        with torch.enable_grad():
            leaves = [t.float().requires_grad_() for t in (q, k, v)]
            out = reference.prefix_causal_attention(*leaves, prefix, scale=problem.scale)
            dq, dk, dv = torch.autograd.grad(out, leaves, grad_out.float())
        problem.want = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
    return problem


def _relative_error(got: dict, want: dict) -> float:
    return max((((got[name].float() - want[name]).norm() / want[name].norm().clamp_min(1e-30)).item()
                for name in got), default=0.0)


def _runner(problem: Problem, kernel: str, cfg: TileConfig, out, lse, delta, ds=None):
    """A zero-argument call of ``kernel`` with ``cfg``, returning its outputs by name (checked against the
    reference; the row-dot pre-pass has none to check). ``ds``: the stored-dS kernels' buffer, holding dS^T for
    the dQ-from-dS kernel (which the dK/dV-storing kernel rewrites with the same values)."""
    p = problem
    if kernel == "forward":
        base = kernels.configs_for(p.q.shape[-1], p.q.dtype)
        configs = replace(base, forward=cfg)
        return lambda: dict(zip(("out",), kernels.forward(p.q, p.k, p.v, p.prefix, p.scale, configs)[:1]))
    args = (p.grad_out, p.q, p.k, p.v, lse, delta, p.prefix, p.scale, cfg)
    if kernel == "backward_dkdv":
        return lambda: dict(zip(("dk", "dv"), kernels.backward_dkdv(*args)))
    if kernel == "backward_dq":
        return lambda: {"dq": kernels.backward_dq(*args)}
    if kernel == "backward_atomic":
        return lambda: dict(zip(("dq", "dk", "dv"), kernels.backward_atomic(*args)))
    if kernel == "backward_row_dot":
        return lambda: (kernels.backward_row_dot(p.grad_out, out), {})[1]
    if kernel == "backward_dq_delta":
        scratch = torch.empty_like(delta)
        args = (p.grad_out, p.q, p.k, p.v, lse, scratch, p.prefix, p.scale, cfg)
        return lambda: {"dq": kernels.backward_dq(*args, out=out)}
    if kernel == "backward_dkdv_ds":
        return lambda: dict(zip(("dk", "dv"), kernels.backward_dkdv(*args, ds=ds)))
    if kernel == "backward_dq_from_ds":
        return lambda: {"dq": kernels.backward_dq_from_ds(p.q, p.k, ds, p.prefix, p.scale, cfg)}
    if kernel == "backward_per_head":
        return lambda: dict(zip(("dq", "dk", "dv"), kernels.backward_per_head(p.grad_out, p.q, p.k, p.v, out, lse,
                                                                              p.prefix, p.scale, cfg)))
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


def _checked_outputs(problem: Problem, kernel: str, run, ds_trial) -> dict:
    """``run()``'s outputs to check against the reference; for a dK/dV-storing-dS trial also dQ from the dS it stored
    (into a buffer of NaN: a pair it fails to store reads as NaN), so that a tile storing wrong dS never wins."""
    if kernel != "backward_dkdv_ds":
        return run()
    ds_trial.fill_(float("nan"))
    got = run()
    p = problem
    return {**got, "dq": kernels.backward_dq_from_ds(p.q, p.k, ds_trial, p.prefix, p.scale, kernels.STORED_DS_DQ_TILE)}


def default_timer(fn) -> float:
    """Median ms of ``fn`` on the GPU (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def candidates_for(seq_len: int, candidates=None, head_dim: int | None = None,
                   arch: int | None = None) -> dict[str, tuple[str, ...]]:
    """``candidates`` (default CANDIDATES) less those that at this N (and head dim, where given) run as their base
    tiles, which would only time the same kernel twice: tail tiles where N is a multiple of block_m (no rows past
    the last whole tile), split head dims where D does not split (:func:`attention.head_dim_split`); and from the
    default list on a GPU of compute capability ``arch`` (as 90), the tiles MEASURED_SLOW names for it (a list given
    explicitly keeps them)."""
    def runs_as_its_base(text):
        try:
            cfg = TileConfig.parse(text)
        except (TypeError, ValueError):  # kept: sweep records why it cannot run
            return False
        no_tail = cfg.tail_m and not kernels.query_tiles(seq_len, cfg)[2]
        no_split = cfg.split_d and head_dim is not None and kernels.head_dim_split(head_dim) is None
        return no_tail or no_split

    slow = {} if candidates else MEASURED_SLOW.get(arch, {})
    candidates = candidates or CANDIDATES
    return {kernel: tuple(text for text in texts if not runs_as_its_base(text) and text not in slow.get(kernel, ()))
            for kernel, texts in candidates.items()}


def sweep(problem: Problem, kernels_to_tune=KERNELS, candidates=None, timer=default_timer, deadline=None,
          on_trial=None) -> list[Trial]:
    """Check and time every candidate of every kernel on ``problem`` (tail tiles only where N has a tail, split
    head dims only where D splits: :func:`candidates_for`); stops early past ``deadline`` (a ``time.monotonic()``
    value). Inputs of the backward kernels come from the portable forward."""
    candidates = candidates_for(problem.q.shape[2], candidates, problem.q.shape[3], kernels._arch(problem.q.device))
    portable = kernels.configs_for(problem.q.shape[-1], problem.q.dtype)
    out, lse = kernels.forward(problem.q, problem.k, problem.v, problem.prefix, problem.scale, portable)
    delta = kernels.backward_row_dot(problem.grad_out, out)
    ds = ds_trial = None
    if any(candidates.get(kernel) for kernel in STORED_DS_KERNELS if kernel in kernels_to_tune):
        batch, heads, seq_len, _ = problem.q.shape
        if kernels.stored_ds_fits(batch, heads, seq_len, problem.q.element_size()):
            # dS^T for the dQ-from-dS trials, stored by the portable dK/dV tile; the dK/dV trials store into another
            ds, ds_trial = kernels.stored_ds_buffer(problem.q), kernels.stored_ds_buffer(problem.q)
            kernels.backward_dkdv(problem.grad_out, problem.q, problem.k, problem.v, lse, delta, problem.prefix,
                                  problem.scale, portable.backward_dkdv, ds=ds)
        else:  # the backward would not take this path at this size
            kernels_to_tune = tuple(kernel for kernel in kernels_to_tune if kernel not in STORED_DS_KERNELS)
    tolerance = TOLERANCE[problem.q.element_size()]
    trials = []
    for kernel in kernels_to_tune:
        for text in candidates.get(kernel, ()):
            if deadline is not None and time.monotonic() > deadline:
                return trials
            try:
                cfg = TileConfig.parse(text)
                run = _runner(problem, kernel, cfg, out, lse, delta, ds_trial if kernel == "backward_dkdv_ds" else ds)
                error = _relative_error(_checked_outputs(problem, kernel, run, ds_trial), problem.want) \
                    if problem.want else None
                if error is not None and not error <= tolerance:
                    trial = Trial(kernel, text, None, error, f"wrong: relative error {error:.2e} > {tolerance:g}")
                else:
                    trial = Trial(kernel, text, timer(run), error)
            except Exception as err:  # a config this GPU or compiler cannot run is a result, not a crash
                trial = Trial(kernel, text, None, None, f"{type(err).__name__}: {str(err)[:160]}")
            trials.append(trial)
            if on_trial:
                on_trial(trial)
    return trials


def fastest(trials: list[Trial]) -> dict[str, Trial]:
    """The fastest correct trial of each kernel that has one."""
    best = {}
    for trial in trials:
        if trial.ms is not None and (trial.kernel not in best or trial.ms < best[trial.kernel].ms):
            best[trial.kernel] = trial
    return best


def configs_from(best: dict[str, Trial]) -> AttentionConfigs | None:
    """AttentionConfigs of the winners; None unless the forward, dK/dV and dQ kernels all have one.

    The deterministic backward is the fastest of: row-dot pre-pass + dK/dV + dQ, dK/dV + the delta-computing dQ
    kernel (``backward_dq_delta`` set), the one-launch ``backward_per_head`` (set; it computes delta itself). The
    stored-dS backward (pre-pass + dK/dV storing dS + dQ from dS) gets its two tiles only if it beat that (which
    stays chosen: it runs where the buffer does not fit); the atomic-dQ backward gets a tile only if it (with the
    pre-pass, its fp32 buffer's zeroing and cast) beat the fastest deterministic one.
    """
    if not all(name in best for name in ("forward", "backward_dkdv", "backward_dq")):
        return None
    ms = {name: trial.ms for name, trial in best.items()}
    row_dot = ms.get("backward_row_dot", 0.0)  # not timed: a pre-pass that costs nothing, the other paths' worst case
    paths = {"two_launch": row_dot + ms["backward_dkdv"] + ms["backward_dq"]}
    if "backward_dq_delta" in ms:
        paths["backward_dq_delta"] = ms["backward_dkdv"] + ms["backward_dq_delta"]
    if "backward_per_head" in ms:
        paths["backward_per_head"] = ms["backward_per_head"]
    deterministic = min(paths, key=paths.get)
    stored_ms = (row_dot + ms["backward_dkdv_ds"] + ms["backward_dq_from_ds"]
                 if all(name in ms for name in STORED_DS_KERNELS) else float("inf"))
    stored_ds = stored_ms < paths[deterministic]
    atomic = "backward_atomic" in ms and row_dot + ms["backward_atomic"] < min(stored_ms, paths[deterministic])

    def tile(name, chosen):
        return TileConfig.parse(best[name].config) if chosen else None

    return AttentionConfigs(*(tile(name, True) for name in ("forward", "backward_dkdv", "backward_dq")),
                            tile("backward_atomic", atomic), tile("backward_dq_delta", deterministic ==
                                                                   "backward_dq_delta"),
                            tile("backward_per_head", deterministic == "backward_per_head"),
                            *(tile(name, stored_ds) for name in STORED_DS_KERNELS))


def tune_call_shape(q: torch.Tensor) -> AttentionConfigs | None:
    """MIMKERNELS_AUTOTUNE=1: sweep the candidates on a problem of q's shape (random per-sample prefixes), on
    q's device. Takes seconds to minutes (every candidate compiles once); the caller caches the result."""
    batch, heads, seq_len, head_dim = q.shape
    batch = max(1, min(batch, 2**27 // (heads * seq_len * seq_len)))  # the dense reference stays under ~2 GB
    with torch.no_grad(), torch.cuda.device(q.device):
        problem = make_problem(batch, heads, seq_len, head_dim, q.dtype, device=q.device)
        return configs_from(fastest(sweep(problem)))
