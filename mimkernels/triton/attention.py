"""Prefix-causal flash attention in Triton: forward, and a deterministic backward.

Query i sees key j iff ``j <= i or j < prefix``, with ``prefix`` per sample.
Full attention is ``prefix = N`` and causal attention ``prefix = 0``, so one
kernel family serves all three.

FlashAttention-2 scheme: online softmax over key tiles, the log-sum-exp saved
(in base 2), the probabilities recomputed in the backward. Every loop over tiles
is split: tiles every pair of which is visible run without mask
arithmetic, and only the few tiles on the diagonal, the prefix edge or the
sequence end are masked. Tiles nobody can see are never loaded, so the work is
proportional to the number of visible pairs.

Tensors are read in place through their strides (unit stride in the head dim);
the head dim is padded inside the tile, never in memory.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import env_flag
from .launch import cdiv, compute_capability, launch, next_power_of_2, tensor_descriptor, tma_usable

LOG2_E = 1.4426950408889634
ROW_DOT_BLOCK = 16  # query rows per program of the backward's row-dot pre-pass
ROW_DOT_WARPS, ROW_DOT_STAGES = 4, 3
KEY_CENTRE_ROWS = tl.constexpr(16)  # keys whose mean each program subtracts from dQ's keys with KEY_CENTRE


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    # read and write the [B, H, N, D] operands through TMA tensor descriptors (Hopper and newer, see tma_usable);
    # elsewhere the same tiles run through pointers
    tma: bool = False
    # query rows per tile past the last whole block_m tile (0: one more block_m tile, mostly rows past N). With
    # N = 257 and block_m 128, the third query tile holds one row yet costs what a whole tile costs, a third of
    # the forward's work; tail tiles of 16 rows cut that to an eighth of a tile. Forward, dQ and dK/dV kernels.
    tail_m: int = 0
    # a head dim that is not a power of 2 as two power-of-2 column blocks (D = 80: 64 + 16 columns, not one
    # 128-column tile of which 48 are padding; head_dim_split), two matmuls per product. Forward, dK/dV and dQ
    # (with or without delta), through pointers or (+tma) two descriptors per operand, no tails; elsewhere (a
    # power-of-2 D, the atomic-dQ and per-head backwards) the config runs as its base tiles.
    split_d: bool = False

    @classmethod
    def parse(cls, text: str) -> TileConfig:
        """From ``"block_m x block_n x num_warps x num_stages"``, with ``"+tma"`` appended for a TMA config,
        ``"+tail16"`` for 16-row tail tiles and ``"+splitd"`` for a split head dim: the form the tile tables use."""
        tiles, *flags = text.split("+")
        options = {}
        for flag in flags:
            if flag == "tma":
                options["tma"] = True
            elif flag.startswith("tail") and flag[4:].isdigit():
                options["tail_m"] = int(flag[4:])
            elif flag == "splitd":
                options["split_d"] = True
            else:
                raise ValueError(f"unknown tile config flag {flag!r} in {text!r} (known: +tma, +tail<rows>, "
                                 "+splitd)")
        cfg = cls(*(int(part) for part in tiles.split("x")), **options)
        if cfg.tail_m and not (16 <= cfg.tail_m < cfg.block_m and cfg.tail_m & (cfg.tail_m - 1) == 0):
            raise ValueError(f"tail rows must be a power of 2 from 16 to below block_m, got {text!r}")
        if cfg.split_d and cfg.tail_m:
            raise ValueError(f"+splitd runs whole query tiles: not with +tail, got {text!r}")
        return cfg

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.num_warps}x{self.num_stages}" + "+tma" * self.tma
                + (f"+tail{self.tail_m}" if self.tail_m else "") + "+splitd" * self.split_d)


@dataclass(frozen=True)
class AttentionConfigs:
    forward: TileConfig
    backward_dkdv: TileConfig  # one program per key tile, looping over query tiles
    backward_dq: TileConfig  # one program per query tile, looping over key tiles
    # dK/dV per key tile with dQ added atomically: the measured table gives a tile only where this beat the
    # two-launch backward; None elsewhere (the atomic kernel, where asked for explicitly, then uses backward_dkdv's)
    backward_atomic: TileConfig | None = None
    # the dQ kernel computing delta itself (no row-dot pre-pass); given only where that measured faster
    backward_dq_delta: TileConfig | None = None
    # the whole backward in one program per (batch, head), deterministic (backward_per_head); given only where it
    # measured faster than the other deterministic backwards
    backward_per_head: TileConfig | None = None
    # the backward with dS stored (backward_dkdv storing dS^T, then backward_dq_from_ds): its dK/dV and dQ tiles,
    # given (both) only where that measured faster than the deterministic backward the fields above choose, which
    # still runs where its buffer does not fit (stored_ds_tiles)
    backward_dkdv_ds: TileConfig | None = None
    backward_dq_from_ds: TileConfig | None = None


# (block_m, block_n, num_warps, num_stages) of the forward, dK/dV and dQ kernels, by operand width and padded
# head dim. Picked so that none spills on sm_80 or sm_90 with Triton 3.6, 3.8 or 3.9 (benchmarks/kernel_report.py;
# tests/test_kernel_report.py runs in CI on both ends of the supported range): the portable fallback for GPUs
# and shapes that the measured table (attention_tiles.py) does not cover. Five entries changed for Triton 3.6,
# whose register allocation spilled them (2-byte D=128 forward (sm_80), dK/dV and dQ, D=256 forward, 4-byte D=256
# forward); the fp32 dK/dV tile for D <= 64 for 3.9 (16x32 with 4 warps, 1 stage spilled 12 B on sm_90; now 8 warps,
# 2 stages: none of 20 other tiles tried was spill-free under all three, results/kernel_report/fp32_tile_*.txt).
_SHIPPED = {
    (2, 64): ((128, 64, 8, 3), (16, 64, 4, 3), (64, 32, 4, 3)),
    (2, 128): ((64, 32, 8, 3), (16, 64, 8, 1), (32, 64, 8, 1)),
    (2, 256): ((32, 32, 8, 2), (32, 32, 8, 1), (32, 32, 8, 1)),
    (4, 64): ((32, 32, 4, 2), (16, 32, 8, 2), (32, 32, 4, 2)),  # fp32 runs on FMA units, not tensor cores
    (4, 128): ((32, 16, 8, 1), (16, 32, 8, 1), (16, 32, 8, 1)),
    (4, 256): ((16, 16, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1)),
}

# Sequence-length classes of the measured table: the longest N of each class (the last is unbounded). 256 parts
# AIM's 256 patches and ViT-B/16's 197 tokens from the 257 of a ViT/14 with a cls token, whose best tiles differ: at
# 257 a 128-row query tile holds a single row (tail tiles, TileConfig.tail_m).
SEQ_CLASSES = (128, 256, 384, 1536, 1 << 31)


def configs_for(head_dim: int, dtype: torch.dtype) -> AttentionConfigs:
    """The portable tile shapes for this head dim and dtype: spill-free on sm_80 and sm_90, not tuned for speed."""
    block_d = max(64, next_power_of_2(head_dim))
    fwd, dkdv, dq = _SHIPPED[dtype.itemsize, block_d]
    return AttentionConfigs(TileConfig(*fwd), TileConfig(*dkdv), TileConfig(*dq))


def seq_class(seq_len: int) -> int:
    """The sequence-length class (its longest N) that ``seq_len`` falls in."""
    return next(bound for bound in SEQ_CLASSES if seq_len <= bound)


def table_key(arch: int, head_dim: int, dtype: torch.dtype, seq_len: int) -> tuple[int, int, int, int]:
    """(compute capability as 90, operand bytes, padded head dim, sequence class): the measured table's key."""
    return arch, dtype.itemsize, max(16, next_power_of_2(head_dim)), seq_class(seq_len)


def measured_configs(key: tuple[int, int, int, int], table: dict | None = None) -> AttentionConfigs | None:
    """The measured configs for ``key``, or for the nearest measured sequence class; None if none is measured."""
    from . import attention_tiles

    table = attention_tiles.MEASURED if table is None else table
    arch, itemsize, block_d, bound = key
    classes = [c for c in SEQ_CLASSES if (arch, itemsize, block_d, c) in table]
    if not classes:
        return None
    here = SEQ_CLASSES.index(bound)
    nearest = min(classes, key=lambda c: (abs(SEQ_CLASSES.index(c) - here), c))
    fwd, dkdv, dq, *optional = table[arch, itemsize, block_d, nearest]  # the other backwards: None if slower
    return AttentionConfigs(*(TileConfig.parse(text) for text in (fwd, dkdv, dq)),
                            *(TileConfig.parse(text) if text else None for text in optional))


_RUNTIME_TUNED = {}  # table key -> AttentionConfigs found by MIMKERNELS_AUTOTUNE=1 in this process
_arch = compute_capability  # a name of its own here: the tests give the table lookups another GPU


_CALL_CONFIGS = {}  # (device, dtype, head dim, N) -> AttentionConfigs: one dict lookup per call after the first


def configs_for_call(q: torch.Tensor) -> AttentionConfigs:
    """The configs a call on ``q`` ([B, H, N, D]) uses: measured for its GPU and shape class where the table has
    them (or MIMKERNELS_AUTOTUNE=1 has found them in this process), else the portable ones."""
    key = (q.device, q.dtype, q.shape[-1], q.shape[-2])
    found = _CALL_CONFIGS.get(key)
    if found is None:
        found, final = _looked_up_configs(q)
        if final:  # not a stand-in for an autotune that a CUDA-graph capture put off
            _CALL_CONFIGS[key] = found
    return found


def _looked_up_configs(q: torch.Tensor) -> tuple[AttentionConfigs, bool]:
    arch = _arch(q.device)
    head_dim, seq_len = q.shape[-1], q.shape[-2]
    if q.dtype == torch.float32 or not arch:
        return configs_for(head_dim, q.dtype), True  # fp32 and the interpreter: portable tiles
    key = table_key(arch, head_dim, q.dtype, seq_len)  # fp16 shares bf16's entries: same tensor-core rate
    found = _RUNTIME_TUNED.get(key) or measured_configs(key)
    if found is None and autotune_enabled():
        if torch.cuda.is_current_stream_capturing():  # no sweep inside a capture: portable now, tune later
            return configs_for(head_dim, q.dtype), False
        from . import attention_tuning

        found = _RUNTIME_TUNED[key] = attention_tuning.tune_call_shape(q)
    return found or configs_for(head_dim, q.dtype), True


def autotune_enabled() -> bool:
    return env_flag("MIMKERNELS_AUTOTUNE", False)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _load_tile(base, rows, stride_row, cols, n_rows, head_dim, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, cols] tile; masked only where the tile may leave the tensor."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < head_dim), other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < head_dim, other=0.0)
    return tile


@triton.jit
def _store_tile(base, rows, stride_row, cols, n_rows, head_dim, tile):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < head_dim))


@triton.jit
def _prefix_of(prefix_ptr, prefix_int, batch, seq_len, PREFIX_IS_TENSOR: tl.constexpr):
    """This sample's prefix length clamped to [0, N] (clamped on the device: no host sync)."""
    if PREFIX_IS_TENSOR:
        prefix = tl.load(prefix_ptr + batch).to(tl.int64)
        prefix = tl.minimum(tl.maximum(prefix, 0), seq_len).to(tl.int32)
    else:
        prefix = prefix_int
    return prefix


@triton.jit
def _program_tile(PREFIX, prefix_int, num_tiles, num_heads, seq_len, BLOCK: tl.constexpr,
                  LONGEST_FIRST: tl.constexpr, PREFIX_IS_TENSOR: tl.constexpr):
    """What this program runs: (batch * heads + head, batch, head, its tile's index and first row, the sample's
    prefix). Programs go head by head, each head's tiles in order, or with LONGEST_FIRST the last first (a query
    tile's rows see more keys the later they are). The tile's first row is computed before the prefix is loaded:
    after it, Triton 3.6's ptxas spilled more in two D = 128 dQ tiles."""
    pid = tl.program_id(0)
    bh = pid // num_tiles
    tile = pid % num_tiles
    if LONGEST_FIRST:
        start = (num_tiles - 1 - tile) * BLOCK
    else:
        start = tile * BLOCK
    batch = bh // num_heads
    head = bh % num_heads
    prefix = _prefix_of(PREFIX, prefix_int, batch, seq_len, PREFIX_IS_TENSOR)
    return bh, batch, head, tile, start, prefix


@triton.jit
def _head_rows(ptr, batch, head, stride_b, stride_h):
    """The first row of (batch, head) in a [B, H, N, D]-strided tensor; int64 offsets, since B * H * N * D may pass
    2^31 elements."""
    return ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def _key_range(m_start, prefix, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query tile starting at m_start: the end of its fully visible key tiles, and of all visible keys.

    A key tile [n, n + BLOCK_N) is visible to every row of the query tile iff its last key
    is below the first query or inside the prefix, i.e. n + BLOCK_N <= max(m_start + 1, prefix),
    and it lies inside the sequence.
    """
    full_end = (tl.minimum(seq_len, tl.maximum(prefix, m_start + 1)) // BLOCK_N) * BLOCK_N
    visible_end = tl.minimum(seq_len, tl.maximum(prefix, m_start + BLOCK_M))
    return full_end, visible_end


@triton.jit
def _visible(rows_q, cols_k, prefix, seq_len):
    """Which (query, key) pairs of a tile are visible; keys past the sequence end are not.

    Query rows past the end see key 0, so no row is ever empty (no NaN), and they are never stored.
    """
    return ((cols_k <= rows_q) | (cols_k < prefix)) & (cols_k < seq_len)


@triton.jit
def _key_centre(K, batch, head, stride_kb, stride_kh, stride_kn, cols, seq_len, head_dim, EVEN_D: tl.constexpr,
                CENTRE_ROWS: tl.constexpr):
    """c, the fp32 mean of the head's first min(N, CENTRE_ROWS) keys over ``cols``, for KEY_CENTRE: dQ = dS K is
    computed as dS~ K - rowsum(dS~) c, dS~ being dS as rounded for the matmul. Exact for any c in exact arithmetic
    (each row of dS~ times the same c); what it removes is the c-part of dS~'s rounding error, which a part shared
    by all keys makes large (a key bias: benchmarks/NOTES.md, "Keys that share a large part"). Any few keys stand
    for the shared part: no pre-pass. A non-finite c needs no guard: these keys lie in key tile 0 (16 keys at least,
    tl.dot's least size), whose dS~ K every query's dQ computes, so an inf or NaN among them makes every dQ row NaN
    already (0 x inf in the matmul)."""
    keys = _load_tile(_head_rows(K, batch, head, stride_kb, stride_kh), tl.arange(0, CENTRE_ROWS), stride_kn, cols,
                      seq_len, head_dim, True, EVEN_D)
    return tl.sum(keys.to(tl.float32), 0) / tl.minimum(seq_len, CENTRE_ROWS).to(tl.float32)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _head_source(X, batch, head, stride_b, stride_h, USE_TMA: tl.constexpr):
    """Where :func:`_read_rows` reads (batch, head) of X from: the [B, H, N, D] tensor descriptor X itself with
    USE_TMA, else the head's first row."""
    if USE_TMA:
        source = X
    else:
        source = _head_rows(X, batch, head, stride_b, stride_h)
    return source


@triton.jit
def _read_rows(source, batch, head, row_start, stride_row, cols, n_rows, head_dim, CHECK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [row_start, row_start + BLOCK_ROWS) of one head, from a :func:`_head_source`. Through a descriptor,
    TMA fills rows past N and columns past D with zeros, so no mask is needed."""
    if USE_TMA:
        tile = source.load([batch, head, row_start, 0]).reshape(BLOCK_ROWS, BLOCK_D)
    else:
        tile = _load_tile(source, row_start + tl.arange(0, BLOCK_ROWS), stride_row, cols, n_rows, head_dim,
                          CHECK_ROWS, EVEN_D)
    return tile


@triton.jit
def _key_tile_scores(
    q, k_src, v_src, stride_kn, stride_vn, batch, head, offs_m, offs_d, n_start, prefix, seq_len, head_dim,
    qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """The key tile at ``n_start`` as a query tile's loop over keys sees it (forward and dQ): its K and V rows
    (``k_src``, ``v_src``: :func:`_head_source`) and the base-2 scores ``q @ k^T * qk_scale``, -inf where masked."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k = _read_rows(k_src, batch, head, n_start, stride_kn, offs_d, seq_len, head_dim, MASKED, EVEN_D, BLOCK_N,
                   BLOCK_D, USE_TMA)
    v = _read_rows(v_src, batch, head, n_start, stride_vn, offs_d, seq_len, head_dim, MASKED, EVEN_D, BLOCK_N,
                   BLOCK_D, USE_TMA)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        scores = tl.where(_visible(offs_m[:, None], offs_n[None, :], prefix, seq_len), scores, float("-inf"))
    return k, v, scores


@triton.jit
def _fwd_key_tiles(
    acc, row_sum, row_max, q, k_src, v_src, stride_kn, stride_vn, batch, head,
    offs_m, offs_d, n_lo, n_hi, prefix, seq_len, head_dim, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """``k_src``, ``v_src``: :func:`_head_source` of K and V."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        k, v, scores = _key_tile_scores(q, k_src, v_src, stride_kn, stride_vn, batch, head, offs_m, offs_d, n_start,
                                        prefix, seq_len, head_dim, qk_scale, BLOCK_N, BLOCK_D, EVEN_D, MASKED,
                                        DOT_PRECISION, USE_TMA)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # every row sees key 0 in the first tile, so new_max is finite from then on
        correction = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _fwd_query_tile(
    Q, K, V, O, LSE, batch, head, bh, m_start, prefix,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, seq_len, qk_scale,
    head_dim: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """O and the base-2 LSE of the BLOCK_M query rows from ``m_start`` (Q and O descriptors, with USE_TMA, of
    [1, 1, BLOCK_M, BLOCK_D] blocks)."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_src = _head_source(K, batch, head, stride_kb, stride_kh, USE_TMA)
    v_src = _head_source(V, batch, head, stride_vb, stride_vh, USE_TMA)
    q = _read_rows(_head_source(Q, batch, head, stride_qb, stride_qh, USE_TMA), batch, head, m_start, stride_qn,
                   offs_d, seq_len, head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, USE_TMA)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end, visible_end = _key_range(m_start, prefix, seq_len, BLOCK_M, BLOCK_N)
    acc, row_sum, row_max = _fwd_key_tiles(
        acc, row_sum, row_max, q, k_src, v_src, stride_kn, stride_vn, batch, head, offs_m, offs_d,
        0, full_end, prefix, seq_len, head_dim, qk_scale, BLOCK_N, BLOCK_D, EVEN_D, False, DOT_PRECISION, USE_TMA)
    acc, row_sum, row_max = _fwd_key_tiles(
        acc, row_sum, row_max, q, k_src, v_src, stride_kn, stride_vn, batch, head, offs_m, offs_d,
        full_end, visible_end, prefix, seq_len, head_dim, qk_scale, BLOCK_N, BLOCK_D, EVEN_D, True, DOT_PRECISION,
        USE_TMA)

    out = acc / row_sum[:, None]
    if USE_TMA:  # TMA drops the rows past N and the columns past D
        O.store([batch, head, m_start, 0], out.to(O.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        _store_tile(_head_rows(O, batch, head, stride_ob, stride_oh), offs_m, stride_on, offs_d, seq_len, head_dim,
                    out.to(O.dtype.element_ty))
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, row_max + tl.log2(row_sum), mask=offs_m < seq_len)


@triton.jit
def _prefix_causal_fwd(
    Q, K, V, O, LSE, PREFIX, Q_TAIL, O_TAIL, prefix_int,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    num_heads, seq_len, qk_scale, num_m_tiles, num_tail_tiles,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, TAIL_M: tl.constexpr,
):
    """O and the base-2 LSE of one query tile. Q, K, V, O are pointers, or with USE_TMA [B, H, N, D] tensor
    descriptors (blocks [1, 1, BLOCK_M or BLOCK_N, BLOCK_D]; their strides then come with them). With TAIL_M, the
    rows past the last whole BLOCK_M tile are ``num_tail_tiles`` tiles of TAIL_M rows, read and written through
    Q_TAIL and O_TAIL (blocks [1, 1, TAIL_M, BLOCK_D] with USE_TMA; else Q and O again)."""
    bh, batch, head, tile, m_start, prefix = _program_tile(PREFIX, prefix_int, num_m_tiles, num_heads, seq_len,
                                                           BLOCK_M, True, PREFIX_IS_TENSOR)
    if TAIL_M:
        if tile < num_tail_tiles:  # the rows past the last whole tile, which see the most keys, first of all
            tail_start = (seq_len // BLOCK_M) * BLOCK_M + tile * TAIL_M
            _fwd_query_tile(Q_TAIL, K, V, O_TAIL, LSE, batch, head, bh, tail_start, prefix, stride_qb, stride_qh,
                            stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob,
                            stride_oh, stride_on, seq_len, qk_scale, head_dim, EVEN_D, TAIL_M, BLOCK_N, BLOCK_D,
                            DOT_PRECISION, USE_TMA)
        else:
            _fwd_query_tile(Q, K, V, O, LSE, batch, head, bh, m_start, prefix, stride_qb, stride_qh, stride_qn,
                            stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh,
                            stride_on, seq_len, qk_scale, head_dim, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
                            USE_TMA)
    else:
        _fwd_query_tile(Q, K, V, O, LSE, batch, head, bh, m_start, prefix, stride_qb, stride_qh, stride_qn,
                        stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh,
                        stride_on, seq_len, qk_scale, head_dim, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
                        USE_TMA)


@triton.jit
def _read_split(src_lo, src_hi, batch, head, row_start, stride_row, offs_lo, offs_hi, n_rows, head_dim,
                CHECK_ROWS: tl.constexpr, EVEN_HI: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_LO: tl.constexpr,
                BLOCK_HI: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [row_start, row_start + BLOCK_ROWS) of one head as the two column blocks of a split head dim
    (:func:`head_dim_split`). With USE_TMA from the descriptors ``src_lo``, ``src_hi`` ([1, 1, BLOCK_ROWS, BLOCK_LO
    or BLOCK_HI] blocks; TMA fills rows past N and columns past D with zeros), else from the head's first row
    ``src_lo`` (``offs_lo`` all inside D, ``offs_hi`` masked past D unless EVEN_HI)."""
    if USE_TMA:
        lo = src_lo.load([batch, head, row_start, 0]).reshape(BLOCK_ROWS, BLOCK_LO)
        hi = src_hi.load([batch, head, row_start, BLOCK_LO]).reshape(BLOCK_ROWS, BLOCK_HI)
    else:
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        lo = _load_tile(src_lo, rows, stride_row, offs_lo, n_rows, head_dim, CHECK_ROWS, True)
        hi = _load_tile(src_lo, rows, stride_row, offs_hi, n_rows, head_dim, CHECK_ROWS, EVEN_HI)
    return lo, hi


@triton.jit
def _write_split(dst_lo, dst_hi, batch, head, row_start, stride_row, offs_lo, offs_hi, n_rows, head_dim, lo, hi,
                 BLOCK_ROWS: tl.constexpr, BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr, USE_TMA: tl.constexpr):
    """Store the fp32 column blocks ``lo``, ``hi`` in the destination's dtype where :func:`_read_split` reads
    (TMA drops the rows past N and the columns past D; pointers are masked there)."""
    if USE_TMA:
        dst_lo.store([batch, head, row_start, 0], lo.to(dst_lo.dtype).reshape(1, 1, BLOCK_ROWS, BLOCK_LO))
        dst_hi.store([batch, head, row_start, BLOCK_LO], hi.to(dst_hi.dtype).reshape(1, 1, BLOCK_ROWS, BLOCK_HI))
    else:
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        _store_tile(dst_lo, rows, stride_row, offs_lo, n_rows, head_dim, lo.to(dst_lo.dtype.element_ty))
        _store_tile(dst_lo, rows, stride_row, offs_hi, n_rows, head_dim, hi.to(dst_lo.dtype.element_ty))


@triton.jit
def _split_dot_t(a_lo, a_hi, b_lo, b_hi, DOT_PRECISION: tl.constexpr):
    """a @ b^T over a split head dim: a_lo b_lo^T, then a_hi b_hi^T accumulated into it."""
    product = tl.dot(a_lo, tl.trans(b_lo), input_precision=DOT_PRECISION)
    return tl.dot(a_hi, tl.trans(b_hi), product, input_precision=DOT_PRECISION)


@triton.jit
def _split_key_tile_scores(
    q_lo, q_hi, k_lo_src, k_hi_src, stride_kn, batch, head, offs_m, offs_lo, offs_hi, n_start, prefix, seq_len,
    head_dim, qk_scale, BLOCK_N: tl.constexpr, BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr,
    EVEN_HI: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """:func:`_key_tile_scores` over a split head dim: the key tile's two column blocks and the base-2 scores."""
    k_lo, k_hi = _read_split(k_lo_src, k_hi_src, batch, head, n_start, stride_kn, offs_lo, offs_hi, seq_len,
                             head_dim, MASKED, EVEN_HI, BLOCK_N, BLOCK_LO, BLOCK_HI, USE_TMA)
    scores = _split_dot_t(q_lo, q_hi, k_lo, k_hi, DOT_PRECISION) * qk_scale
    if MASKED:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        scores = tl.where(_visible(offs_m[:, None], offs_n[None, :], prefix, seq_len), scores, float("-inf"))
    return k_lo, k_hi, scores


@triton.jit
def _fwd_split_d_key_tiles(
    acc_lo, acc_hi, row_sum, row_max, q_lo, q_hi, k_lo_src, k_hi_src, v_lo_src, v_hi_src, stride_kn, stride_vn,
    batch, head, offs_m, offs_lo, offs_hi, n_lo, n_hi, prefix, seq_len, head_dim, qk_scale, BLOCK_N: tl.constexpr,
    BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr, EVEN_HI: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """:func:`_fwd_key_tiles` over a split head dim; each column block of the output has its own accumulator."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        _, _, scores = _split_key_tile_scores(q_lo, q_hi, k_lo_src, k_hi_src, stride_kn, batch, head, offs_m,
                                              offs_lo, offs_hi, n_start, prefix, seq_len, head_dim, qk_scale,
                                              BLOCK_N, BLOCK_LO, BLOCK_HI, EVEN_HI, MASKED, DOT_PRECISION, USE_TMA)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        correction = tl.exp2(row_max - new_max)  # finite from the first tile on: every row sees key 0
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, 1)
        v_lo, v_hi = _read_split(v_lo_src, v_hi_src, batch, head, n_start, stride_vn, offs_lo, offs_hi, seq_len,
                                 head_dim, MASKED, EVEN_HI, BLOCK_N, BLOCK_LO, BLOCK_HI, USE_TMA)
        acc_lo = acc_lo * correction[:, None] + tl.dot(probs.to(v_lo.dtype), v_lo, input_precision=DOT_PRECISION)
        acc_hi = acc_hi * correction[:, None] + tl.dot(probs.to(v_hi.dtype), v_hi, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc_lo, acc_hi, row_sum, row_max


@triton.jit
def _prefix_causal_fwd_split_d(
    Q, K, V, O, Q_HI, K_HI, V_HI, O_HI, LSE, PREFIX, prefix_int,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    num_heads, seq_len, qk_scale, num_m_tiles,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr, EVEN_HI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """:func:`_prefix_causal_fwd` (no tail tiles) for a head dim of BLOCK_LO + at most BLOCK_HI columns (EVEN_HI:
    exactly). With USE_TMA, Q, K, V, O are [B, H, N, D] descriptors of BLOCK_LO-column blocks and Q_HI .. O_HI of
    BLOCK_HI-column ones; else pointers, and the *_HI arguments are never read."""
    bh, batch, head, _, m_start, prefix = _program_tile(PREFIX, prefix_int, num_m_tiles, num_heads, seq_len, BLOCK_M,
                                                        True, PREFIX_IS_TENSOR)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_lo = tl.arange(0, BLOCK_LO)
    offs_hi = BLOCK_LO + tl.arange(0, BLOCK_HI)
    q_lo, q_hi = _read_split(_head_source(Q, batch, head, stride_qb, stride_qh, USE_TMA),
                             _head_source(Q_HI, batch, head, stride_qb, stride_qh, USE_TMA), batch, head, m_start,
                             stride_qn, offs_lo, offs_hi, seq_len, head_dim, True, EVEN_HI, BLOCK_M, BLOCK_LO,
                             BLOCK_HI, USE_TMA)
    k_lo_src = _head_source(K, batch, head, stride_kb, stride_kh, USE_TMA)
    k_hi_src = _head_source(K_HI, batch, head, stride_kb, stride_kh, USE_TMA)
    v_lo_src = _head_source(V, batch, head, stride_vb, stride_vh, USE_TMA)
    v_hi_src = _head_source(V_HI, batch, head, stride_vb, stride_vh, USE_TMA)

    acc_lo = tl.zeros([BLOCK_M, BLOCK_LO], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_HI], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end, visible_end = _key_range(m_start, prefix, seq_len, BLOCK_M, BLOCK_N)
    acc_lo, acc_hi, row_sum, row_max = _fwd_split_d_key_tiles(
        acc_lo, acc_hi, row_sum, row_max, q_lo, q_hi, k_lo_src, k_hi_src, v_lo_src, v_hi_src, stride_kn, stride_vn,
        batch, head, offs_m, offs_lo, offs_hi, 0, full_end, prefix, seq_len, head_dim, qk_scale, BLOCK_N, BLOCK_LO,
        BLOCK_HI, EVEN_HI, False, DOT_PRECISION, USE_TMA)
    acc_lo, acc_hi, row_sum, row_max = _fwd_split_d_key_tiles(
        acc_lo, acc_hi, row_sum, row_max, q_lo, q_hi, k_lo_src, k_hi_src, v_lo_src, v_hi_src, stride_kn, stride_vn,
        batch, head, offs_m, offs_lo, offs_hi, full_end, visible_end, prefix, seq_len, head_dim, qk_scale, BLOCK_N,
        BLOCK_LO, BLOCK_HI, EVEN_HI, True, DOT_PRECISION, USE_TMA)

    _write_split(_head_source(O, batch, head, stride_ob, stride_oh, USE_TMA),
                 _head_source(O_HI, batch, head, stride_ob, stride_oh, USE_TMA), batch, head, m_start, stride_on,
                 offs_lo, offs_hi, seq_len, head_dim, acc_lo / row_sum[:, None], acc_hi / row_sum[:, None], BLOCK_M,
                 BLOCK_LO, BLOCK_HI, USE_TMA)
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, row_max + tl.log2(row_sum), mask=offs_m < seq_len)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_row_dot(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    num_heads, seq_len, num_m_tiles,
    head_dim: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO[i, d] * O[i, d], the softmax-backward row term."""
    pid = tl.program_id(0)
    bh = pid // num_m_tiles
    batch = bh // num_heads
    head = bh % num_heads
    offs_m = (pid % num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(_head_rows(O, batch, head, stride_ob, stride_oh),
                   offs_m, stride_on, offs_d, seq_len, head_dim, True, EVEN_D)
    do = _load_tile(_head_rows(DO, batch, head, stride_dob, stride_doh),
                    offs_m, stride_don, offs_d, seq_len, head_dim, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _row_terms(lse_row, delta_row, offs_m, seq_len, MASKED: tl.constexpr):
    """The query rows' LSE and delta (masked past N where the tile may run past it)."""
    if MASKED:
        lse = tl.load(lse_row + offs_m, mask=offs_m < seq_len, other=0.0)
        delta = tl.load(delta_row + offs_m, mask=offs_m < seq_len, other=0.0)
    else:
        lse = tl.load(lse_row + offs_m)
        delta = tl.load(delta_row + offs_m)
    return lse, delta


@triton.jit
def _dkdv_query_ranges(n_start, prefix, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query tiles that see the key tile at ``n_start``, as the first one, the end of the diagonal (masked)
    ones and the end of the whole ones after them (unmasked); the tile past the last whole one is masked too.

    Queries see the tile if it starts inside the prefix (all of them), else those at or after it. Query tile
    [m, m + BLOCK_M) sees every key of the tile iff the tile lies in the prefix, or m >= n_start + BLOCK_N - 1.
    """
    in_prefix = n_start + BLOCK_N <= prefix
    m_lo = tl.where(n_start < prefix, 0, (n_start // BLOCK_M) * BLOCK_M)
    full_from = tl.where(in_prefix, 0, tl.cdiv(n_start + BLOCK_N - 1, BLOCK_M) * BLOCK_M)
    m_floor = (seq_len // BLOCK_M) * BLOCK_M
    diag_end = tl.maximum(tl.minimum(full_from, m_floor), m_lo)
    return m_lo, diag_end, m_floor


@triton.jit
def _dq_share(dscores_t, k, key_centre, DOT_PRECISION: tl.constexpr, KEY_CENTRE: tl.constexpr):
    """A key tile's share of its query tile's dQ (unscaled) from dS^T [keys, queries] as rounded for the matmul;
    with KEY_CENTRE less the share's dS row sums times ``key_centre``."""
    dq = tl.dot(tl.trans(dscores_t), k, input_precision=DOT_PRECISION)
    if KEY_CENTRE:
        dq -= tl.sum(dscores_t.to(tl.float32), 0)[:, None] * key_centre[None, :]
    return dq


@triton.jit
def _dkdv_query_tiles(
    dk, dv, k, v, q_src, do_src, dq_dst, dq_out, lse_row, delta_row, ds_rows, stride_dsn, stride_qn, stride_don,
    stride_dqn, stride_dq_out_n, batch, head, n_start, offs_n, offs_d, m_lo, m_hi, prefix, seq_len, head_dim,
    qk_scale, scale, key_centre, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    DQ_IN_ORDER: tl.constexpr, USE_TMA: tl.constexpr, STORE_DS: tl.constexpr, KEY_CENTRE: tl.constexpr,
):
    """Accumulate dK, dV of the key tile at ``n_start`` over query tiles [m_lo, m_hi); works on transposed scores
    [keys, queries].

    ``q_src``, ``do_src``, ``dq_dst``: :func:`_head_source` of Q, dO and the fp32 dQ accumulator. With DQ_ATOMIC,
    also add this key tile's share of dQ (scaled) to the accumulator atomically: through a descriptor one TMA
    bulk reduce-add per tile (Hopper's ``cp.reduce.async.bulk``), else an atomic add per element. With DQ_IN_ORDER
    (one program runs the key tiles of its head one after another, in order), add it with a plain read and write
    of the accumulator's rows (``dq_dst``: pointers), whose first writer is key tile 0 and whose last writer
    stores the finished, scaled dQ rows into ``dq_out`` instead: deterministic, no atomics, no zeroing, no cast.
    With STORE_DS, the tile's dS^T (keys x queries, rounded as the dQ matmul takes it) goes to the [B, H, N, N] dS
    buffer (key-major, rows ``stride_dsn`` apart), for :func:`_prefix_causal_bwd_dq_from_ds`: STORE_DS 1 through
    ``ds_rows``, this head's rows of it; 2 through ``ds_rows`` as a tensor descriptor of it (blocks [1, 1, BLOCK_N,
    BLOCK_M]: no addresses held in registers, TMA drops keys and queries past N). With KEY_CENTRE, each dQ share
    less its dS row sums times ``key_centre`` (:func:`_key_centre`).
    """
    for m_start in range(m_lo, m_hi, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        q = _read_rows(q_src, batch, head, m_start, stride_qn, offs_d, seq_len, head_dim, MASKED, EVEN_D, BLOCK_M,
                       BLOCK_D, USE_TMA)
        do = _read_rows(do_src, batch, head, m_start, stride_don, offs_d, seq_len, head_dim, MASKED, EVEN_D,
                        BLOCK_M, BLOCK_D, USE_TMA)
        lse, delta = _row_terms(lse_row, delta_row, offs_m, seq_len, MASKED)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            # query rows past the end must not add to dK, dV
            visible = _visible(offs_m[None, :], offs_n[:, None], prefix, seq_len) & (offs_m[None, :] < seq_len)
            scores_t = tl.where(visible, scores_t, float("-inf"))
        probs_t = tl.exp2(scores_t - lse[None, :])
        dv += tl.dot(probs_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dprobs_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dscores_t = (probs_t * (dprobs_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(dscores_t, q, input_precision=DOT_PRECISION)
        if STORE_DS == 2:  # 0 on the pairs nobody sees
            ds_rows.store([batch, head, n_start, m_start], dscores_t.reshape(1, 1, BLOCK_N, BLOCK_M))
        elif STORE_DS == 1:  # keys and queries past N are not stored (N * row stride < 2^31: int32 offsets)
            inside = offs_n[:, None] < seq_len
            if MASKED:
                inside = inside & (offs_m[None, :] < seq_len)
            tl.store(ds_rows + (offs_n[:, None] * stride_dsn + offs_m[None, :]), dscores_t, mask=inside)
        if DQ_ATOMIC:
            dq = _dq_share(dscores_t, k, key_centre, DOT_PRECISION, KEY_CENTRE) * scale
            if USE_TMA:  # TMA drops the rows past N and the columns past D
                dq_dst.atomic_add([batch, head, m_start, 0], dq.reshape(1, 1, BLOCK_M, BLOCK_D))
            else:
                dq_ptrs = dq_dst + offs_m[:, None] * stride_dqn + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < seq_len) & (offs_d[None, :] < head_dim),
                              sem="relaxed")
        if DQ_IN_ORDER:
            dq = _dq_share(dscores_t, k, key_centre, DOT_PRECISION, KEY_CENTRE)
            inside = (offs_m[:, None] < seq_len) & (offs_d[None, :] < head_dim)
            dq_ptrs = dq_dst + offs_m[:, None] * stride_dqn + offs_d[None, :]
            if n_start > 0:  # the key tiles before this one have added theirs (every query sees key tile 0)
                dq += tl.load(dq_ptrs, mask=inside, other=0.0, cache_modifier=".cg")
            if n_start + BLOCK_N >= tl.minimum(seq_len, tl.maximum(prefix, m_start + BLOCK_M)):
                # no later key tile is visible to this query tile: its dQ is complete
                tl.store(dq_out + offs_m[:, None] * stride_dq_out_n + offs_d[None, :],
                         (dq * scale).to(dq_out.dtype.element_ty), mask=inside)
            else:
                tl.store(dq_ptrs, dq, mask=inside, cache_modifier=".cg")
    return dk, dv


@triton.jit
def _dkdv_key_tile(
    Q, K, V, DO, DK, DV, dq_dst, dq_out, lse_row, delta_row, ds_rows, stride_dsn, Q_TAIL, DO_TAIL, DS_TAIL, KC,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqn, stride_dq_out_n,
    batch, head, n_start, prefix, seq_len, scale, qk_scale,
    head_dim: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_IN_ORDER: tl.constexpr,
    USE_TMA: tl.constexpr, TAIL_M: tl.constexpr, STORE_DS: tl.constexpr, KEY_CENTRE: tl.constexpr,
    CENTRE_ROWS: tl.constexpr,
):
    """dK, dV of the key tile at ``n_start`` over every query tile that sees it (and its dQ shares or dS, see
    :func:`_dkdv_query_tiles`), stored. With TAIL_M (never with DQ_ATOMIC or DQ_IN_ORDER), the query rows past the
    last whole BLOCK_M tile come in tiles of TAIL_M rows, through Q_TAIL and DO_TAIL (and their dS through DS_TAIL
    with STORE_DS 2: a descriptor with [1, 1, BLOCK_N, TAIL_M] blocks). KC: K's pointer, for KEY_CENTRE's
    :func:`_key_centre`."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _read_rows(_head_source(K, batch, head, stride_kb, stride_kh, USE_TMA), batch, head, n_start, stride_kn,
                   offs_d, seq_len, head_dim, True, EVEN_D, BLOCK_N, BLOCK_D, USE_TMA)
    v = _read_rows(_head_source(V, batch, head, stride_vb, stride_vh, USE_TMA), batch, head, n_start, stride_vn,
                   offs_d, seq_len, head_dim, True, EVEN_D, BLOCK_N, BLOCK_D, USE_TMA)
    q_src = _head_source(Q, batch, head, stride_qb, stride_qh, USE_TMA)
    do_src = _head_source(DO, batch, head, stride_dob, stride_doh, USE_TMA)

    m_lo, diag_end, m_floor = _dkdv_query_ranges(n_start, prefix, seq_len, BLOCK_M, BLOCK_N)
    if KEY_CENTRE:
        key_centre = _key_centre(KC, batch, head, stride_kb, stride_kh, stride_kn, offs_d, seq_len, head_dim, EVEN_D,
                                 CENTRE_ROWS)
    else:
        key_centre = tl.zeros([BLOCK_D], dtype=tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # the diagonal tiles (masked), the full ones, the tile past the sequence end (masked)
    dk, dv = _dkdv_query_tiles(
        dk, dv, k, v, q_src, do_src, dq_dst, dq_out, lse_row, delta_row, ds_rows, stride_dsn, stride_qn, stride_don,
        stride_dqn, stride_dq_out_n, batch, head, n_start, offs_n, offs_d, m_lo, diag_end, prefix, seq_len, head_dim,
        qk_scale, scale, key_centre, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, True, DOT_PRECISION, DQ_ATOMIC, DQ_IN_ORDER,
        USE_TMA, STORE_DS, KEY_CENTRE)
    dk, dv = _dkdv_query_tiles(
        dk, dv, k, v, q_src, do_src, dq_dst, dq_out, lse_row, delta_row, ds_rows, stride_dsn, stride_qn, stride_don,
        stride_dqn, stride_dq_out_n, batch, head, n_start, offs_n, offs_d, diag_end, m_floor, prefix, seq_len, head_dim,
        qk_scale, scale, key_centre, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, False, DOT_PRECISION, DQ_ATOMIC, DQ_IN_ORDER,
        USE_TMA, STORE_DS, KEY_CENTRE)
    if TAIL_M:  # the rows past the last whole query tile, TAIL_M at a time
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, _head_source(Q_TAIL, batch, head, stride_qb, stride_qh, USE_TMA),
            _head_source(DO_TAIL, batch, head, stride_dob, stride_doh, USE_TMA), dq_dst, dq_out, lse_row, delta_row,
            DS_TAIL if STORE_DS == 2 else ds_rows, stride_dsn, stride_qn, stride_don, stride_dqn, stride_dq_out_n,
            batch, head, n_start, offs_n, offs_d, tl.maximum(diag_end, m_floor), seq_len, prefix, seq_len, head_dim,
            qk_scale, scale, key_centre, TAIL_M, BLOCK_N, BLOCK_D, EVEN_D, True, DOT_PRECISION, DQ_ATOMIC,
            DQ_IN_ORDER, USE_TMA, STORE_DS, KEY_CENTRE)
    else:
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, q_src, do_src, dq_dst, dq_out, lse_row, delta_row, ds_rows, stride_dsn, stride_qn,
            stride_don, stride_dqn, stride_dq_out_n, batch, head, n_start, offs_n, offs_d,
            tl.maximum(diag_end, m_floor), seq_len, prefix, seq_len, head_dim, qk_scale, scale, key_centre, BLOCK_M,
            BLOCK_N, BLOCK_D, EVEN_D, True, DOT_PRECISION, DQ_ATOMIC, DQ_IN_ORDER, USE_TMA, STORE_DS, KEY_CENTRE)

    if USE_TMA:  # TMA drops the rows past N and the columns past D
        DK.store([batch, head, n_start, 0], (dk * scale).to(DK.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
        DV.store([batch, head, n_start, 0], dv.to(DV.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
    else:
        _store_tile(_head_rows(DK, batch, head, stride_dkb, stride_dkh), offs_n, stride_dkn, offs_d,
                    seq_len, head_dim, (dk * scale).to(DK.dtype.element_ty))
        _store_tile(_head_rows(DV, batch, head, stride_dvb, stride_dvh), offs_n, stride_dvn, offs_d,
                    seq_len, head_dim, dv.to(DV.dtype.element_ty))


@triton.jit
def _prefix_causal_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, DS, PREFIX, Q_TAIL, DO_TAIL, DS_TAIL, KC, prefix_int,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqn, stride_dsn,
    num_heads, seq_len, scale, qk_scale, num_n_tiles,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr, USE_TMA: tl.constexpr, TAIL_M: tl.constexpr,
    STORE_DS: tl.constexpr, KEY_CENTRE: tl.constexpr,
):
    """dK, dV of one key tile; with DQ_ATOMIC also dQ (fp32, atomically, so not bit-reproducible), in one launch;
    with STORE_DS also its dS^T into DS ([B, H, N, N], key-major, rows ``stride_dsn`` apart, heads N of them; 2:
    DS is a tensor descriptor of it, and DS_TAIL one with TAIL_M-column blocks for the tail tiles) for
    :func:`_prefix_causal_bwd_dq_from_ds`.
    With USE_TMA, Q, K, V, DO, DK, DV are [B, H, N, D] tensor descriptors, and so is DQ_ACC with DQ_ATOMIC. With
    TAIL_M (not with DQ_ATOMIC), query rows past the last whole BLOCK_M tile are read TAIL_M at a time through
    Q_TAIL and DO_TAIL (blocks [1, 1, TAIL_M, BLOCK_D] with USE_TMA; else Q and DO again). KEY_CENTRE (with
    DQ_ATOMIC): dQ less its dS row sums times :func:`_key_centre` of KC (K's pointer)."""
    # key tile 0 is seen by the most queries: it goes first
    bh, batch, head, _, n_start, prefix = _program_tile(PREFIX, prefix_int, num_n_tiles, num_heads, seq_len, BLOCK_N,
                                                        False, PREFIX_IS_TENSOR)
    _dkdv_key_tile(
        Q, K, V, DO, DK, DV, _head_source(DQ_ACC, batch, head, stride_dqb, stride_dqh, USE_TMA), DQ_ACC,
        LSE + bh.to(tl.int64) * seq_len, DELTA + bh.to(tl.int64) * seq_len,
        DS if STORE_DS == 2 else DS + bh.to(tl.int64) * seq_len * stride_dsn, stride_dsn, Q_TAIL, DO_TAIL, DS_TAIL,
        KC, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
        stride_dqn, stride_dqn, batch, head, n_start, prefix, seq_len, scale, qk_scale,
        head_dim, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, DQ_ATOMIC, False, USE_TMA, TAIL_M, STORE_DS,
        KEY_CENTRE, KEY_CENTRE_ROWS)


@triton.jit
def _prefix_causal_bwd_per_head(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, DQ_ACC, PREFIX, KC, prefix_int,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    num_heads, seq_len, scale, qk_scale,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, KEY_CENTRE: tl.constexpr,
):
    """The whole backward of one (batch, head) in one program: delta of every row, then its key tiles in order,
    each adding its dQ share to an fp32 accumulator (DQ_ACC, [B * H, N, D] contiguous, uninitialised) that only
    this program touches, so the sums run in the same order every time with 5 matmuls per tile pair instead of
    the two-launch backward's 7. With USE_TMA, Q, K, V, DO, DK, DV are [B, H, N, D] tensor descriptors (O, DQ and
    the accumulator stay pointers). KEY_CENTRE: dQ less its dS row sums times :func:`_key_centre` of KC (K's
    pointer)."""
    bh = tl.program_id(0)
    batch = bh // num_heads
    head = bh % num_heads
    prefix = _prefix_of(PREFIX, prefix_int, batch, seq_len, PREFIX_IS_TENSOR)
    offs_d = tl.arange(0, BLOCK_D)
    lse_row = LSE + bh.to(tl.int64) * seq_len
    delta_row = DELTA + bh.to(tl.int64) * seq_len

    do_src = _head_source(DO, batch, head, stride_dob, stride_doh, USE_TMA)
    o_rows = _head_rows(O, batch, head, stride_ob, stride_oh)
    for m_start in range(0, seq_len, BLOCK_M):  # delta_i = sum_d dO[i, d] * O[i, d]
        offs_m = m_start + tl.arange(0, BLOCK_M)
        o = _load_tile(o_rows, offs_m, stride_on, offs_d, seq_len, head_dim, True, EVEN_D)
        do = _read_rows(do_src, batch, head, m_start, stride_don, offs_d, seq_len, head_dim, True, EVEN_D, BLOCK_M,
                        BLOCK_D, USE_TMA)
        tl.store(delta_row + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < seq_len)
    tl.debug_barrier()  # every thread's delta rows stored before any thread reads them

    dq_acc = DQ_ACC + bh.to(tl.int64) * seq_len * head_dim
    dq_out = _head_rows(DQ, batch, head, stride_dqb, stride_dqh)
    for n_start in range(0, seq_len, BLOCK_N):
        _dkdv_key_tile(
            Q, K, V, DO, DK, DV, dq_acc, dq_out, lse_row, delta_row, dq_acc, 0, Q, DO, dq_acc, KC,  # no dS stored
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
            stride_dvn, head_dim, stride_dqn, batch, head, n_start, prefix, seq_len, scale, qk_scale,
            head_dim, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, False, True, USE_TMA, 0, 0, KEY_CENTRE,
            KEY_CENTRE_ROWS)
        tl.debug_barrier()  # this key tile's dQ rows written before the next one reads them


@triton.jit
def _dq_key_tiles(
    dq, ds_sum, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, batch, head,
    offs_m, offs_d, n_lo, n_hi, prefix, seq_len, head_dim, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, KEY_CENTRE: tl.constexpr,
):
    """dq += dS K over the key tiles [n_lo, n_hi); with KEY_CENTRE also ds_sum += the rows of dS as rounded for
    the matmul (:func:`_key_centre`)."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        k, v, scores = _key_tile_scores(q, k_src, v_src, stride_kn, stride_vn, batch, head, offs_m, offs_d, n_start,
                                        prefix, seq_len, head_dim, qk_scale, BLOCK_N, BLOCK_D, EVEN_D, MASKED,
                                        DOT_PRECISION, USE_TMA)
        probs = tl.exp2(scores - lse[:, None])
        dprobs = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dscores = (probs * (dprobs - delta[:, None])).to(k.dtype)
        dq += tl.dot(dscores, k, input_precision=DOT_PRECISION)
        if KEY_CENTRE:
            ds_sum += tl.sum(dscores.to(tl.float32), 1)
    return dq, ds_sum


@triton.jit
def _dq_query_tile(
    Q, K, V, O, DO, LSE, DELTA, DQ, KC, batch, head, bh, m_start, prefix,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    seq_len, scale, qk_scale,
    head_dim: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DELTA_HERE: tl.constexpr, USE_TMA: tl.constexpr,
    KEY_CENTRE: tl.constexpr, CENTRE_ROWS: tl.constexpr,
):
    """dQ of the BLOCK_M query rows from ``m_start`` (Q, DO and DQ descriptors, with USE_TMA, of
    [1, 1, BLOCK_M, BLOCK_D] blocks), and with DELTA_HERE their delta rows. KEY_CENTRE: less dS's row sums times
    :func:`_key_centre` of KC (K's pointer)."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _read_rows(_head_source(Q, batch, head, stride_qb, stride_qh, USE_TMA), batch, head, m_start, stride_qn,
                   offs_d, seq_len, head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, USE_TMA)
    do = _read_rows(_head_source(DO, batch, head, stride_dob, stride_doh, USE_TMA), batch, head, m_start,
                    stride_don, offs_d, seq_len, head_dim, True, EVEN_D, BLOCK_M, BLOCK_D, USE_TMA)
    k_src = _head_source(K, batch, head, stride_kb, stride_kh, USE_TMA)
    v_src = _head_source(V, batch, head, stride_vb, stride_vh, USE_TMA)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=offs_m < seq_len, other=0.0)
    if DELTA_HERE:
        o = _load_tile(_head_rows(O, batch, head, stride_ob, stride_oh),
                       offs_m, stride_on, offs_d, seq_len, head_dim, True, EVEN_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)
    else:
        delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=offs_m < seq_len, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ds_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, visible_end = _key_range(m_start, prefix, seq_len, BLOCK_M, BLOCK_N)
    dq, ds_sum = _dq_key_tiles(dq, ds_sum, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, batch, head, offs_m,
                               offs_d, 0, full_end, prefix, seq_len, head_dim, qk_scale, BLOCK_N, BLOCK_D, EVEN_D,
                               False, DOT_PRECISION, USE_TMA, KEY_CENTRE)
    dq, ds_sum = _dq_key_tiles(dq, ds_sum, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, batch, head, offs_m,
                               offs_d, full_end, visible_end, prefix, seq_len, head_dim, qk_scale, BLOCK_N, BLOCK_D,
                               EVEN_D, True, DOT_PRECISION, USE_TMA, KEY_CENTRE)
    if KEY_CENTRE:
        dq -= ds_sum[:, None] * _key_centre(KC, batch, head, stride_kb, stride_kh, stride_kn, offs_d, seq_len,
                                            head_dim, EVEN_D, CENTRE_ROWS)[None, :]
    if USE_TMA:  # TMA drops the rows past N and the columns past D
        DQ.store([batch, head, m_start, 0], (dq * scale).to(DQ.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        _store_tile(_head_rows(DQ, batch, head, stride_dqb, stride_dqh), offs_m, stride_dqn, offs_d,
                    seq_len, head_dim, (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def _prefix_causal_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, PREFIX, Q_TAIL, DO_TAIL, DQ_TAIL, KC, prefix_int,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    num_heads, seq_len, scale, qk_scale, num_m_tiles, num_tail_tiles,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DELTA_HERE: tl.constexpr, USE_TMA: tl.constexpr, TAIL_M: tl.constexpr,
    KEY_CENTRE: tl.constexpr,
):
    """dQ of one query tile. With DELTA_HERE it also computes and stores this tile's delta rows (rowsum(dO * O)),
    which the dK/dV kernel launched after it reads: the row-dot pre-pass folded into this kernel. With USE_TMA,
    Q, K, V, DO, DQ are [B, H, N, D] tensor descriptors (O stays a pointer). With TAIL_M, the rows past the last
    whole BLOCK_M tile are ``num_tail_tiles`` tiles of TAIL_M rows, through Q_TAIL, DO_TAIL and DQ_TAIL (blocks
    [1, 1, TAIL_M, BLOCK_D] with USE_TMA; else Q, DO and DQ again). KEY_CENTRE: see :func:`_key_centre` (KC: K's
    pointer)."""
    bh, batch, head, tile, m_start, prefix = _program_tile(PREFIX, prefix_int, num_m_tiles, num_heads, seq_len,
                                                           BLOCK_M, True, PREFIX_IS_TENSOR)
    if TAIL_M:
        if tile < num_tail_tiles:  # the rows past the last whole tile, which see the most keys, first of all
            tail_start = (seq_len // BLOCK_M) * BLOCK_M + tile * TAIL_M
            _dq_query_tile(Q_TAIL, K, V, O, DO_TAIL, LSE, DELTA, DQ_TAIL, KC, batch, head, bh, tail_start, prefix,
                           stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                           stride_vn, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb,
                           stride_dqh, stride_dqn, seq_len, scale, qk_scale, head_dim, EVEN_D, TAIL_M, BLOCK_N,
                           BLOCK_D, DOT_PRECISION, DELTA_HERE, USE_TMA, KEY_CENTRE, KEY_CENTRE_ROWS)
        else:
            _dq_query_tile(Q, K, V, O, DO, LSE, DELTA, DQ, KC, batch, head, bh, m_start, prefix, stride_qb, stride_qh,
                           stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob,
                           stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh,
                           stride_dqn, seq_len, scale, qk_scale, head_dim, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D,
                           DOT_PRECISION, DELTA_HERE, USE_TMA, KEY_CENTRE, KEY_CENTRE_ROWS)
    else:
        _dq_query_tile(Q, K, V, O, DO, LSE, DELTA, DQ, KC, batch, head, bh, m_start, prefix, stride_qb, stride_qh,
                       stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob,
                       stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                       seq_len, scale, qk_scale, head_dim, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
                       DELTA_HERE, USE_TMA, KEY_CENTRE, KEY_CENTRE_ROWS)


@triton.jit
def _dq_from_ds_key_tiles(dq, ds_sum, ds_src, stride_dsn, k_src, stride_kn, batch, head, m_start, offs_m, offs_d,
                          n_lo, n_hi, prefix, seq_len, head_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, KEY_CENTRE: tl.constexpr):
    """dq += dS K over the key tiles [n_lo, n_hi), dS^T read from the stored [N, N] buffer (key-major; ``ds_src``:
    this head's rows, or with USE_TMA a descriptor of the buffer). MASKED tiles use only the visible pairs (the dK/dV
    kernel never wrote the others: its tiles may differ from these): through pointers they are all it reads,
    through TMA the rest is read and replaced by zeros. With KEY_CENTRE also ds_sum += dS's rows."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        if USE_TMA:  # TMA fills keys and queries past N with zeros
            ds_t = ds_src.load([batch, head, n_start, m_start]).reshape(BLOCK_N, BLOCK_M)
            if MASKED:  # never written there: whatever the memory holds (NaN too) must not count
                ds_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], prefix, seq_len), ds_t, 0.0)
        else:
            inside = (offs_n[:, None] < seq_len) & (offs_m[None, :] < seq_len)
            if MASKED:
                inside = inside & _visible(offs_m[None, :], offs_n[:, None], prefix, seq_len)
            ds_t = tl.load(ds_src + (offs_n[:, None] * stride_dsn + offs_m[None, :]), mask=inside, other=0.0)
        k = _read_rows(k_src, batch, head, n_start, stride_kn, offs_d, seq_len, head_dim, True, EVEN_D, BLOCK_N,
                       BLOCK_D, USE_TMA)
        dq += tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
        if KEY_CENTRE:
            ds_sum += tl.sum(ds_t.to(tl.float32), 0)
    return dq, ds_sum


@triton.jit
def _prefix_causal_bwd_dq_from_ds(
    K, DS, DQ, PREFIX, KC, prefix_int,
    stride_kb, stride_kh, stride_kn,
    stride_dqb, stride_dqh, stride_dqn, stride_dsn,
    num_heads, seq_len, scale, num_m_tiles,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, KEY_CENTRE: tl.constexpr,
):
    """dQ of one query tile from the dS the dK/dV kernel stored (STORE_DS): one matmul per key tile, where
    :func:`_prefix_causal_bwd_dq` recomputes the scores and dP (three). No tail tiles. With USE_TMA, K and DQ are
    [B, H, N, D] tensor descriptors and DS one of the [B, H, N, N] buffer (blocks [1, 1, BLOCK_N, BLOCK_M]).
    KEY_CENTRE: less dS's row sums times :func:`_key_centre` of KC (K's pointer)."""
    bh, batch, head, _, m_start, prefix = _program_tile(PREFIX, prefix_int, num_m_tiles, num_heads, seq_len, BLOCK_M,
                                                        True, PREFIX_IS_TENSOR)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ds_src = DS if USE_TMA else DS + bh.to(tl.int64) * seq_len * stride_dsn
    k_src = _head_source(K, batch, head, stride_kb, stride_kh, USE_TMA)
    full_end, visible_end = _key_range(m_start, prefix, seq_len, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ds_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq, ds_sum = _dq_from_ds_key_tiles(dq, ds_sum, ds_src, stride_dsn, k_src, stride_kn, batch, head, m_start, offs_m,
                                       offs_d, 0, full_end, prefix, seq_len, head_dim, BLOCK_M, BLOCK_N, BLOCK_D,
                                       EVEN_D, False, DOT_PRECISION, USE_TMA, KEY_CENTRE)
    dq, ds_sum = _dq_from_ds_key_tiles(dq, ds_sum, ds_src, stride_dsn, k_src, stride_kn, batch, head, m_start, offs_m,
                                       offs_d, full_end, visible_end, prefix, seq_len, head_dim, BLOCK_M, BLOCK_N,
                                       BLOCK_D, EVEN_D, True, DOT_PRECISION, USE_TMA, KEY_CENTRE)
    if KEY_CENTRE:
        dq -= ds_sum[:, None] * _key_centre(KC, batch, head, stride_kb, stride_kh, stride_kn, offs_d, seq_len,
                                            head_dim, EVEN_D, KEY_CENTRE_ROWS)[None, :]
    if USE_TMA:  # TMA drops the rows past N and the columns past D
        DQ.store([batch, head, m_start, 0], (dq * scale).to(DQ.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        _store_tile(_head_rows(DQ, batch, head, stride_dqb, stride_dqh), offs_m, stride_dqn, offs_d, seq_len,
                    head_dim, (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_split_d_query_tiles(
    dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_lo_src, q_hi_src, do_lo_src, do_hi_src, lse_row,
    delta_row, stride_qn, stride_don, batch, head, offs_n, offs_lo, offs_hi, m_lo, m_hi, prefix, seq_len, head_dim,
    qk_scale, BLOCK_M: tl.constexpr, BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr, EVEN_HI: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """:func:`_dkdv_query_tiles` (no dQ) over a split head dim; each column block of dK and dV has its own
    accumulator."""
    for m_start in range(m_lo, m_hi, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        q_lo, q_hi = _read_split(q_lo_src, q_hi_src, batch, head, m_start, stride_qn, offs_lo, offs_hi, seq_len,
                                 head_dim, MASKED, EVEN_HI, BLOCK_M, BLOCK_LO, BLOCK_HI, USE_TMA)
        do_lo, do_hi = _read_split(do_lo_src, do_hi_src, batch, head, m_start, stride_don, offs_lo, offs_hi,
                                   seq_len, head_dim, MASKED, EVEN_HI, BLOCK_M, BLOCK_LO, BLOCK_HI, USE_TMA)
        lse, delta = _row_terms(lse_row, delta_row, offs_m, seq_len, MASKED)
        scores_t = _split_dot_t(k_lo, k_hi, q_lo, q_hi, DOT_PRECISION) * qk_scale
        if MASKED:  # query rows past the end must not add to dK, dV
            visible = _visible(offs_m[None, :], offs_n[:, None], prefix, seq_len) & (offs_m[None, :] < seq_len)
            scores_t = tl.where(visible, scores_t, float("-inf"))
        probs_t = tl.exp2(scores_t - lse[None, :])
        probs_in = probs_t.to(do_lo.dtype)  # the matmul operand; the fp32 probabilities go on into dscores
        dv_lo += tl.dot(probs_in, do_lo, input_precision=DOT_PRECISION)
        dv_hi += tl.dot(probs_in, do_hi, input_precision=DOT_PRECISION)
        dprobs_t = _split_dot_t(v_lo, v_hi, do_lo, do_hi, DOT_PRECISION)
        dscores_t = (probs_t * (dprobs_t - delta[None, :])).to(q_lo.dtype)
        dk_lo += tl.dot(dscores_t, q_lo, input_precision=DOT_PRECISION)
        dk_hi += tl.dot(dscores_t, q_hi, input_precision=DOT_PRECISION)
    return dk_lo, dk_hi, dv_lo, dv_hi


@triton.jit
def _prefix_causal_bwd_dkdv_split_d(
    Q, K, V, DO, DK, DV, Q_HI, K_HI, V_HI, DO_HI, DK_HI, DV_HI, LSE, DELTA, PREFIX, prefix_int,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    num_heads, seq_len, scale, qk_scale, num_n_tiles,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr, EVEN_HI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """:func:`_prefix_causal_bwd_dkdv` (no dQ, no tail tiles) for a head dim of BLOCK_LO + at most BLOCK_HI
    columns (EVEN_HI: exactly); descriptors or pointers as in :func:`_prefix_causal_fwd_split_d`."""
    # key tile 0 is seen by the most queries: it goes first
    bh, batch, head, _, n_start, prefix = _program_tile(PREFIX, prefix_int, num_n_tiles, num_heads, seq_len, BLOCK_N,
                                                        False, PREFIX_IS_TENSOR)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_lo = tl.arange(0, BLOCK_LO)
    offs_hi = BLOCK_LO + tl.arange(0, BLOCK_HI)
    k_lo, k_hi = _read_split(_head_source(K, batch, head, stride_kb, stride_kh, USE_TMA),
                             _head_source(K_HI, batch, head, stride_kb, stride_kh, USE_TMA), batch, head, n_start,
                             stride_kn, offs_lo, offs_hi, seq_len, head_dim, True, EVEN_HI, BLOCK_N, BLOCK_LO,
                             BLOCK_HI, USE_TMA)
    v_lo, v_hi = _read_split(_head_source(V, batch, head, stride_vb, stride_vh, USE_TMA),
                             _head_source(V_HI, batch, head, stride_vb, stride_vh, USE_TMA), batch, head, n_start,
                             stride_vn, offs_lo, offs_hi, seq_len, head_dim, True, EVEN_HI, BLOCK_N, BLOCK_LO,
                             BLOCK_HI, USE_TMA)
    q_lo_src = _head_source(Q, batch, head, stride_qb, stride_qh, USE_TMA)
    q_hi_src = _head_source(Q_HI, batch, head, stride_qb, stride_qh, USE_TMA)
    do_lo_src = _head_source(DO, batch, head, stride_dob, stride_doh, USE_TMA)
    do_hi_src = _head_source(DO_HI, batch, head, stride_dob, stride_doh, USE_TMA)
    lse_row = LSE + bh.to(tl.int64) * seq_len
    delta_row = DELTA + bh.to(tl.int64) * seq_len
    m_lo, diag_end, m_floor = _dkdv_query_ranges(n_start, prefix, seq_len, BLOCK_M, BLOCK_N)

    dk_lo = tl.zeros([BLOCK_N, BLOCK_LO], dtype=tl.float32)
    dk_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
    dv_lo = tl.zeros([BLOCK_N, BLOCK_LO], dtype=tl.float32)
    dv_hi = tl.zeros([BLOCK_N, BLOCK_HI], dtype=tl.float32)
    # the diagonal tiles (masked), the whole ones, the tile past the sequence end (masked)
    dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_split_d_query_tiles(
        dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_lo_src, q_hi_src, do_lo_src, do_hi_src, lse_row,
        delta_row, stride_qn, stride_don, batch, head, offs_n, offs_lo, offs_hi, m_lo, diag_end, prefix, seq_len,
        head_dim, qk_scale, BLOCK_M, BLOCK_LO, BLOCK_HI, EVEN_HI, True, DOT_PRECISION, USE_TMA)
    dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_split_d_query_tiles(
        dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_lo_src, q_hi_src, do_lo_src, do_hi_src, lse_row,
        delta_row, stride_qn, stride_don, batch, head, offs_n, offs_lo, offs_hi, diag_end, m_floor, prefix, seq_len,
        head_dim, qk_scale, BLOCK_M, BLOCK_LO, BLOCK_HI, EVEN_HI, False, DOT_PRECISION, USE_TMA)
    dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_split_d_query_tiles(
        dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_lo_src, q_hi_src, do_lo_src, do_hi_src, lse_row,
        delta_row, stride_qn, stride_don, batch, head, offs_n, offs_lo, offs_hi, tl.maximum(diag_end, m_floor),
        seq_len, prefix, seq_len, head_dim, qk_scale, BLOCK_M, BLOCK_LO, BLOCK_HI, EVEN_HI, True, DOT_PRECISION,
        USE_TMA)

    _write_split(_head_source(DK, batch, head, stride_dkb, stride_dkh, USE_TMA),
                 _head_source(DK_HI, batch, head, stride_dkb, stride_dkh, USE_TMA), batch, head, n_start, stride_dkn,
                 offs_lo, offs_hi, seq_len, head_dim, dk_lo * scale, dk_hi * scale, BLOCK_N, BLOCK_LO, BLOCK_HI,
                 USE_TMA)
    _write_split(_head_source(DV, batch, head, stride_dvb, stride_dvh, USE_TMA),
                 _head_source(DV_HI, batch, head, stride_dvb, stride_dvh, USE_TMA), batch, head, n_start, stride_dvn,
                 offs_lo, offs_hi, seq_len, head_dim, dv_lo, dv_hi, BLOCK_N, BLOCK_LO, BLOCK_HI, USE_TMA)


@triton.jit
def _dq_split_d_key_tiles(
    dq_lo, dq_hi, ds_sum, q_lo, q_hi, do_lo, do_hi, lse, delta, k_lo_src, k_hi_src, v_lo_src, v_hi_src, stride_kn,
    stride_vn, batch, head, offs_m, offs_lo, offs_hi, n_lo, n_hi, prefix, seq_len, head_dim, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr, EVEN_HI: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, KEY_CENTRE: tl.constexpr,
):
    """:func:`_dq_key_tiles` over a split head dim."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        k_lo, k_hi, scores = _split_key_tile_scores(q_lo, q_hi, k_lo_src, k_hi_src, stride_kn, batch, head, offs_m,
                                                    offs_lo, offs_hi, n_start, prefix, seq_len, head_dim, qk_scale,
                                                    BLOCK_N, BLOCK_LO, BLOCK_HI, EVEN_HI, MASKED, DOT_PRECISION,
                                                    USE_TMA)
        probs = tl.exp2(scores - lse[:, None])
        v_lo, v_hi = _read_split(v_lo_src, v_hi_src, batch, head, n_start, stride_vn, offs_lo, offs_hi, seq_len,
                                 head_dim, MASKED, EVEN_HI, BLOCK_N, BLOCK_LO, BLOCK_HI, USE_TMA)
        dprobs = _split_dot_t(do_lo, do_hi, v_lo, v_hi, DOT_PRECISION)
        dscores = (probs * (dprobs - delta[:, None])).to(k_lo.dtype)
        dq_lo += tl.dot(dscores, k_lo, input_precision=DOT_PRECISION)
        dq_hi += tl.dot(dscores, k_hi, input_precision=DOT_PRECISION)
        if KEY_CENTRE:
            ds_sum += tl.sum(dscores.to(tl.float32), 1)
    return dq_lo, dq_hi, ds_sum


@triton.jit
def _prefix_causal_bwd_dq_split_d(
    Q, K, V, DO, DQ, Q_HI, K_HI, V_HI, DO_HI, DQ_HI, O, LSE, DELTA, PREFIX, KC, prefix_int,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    num_heads, seq_len, scale, qk_scale, num_m_tiles,
    PREFIX_IS_TENSOR: tl.constexpr, head_dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_LO: tl.constexpr, BLOCK_HI: tl.constexpr, EVEN_HI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DELTA_HERE: tl.constexpr, USE_TMA: tl.constexpr, KEY_CENTRE: tl.constexpr,
):
    """:func:`_prefix_causal_bwd_dq` (no tail tiles) for a head dim of BLOCK_LO + at most BLOCK_HI columns
    (EVEN_HI: exactly); with DELTA_HERE it computes and stores the tile's delta rows too (O stays a pointer).
    Descriptors or pointers as in :func:`_prefix_causal_fwd_split_d`."""
    bh, batch, head, _, m_start, prefix = _program_tile(PREFIX, prefix_int, num_m_tiles, num_heads, seq_len, BLOCK_M,
                                                        True, PREFIX_IS_TENSOR)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_lo = tl.arange(0, BLOCK_LO)
    offs_hi = BLOCK_LO + tl.arange(0, BLOCK_HI)
    q_lo, q_hi = _read_split(_head_source(Q, batch, head, stride_qb, stride_qh, USE_TMA),
                             _head_source(Q_HI, batch, head, stride_qb, stride_qh, USE_TMA), batch, head, m_start,
                             stride_qn, offs_lo, offs_hi, seq_len, head_dim, True, EVEN_HI, BLOCK_M, BLOCK_LO,
                             BLOCK_HI, USE_TMA)
    do_lo, do_hi = _read_split(_head_source(DO, batch, head, stride_dob, stride_doh, USE_TMA),
                               _head_source(DO_HI, batch, head, stride_dob, stride_doh, USE_TMA), batch, head,
                               m_start, stride_don, offs_lo, offs_hi, seq_len, head_dim, True, EVEN_HI, BLOCK_M,
                               BLOCK_LO, BLOCK_HI, USE_TMA)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=offs_m < seq_len, other=0.0)
    if DELTA_HERE:
        o_lo, o_hi = _read_split(_head_rows(O, batch, head, stride_ob, stride_oh), O, batch, head, m_start,
                                 stride_on, offs_lo, offs_hi, seq_len, head_dim, True, EVEN_HI, BLOCK_M, BLOCK_LO,
                                 BLOCK_HI, False)
        delta = (tl.sum(o_lo.to(tl.float32) * do_lo.to(tl.float32), 1)
                 + tl.sum(o_hi.to(tl.float32) * do_hi.to(tl.float32), 1))
        tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)
    else:
        delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=offs_m < seq_len, other=0.0)
    k_lo_src = _head_source(K, batch, head, stride_kb, stride_kh, USE_TMA)
    k_hi_src = _head_source(K_HI, batch, head, stride_kb, stride_kh, USE_TMA)
    v_lo_src = _head_source(V, batch, head, stride_vb, stride_vh, USE_TMA)
    v_hi_src = _head_source(V_HI, batch, head, stride_vb, stride_vh, USE_TMA)

    dq_lo = tl.zeros([BLOCK_M, BLOCK_LO], dtype=tl.float32)
    dq_hi = tl.zeros([BLOCK_M, BLOCK_HI], dtype=tl.float32)
    ds_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, visible_end = _key_range(m_start, prefix, seq_len, BLOCK_M, BLOCK_N)
    dq_lo, dq_hi, ds_sum = _dq_split_d_key_tiles(
        dq_lo, dq_hi, ds_sum, q_lo, q_hi, do_lo, do_hi, lse, delta, k_lo_src, k_hi_src, v_lo_src, v_hi_src,
        stride_kn, stride_vn, batch, head, offs_m, offs_lo, offs_hi, 0, full_end, prefix, seq_len, head_dim, qk_scale,
        BLOCK_N, BLOCK_LO, BLOCK_HI, EVEN_HI, False, DOT_PRECISION, USE_TMA, KEY_CENTRE)
    dq_lo, dq_hi, ds_sum = _dq_split_d_key_tiles(
        dq_lo, dq_hi, ds_sum, q_lo, q_hi, do_lo, do_hi, lse, delta, k_lo_src, k_hi_src, v_lo_src, v_hi_src,
        stride_kn, stride_vn, batch, head, offs_m, offs_lo, offs_hi, full_end, visible_end, prefix, seq_len,
        head_dim, qk_scale, BLOCK_N, BLOCK_LO, BLOCK_HI, EVEN_HI, True, DOT_PRECISION, USE_TMA, KEY_CENTRE)
    if KEY_CENTRE:  # each column block from its own columns of the same keys
        dq_lo -= ds_sum[:, None] * _key_centre(KC, batch, head, stride_kb, stride_kh, stride_kn, offs_lo, seq_len,
                                               head_dim, True, KEY_CENTRE_ROWS)[None, :]
        dq_hi -= ds_sum[:, None] * _key_centre(KC, batch, head, stride_kb, stride_kh, stride_kn, offs_hi, seq_len,
                                               head_dim, EVEN_HI, KEY_CENTRE_ROWS)[None, :]
    _write_split(_head_source(DQ, batch, head, stride_dqb, stride_dqh, USE_TMA),
                 _head_source(DQ_HI, batch, head, stride_dqb, stride_dqh, USE_TMA), batch, head, m_start, stride_dqn,
                 offs_lo, offs_hi, seq_len, head_dim, dq_lo * scale, dq_hi * scale, BLOCK_M, BLOCK_LO, BLOCK_HI,
                 USE_TMA)


# ----------------------------------------------------------------------------- launchers


def _empty_bnhd(like: torch.Tensor) -> torch.Tensor:
    """A [B, H, N, D] tensor stored as [B, N, H, D], so ``.transpose(1, 2).reshape(B, N, H * D)`` is free."""
    batch, heads, seq_len, head_dim = like.shape
    # one allocation with these strides, not an allocation and a transposed view of it: a few us less host time each
    return like.new_empty_strided((batch, heads, seq_len, head_dim),
                                  (seq_len * heads * head_dim, head_dim, heads * head_dim, 1))


def _strides(t: torch.Tensor):
    return t.stride()[:3]


def _prefix_args(prefix, q):
    """(pointer, int, PREFIX_IS_TENSOR) for the kernels; an int prefix passes q as a pointer never read, clamped
    to [0, N] here as a tensor's values are on the device: the dK/dV kernels take a key tile that lies in the prefix
    as seen by every query unmasked, and one running past N must not (its keys past N would get a dS, which the
    dQ key correction sums)."""
    if isinstance(prefix, torch.Tensor):
        return prefix, 0, True
    return q, min(max(int(prefix), 0), q.shape[2]), False


_SHAPE_ARGS = {}


def shape_args(head_dim: int, dtype: torch.dtype) -> dict:
    """The head-dim and precision constexprs of every kernel here (computed once per head dim and dtype)."""
    if (head_dim, dtype) not in _SHAPE_ARGS:
        _SHAPE_ARGS[head_dim, dtype] = _shape_args(head_dim, dtype)
    return _SHAPE_ARGS[head_dim, dtype]


def _shape_args(head_dim: int, dtype: torch.dtype) -> dict:
    block_d = max(16, next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32, never TF32
    return dict(head_dim=head_dim, EVEN_D=block_d == head_dim, BLOCK_D=block_d, DOT_PRECISION=precision)


def forward(q, k, v, prefix, scale: float, configs: AttentionConfigs | None = None):
    """Output ([B, H, N, D], stored [B, N, H, D]) and base-2 log-sum-exp ([B, H, N], fp32).

    ``prefix`` is a Python int already clamped to [0, N], or an integer tensor [B] (clamped in the kernel).
    ``configs`` default to :func:`configs_for_call`'s. A ``+tma`` forward config reads and writes through tensor
    descriptors where :func:`tma_usable` allows, else runs the same tiles through pointers (so do the backward
    kernels' ``+tma`` configs).
    """
    batch, heads, seq_len, head_dim = q.shape
    cfg = (configs or configs_for_call(q)).forward
    out = _empty_bnhd(q)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    prefix_ptr, prefix_int, prefix_is_tensor = _prefix_args(prefix, q)
    shapes = shape_args(head_dim, q.dtype)
    parts = head_dim_split(head_dim) if cfg.split_d else None
    if parts:
        num_m_tiles = cdiv(seq_len, cfg.block_m)
        lo, hi, use_tma = _split_operands(cfg, parts, (q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n),
                                          (out, cfg.block_m))
        launch(_prefix_causal_fwd_split_d, (batch * heads * num_m_tiles,), (*lo, *hi, lse, prefix_ptr), (
            prefix_int, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, seq_len, scale * LOG2_E, num_m_tiles,
        ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **_split_args(head_dim, parts, shapes), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, USE_TMA=use_tma), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out, lse
    num_m_tiles, num_tail_tiles, tail_m = query_tiles(seq_len, cfg)
    tail_operands = ((q, tail_m), (out, tail_m)) if tail_m else ()
    (q_, k_, v_, out_, *tails), use_tma = _operands(cfg, shapes, (q, cfg.block_m), (k, cfg.block_n),
                                                    (v, cfg.block_n), (out, cfg.block_m), *tail_operands)
    tails = tails or (q_, out_)  # never read without TAIL_M
    launch(_prefix_causal_fwd, (batch * heads * num_m_tiles,), (q_, k_, v_, out_, lse, prefix_ptr, *tails), (
        prefix_int, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, seq_len, scale * LOG2_E, num_m_tiles, num_tail_tiles,
    ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **shapes, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            USE_TMA=use_tma, TAIL_M=tail_m), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def head_dim_split(head_dim: int) -> tuple[int, int] | None:
    """(lo, hi): a head dim as two power-of-2 column blocks, lo the largest power of 2 below it and hi the least
    one (16 at least, the matmuls' smallest depth) that covers the rest; None where that pads as much as one
    power-of-2 block (D a power of 2, or 112 = 64 + 64). D = 80: (64, 16); 40: (32, 16); 96: (64, 32)."""
    lo = max(16, next_power_of_2(head_dim + 1) // 2)
    if lo >= head_dim:
        return None
    hi = max(16, next_power_of_2(head_dim - lo))
    return (lo, hi) if lo + hi < next_power_of_2(head_dim) else None


def _split_operands(cfg: TileConfig, parts: tuple[int, int], *tensors_and_rows) -> tuple[tuple, tuple, bool]:
    """:func:`_operands` for the split-head-dim kernels: each tensor twice, as descriptors of its first ``parts[0]``
    and its next ``parts[1]`` columns (blocks [1, 1, rows, part]) for a ``+tma`` config that :func:`tma_usable`
    allows, else as itself (the second never read); and whether they are descriptors."""
    tensors = tuple(t for t, _ in tensors_and_rows)
    if not (cfg.tma and tma_usable(*tensors)):
        return tensors, tensors, False
    return tuple(tuple(tensor_descriptor(t, [1, 1, rows, part]) for t, rows in tensors_and_rows)
                 for part in parts) + (True,)


def _split_args(head_dim: int, parts: tuple[int, int], shapes: dict) -> dict:
    """The head-dim constexprs of the split-head-dim kernels."""
    return dict(head_dim=head_dim, BLOCK_LO=parts[0], BLOCK_HI=parts[1], EVEN_HI=sum(parts) == head_dim,
                DOT_PRECISION=shapes["DOT_PRECISION"])


def query_tiles(seq_len: int, cfg: TileConfig) -> tuple[int, int, int]:
    """(query tiles, tail tiles among them, TAIL_M) of a query-tiled launch: whole ``block_m`` tiles, then, where
    the config has tail tiles and N leaves rows past the last whole tile, ``tail_m``-row tiles for those rows
    (TAIL_M = tail_m); else one more ``block_m`` tile for them (TAIL_M = 0)."""
    whole, rest = divmod(seq_len, cfg.block_m)
    if not (cfg.tail_m and rest):
        return cdiv(seq_len, cfg.block_m), 0, 0
    tails = cdiv(rest, cfg.tail_m)
    return whole + tails, tails, cfg.tail_m


def _operands(cfg: TileConfig, shapes: dict, *tensors_and_rows) -> tuple[tuple, bool]:
    """The kernel's [B, H, N, D] operands, given as (tensor, rows per tile) pairs: the tensors themselves, or TMA
    descriptors over them (blocks [1, 1, rows, BLOCK_D]) for a ``+tma`` config that :func:`tma_usable` allows;
    and whether they are descriptors."""
    tensors = tuple(t for t, _ in tensors_and_rows)
    if not (cfg.tma and tma_usable(*tensors)):
        return tensors, False
    return tuple(tensor_descriptor(t, [1, 1, rows, shapes["BLOCK_D"]]) for t, rows in tensors_and_rows), True


def backward_row_dot(grad_out, out):
    """delta = rowsum(dO * O), [B, H, N] fp32: the first step of every backward."""
    batch, heads, seq_len, head_dim = out.shape
    shapes = shape_args(head_dim, out.dtype)
    delta = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=out.device)
    num_row_tiles = cdiv(seq_len, ROW_DOT_BLOCK)
    launch(_bwd_row_dot, (batch * heads * num_row_tiles,), (out, grad_out, delta), (
        *_strides(out), *_strides(grad_out), heads, seq_len, num_row_tiles,
    ), dict(head_dim=shapes["head_dim"], EVEN_D=shapes["EVEN_D"], BLOCK_M=ROW_DOT_BLOCK, BLOCK_D=shapes["BLOCK_D"]),
        num_warps=ROW_DOT_WARPS, num_stages=ROW_DOT_STAGES)
    return delta


def backward_dkdv(grad_out, q, k, v, lse, delta, prefix, scale: float, cfg: TileConfig, dq_accumulator=None,
                  dk=None, dv=None, ds=None, key_centre: bool = False):
    """dk, dv ([B, H, N, D] stored [B, N, H, D], or written into the given ``dk``, ``dv``: any [B, H, N, D] views
    with a unit last stride); with ``dq_accumulator`` (fp32 [B, H, N, D], zeroed) the same launch also adds dQ
    into it, atomically; with ``ds`` (:func:`stored_ds_buffer`) it also stores dS^T there for
    :func:`backward_dq_from_ds` (through tensor descriptors where the tile is ``+tma`` and TMA can take it; the pairs
    nobody sees are left as they were). ``key_centre``: the atomic dQ less the keys' shared part's share of it
    (:func:`backward`)."""
    batch, heads, seq_len, head_dim = q.shape
    if ds is not None and (dq_accumulator is not None or (cfg.split_d and head_dim_split(head_dim))):
        raise ValueError("the dK/dV kernel stores dS only without the atomic dQ and without a split head dim")
    stride_dsn = 0 if ds is None else _ds_row_stride(ds, q)
    prefix_ptr, prefix_int, prefix_is_tensor = _prefix_args(prefix, q)
    dk = _empty_bnhd(k) if dk is None else dk
    dv = _empty_bnhd(v) if dv is None else dv
    atomic = dq_accumulator is not None
    dq_acc = dq_accumulator if atomic else dk  # never written without DQ_ATOMIC
    num_n_tiles = cdiv(seq_len, cfg.block_n)
    shapes = shape_args(head_dim, q.dtype)
    parts = head_dim_split(head_dim) if cfg.split_d and not atomic else None
    if parts:
        lo, hi, use_tma = _split_operands(cfg, parts, (q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n),
                                          (grad_out, cfg.block_m), (dk, cfg.block_n), (dv, cfg.block_n))
        launch(_prefix_causal_bwd_dkdv_split_d, (batch * heads * num_n_tiles,), (*lo, *hi, lse, delta, prefix_ptr), (
            prefix_int, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            heads, seq_len, scale, scale * LOG2_E, num_n_tiles,
        ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **_split_args(head_dim, parts, shapes), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, USE_TMA=use_tma), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dk, dv
    # the atomic dQ through TMA is added a block_m tile at a time: no tail tiles there
    tail_m = 0 if atomic else query_tiles(seq_len, cfg)[2]
    operands = [(q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n), (grad_out, cfg.block_m), (dk, cfg.block_n),
                (dv, cfg.block_n)]
    if atomic:  # through TMA, dQ is added a tile at a time (bulk reduce-add)
        operands.append((dq_acc, cfg.block_m))
    if tail_m:
        operands += [(q, tail_m), (grad_out, tail_m)]
    (q_, k_, v_, do_, dk_, dv_, *rest), use_tma = _operands(cfg, shapes, *operands)
    dq_acc_ = rest.pop(0) if atomic else dq_acc
    tails = rest or (q_, do_)  # never read without TAIL_M
    store_ds = 0 if ds is None else 2 if use_tma and tma_usable(ds) else 1
    ds_ = tensor_descriptor(ds, [1, 1, cfg.block_n, cfg.block_m]) if store_ds == 2 else dk if ds is None else ds
    # the tail tiles' dS blocks (never read without TAIL_M and STORE_DS 2)
    ds_tail = tensor_descriptor(ds, [1, 1, cfg.block_n, tail_m]) if store_ds == 2 and tail_m else ds_
    launch(_prefix_causal_bwd_dkdv, (batch * heads * num_n_tiles,), (
        q_, k_, v_, do_, lse, delta, dk_, dv_, dq_acc_, ds_, prefix_ptr, *tails, ds_tail, k,
    ), (
        prefix_int, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        *_strides(dq_acc), stride_dsn, heads, seq_len, scale, scale * LOG2_E, num_n_tiles,
    ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **shapes, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            DQ_ATOMIC=atomic, USE_TMA=use_tma, TAIL_M=tail_m, STORE_DS=store_ds, KEY_CENTRE=key_centre and atomic),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dk, dv


def _ds_row_stride(ds: torch.Tensor, q: torch.Tensor) -> int:
    """The row stride of a dS buffer laid out as :func:`stored_ds_buffer` lays it out (else ValueError)."""
    batch, heads, seq_len, _ = q.shape
    row = ds.stride(2)
    if (ds.shape != (batch, heads, seq_len, seq_len) or ds.dtype != q.dtype or ds.stride(3) != 1 or row < seq_len
            or ds.stride(1) != seq_len * row or ds.stride(0) != heads * seq_len * row or seq_len * row >= 2**31):
        raise ValueError(f"ds must be a [B, H, N, N] = {[batch, heads, seq_len, seq_len]} buffer in q's dtype with "
                         f"rows of unit stride and no gaps but row padding, under 2^31 values a head "
                         f"(stored_ds_buffer); got shape {list(ds.shape)}, {ds.dtype}, strides {ds.stride()}")
    return row


def backward_dq_from_ds(q, k, ds, prefix, scale: float, cfg: TileConfig, dq=None, key_centre: bool = False):
    """dq from the dS^T that :func:`backward_dkdv` stored into ``ds`` (:func:`stored_ds_buffer`): one matmul per tile
    pair. The tile's block_m, block_n, warps and stages are used, through TMA descriptors for a ``+tma`` tile where
    TMA takes them (no tail tiles, no split head dim). ``key_centre``: see :func:`backward`."""
    batch, heads, seq_len, head_dim = q.shape
    stride_dsn = _ds_row_stride(ds, q)
    prefix_ptr, prefix_int, prefix_is_tensor = _prefix_args(prefix, q)
    dq = _empty_bnhd(q) if dq is None else dq
    shapes = shape_args(head_dim, q.dtype)
    num_m_tiles = cdiv(seq_len, cfg.block_m)
    (k_, dq_), use_tma = _operands(cfg, shapes, (k, cfg.block_n), (dq, cfg.block_m))
    use_tma = use_tma and tma_usable(ds)
    if use_tma:
        ds_ = tensor_descriptor(ds, [1, 1, cfg.block_n, cfg.block_m])
    else:
        k_, ds_, dq_ = k, ds, dq
    launch(_prefix_causal_bwd_dq_from_ds, (batch * heads * num_m_tiles,), (k_, ds_, dq_, prefix_ptr, k), (
        prefix_int, *_strides(k), *_strides(dq), stride_dsn, heads, seq_len, scale, num_m_tiles,
    ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **shapes, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            USE_TMA=use_tma, KEY_CENTRE=key_centre), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq


# The backward with dS stored: the dK/dV kernel writes dS (one [N, N] buffer per head, in q's dtype), and dQ takes
# one matmul per tile pair from it instead of recomputing the scores and dP (three). For short sequences, where the
# buffer is small: AIM-600M's B64 x H12 x 256^2 bf16 is 100 MB. Used up to STORED_DS_MAX_BYTES of buffer where the
# measured table gives it tiles (the tuner picked it: faster there), or everywhere with STORED_DS = True
# (MIMKERNELS_STORED_DS=1; bench_attention's mimkernels_stored_ds), nowhere with STORED_DS = False
# (MIMKERNELS_STORED_DS=0). None (unset): the table decides.
STORED_DS = env_flag("MIMKERNELS_STORED_DS", None)
STORED_DS_MAX_BYTES = 1 << 30
# dQ from dS where the table has no tile for it: its own tile (one matmul per tile pair needs fewer registers than
# the recomputing dQ kernel's tiles, which spill here: 128x32x4x3 by 124 bytes at D 128 under Triton 3.9); no
# spills at D 128 on sm_90
STORED_DS_DQ_TILE = TileConfig(64, 64, 4, 3)


def _ds_row_length(seq_len: int) -> int:
    # rows of the dS buffer padded to 16 values: TMA needs 16-byte strides (N = 197, 257, 50, 65 would else store
    # through pointers, an address per element), and Triton specialises strides that are multiples of 16
    return cdiv(seq_len, 16) * 16


def stored_ds_fits(batch: int, heads: int, seq_len: int, element_size: int) -> bool:
    """Whether the stored-dS backward's buffer ([B, H, N, N] values of ``element_size`` bytes, rows padded) is within
    STORED_DS_MAX_BYTES (and its int32 offsets within a head)."""
    row = _ds_row_length(seq_len)
    return batch * heads * seq_len * row * element_size <= STORED_DS_MAX_BYTES and seq_len * row < 2**31


def stored_ds_buffer(q: torch.Tensor) -> torch.Tensor:
    """The stored-dS backward's buffer for ``q`` ([B, H, N, D]): [B, H, N, N] in q's dtype, uninitialised, each row
    padded to 16 values (a view of the first N)."""
    batch, heads, seq_len, _ = q.shape
    return torch.empty(batch, heads, seq_len, _ds_row_length(seq_len), dtype=q.dtype, device=q.device)[..., :seq_len]


def _buffer_if_free(allocate, q: torch.Tensor, path: str) -> torch.Tensor | None:
    """``allocate(q)``, or None where the GPU has no memory left for it: the stored-dS and per-head backwards only
    trade memory for speed, so a backward that fits without their buffers runs the other kernels instead of failing
    (with a warning, which Python's default filter shows once per path and shape)."""
    try:
        return allocate(q)
    except torch.OutOfMemoryError:
        warnings.warn(f"mimkernels: no GPU memory left for the {path}'s buffer (q {list(q.shape)}); this call and "
                      "others that find none run the other backward kernels instead", RuntimeWarning, stacklevel=3)
        return None


def stored_ds_tiles(q: torch.Tensor, cfgs: AttentionConfigs) -> tuple[TileConfig, TileConfig] | None:
    """The (dK/dV, dQ-from-dS) tiles with which :func:`backward` takes the stored-dS path for ``q``, or None where
    it does not: the table's stored-dS tiles where it has them, else with ``STORED_DS = True`` the dK/dV tile and
    STORED_DS_DQ_TILE; never with ``STORED_DS = False``, past STORED_DS_MAX_BYTES of buffer, or with a dK/dV tile
    that splits the head dim (that kernel stores no dS)."""
    if STORED_DS is False:
        return None
    if cfgs.backward_dkdv_ds is not None and cfgs.backward_dq_from_ds is not None:
        tiles = cfgs.backward_dkdv_ds, cfgs.backward_dq_from_ds
    elif STORED_DS:
        tiles = cfgs.backward_dkdv, STORED_DS_DQ_TILE
    else:
        return None
    batch, heads, seq_len, head_dim = q.shape
    fits = stored_ds_fits(batch, heads, seq_len, q.element_size())
    return tiles if fits and not (tiles[0].split_d and head_dim_split(head_dim)) else None


def backward_dq(grad_out, q, k, v, lse, delta, prefix, scale: float, cfg: TileConfig, out=None, dq=None,
                key_centre: bool = False):
    """dq ([B, H, N, D] stored [B, N, H, D], or written into the given ``dq``), one program per query tile:
    deterministic.

    With ``out`` (the forward's output) the kernel computes delta itself and writes it into ``delta``
    (fp32 [B, H, N], uninitialised) for the dK/dV kernel: no row-dot pre-pass. ``key_centre``: see
    :func:`backward`.
    """
    batch, heads, seq_len, head_dim = q.shape
    prefix_ptr, prefix_int, prefix_is_tensor = _prefix_args(prefix, q)
    dq = _empty_bnhd(q) if dq is None else dq
    delta_here = out is not None
    out = out if delta_here else grad_out  # never read without DELTA_HERE
    shapes = shape_args(head_dim, q.dtype)
    parts = head_dim_split(head_dim) if cfg.split_d else None
    if parts:
        num_m_tiles = cdiv(seq_len, cfg.block_m)
        lo, hi, use_tma = _split_operands(cfg, parts, (q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n),
                                          (grad_out, cfg.block_m), (dq, cfg.block_m))
        launch(_prefix_causal_bwd_dq_split_d, (batch * heads * num_m_tiles,), (
            *lo, *hi, out, lse, delta, prefix_ptr, k,
        ), (
            prefix_int, *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(dq),
            heads, seq_len, scale, scale * LOG2_E, num_m_tiles,
        ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **_split_args(head_dim, parts, shapes), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, DELTA_HERE=delta_here, USE_TMA=use_tma, KEY_CENTRE=key_centre),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dq
    num_m_tiles, num_tail_tiles, tail_m = query_tiles(seq_len, cfg)
    tail_operands = ((q, tail_m), (grad_out, tail_m), (dq, tail_m)) if tail_m else ()
    (q_, k_, v_, do_, dq_, *tails), use_tma = _operands(cfg, shapes, (q, cfg.block_m), (k, cfg.block_n),
                                                        (v, cfg.block_n), (grad_out, cfg.block_m), (dq, cfg.block_m),
                                                        *tail_operands)
    tails = tails or (q_, do_, dq_)  # never read without TAIL_M
    launch(_prefix_causal_bwd_dq, (batch * heads * num_m_tiles,), (
        q_, k_, v_, out, do_, lse, delta, dq_, prefix_ptr, *tails, k,
    ), (
        prefix_int, *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(dq),
        heads, seq_len, scale, scale * LOG2_E, num_m_tiles, num_tail_tiles,
    ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **shapes, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            DELTA_HERE=delta_here, USE_TMA=use_tma, TAIL_M=tail_m, KEY_CENTRE=key_centre), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return dq


def backward_atomic(grad_out, q, k, v, lse, delta, prefix, scale: float, cfg: TileConfig, grads=(None,) * 3,
                    key_centre: bool = False):
    """dq, dk, dv from one launch (5 matmuls per tile pair instead of 7); dQ is summed with fp32 atomics, whose
    order varies from run to run, so dq is not bit-reproducible."""
    batch, heads, seq_len, head_dim = q.shape
    dq, dk, dv = grads
    dq_acc = torch.zeros(batch, seq_len, heads, head_dim, dtype=torch.float32, device=q.device).transpose(1, 2)
    dk, dv = backward_dkdv(grad_out, q, k, v, lse, delta, prefix, scale, cfg, dq_accumulator=dq_acc, dk=dk, dv=dv,
                           key_centre=key_centre)
    dq = _empty_bnhd(q) if dq is None else dq
    dq.copy_(dq_acc)
    return dq, dk, dv


def per_head_buffer(q: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """The per-head backward's fp32 dQ buffer for ``q`` ([B, H, N, D]) and its tile: [B * H, N, D], uninitialised;
    one element where a head has one key tile (e.g. the MAE encoder: dQ is stored finished, the buffer never
    touched, so no B * H * N * D * 4 bytes)."""
    batch, heads, seq_len, head_dim = q.shape
    shape = (batch * heads, seq_len, head_dim) if seq_len > cfg.block_n else (1,)
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def backward_per_head(grad_out, q, k, v, out, lse, prefix, scale: float, cfg: TileConfig, grads=(None,) * 3,
                      dq_buffer=None, key_centre: bool = False):
    """dq, dk, dv from one launch, one program per (batch, head): delta, then dK/dV per key tile in order with
    each tile's dQ share added to an fp32 buffer in that order (5 matmuls per tile pair, bit-identical run after
    run). Its parallelism is B * H programs, so it suits short sequences and large batches. ``dq_buffer``: the
    :func:`per_head_buffer` to use (else one is allocated). ``key_centre``: see :func:`backward`."""
    batch, heads, seq_len, head_dim = q.shape
    prefix_ptr, prefix_int, prefix_is_tensor = _prefix_args(prefix, q)
    dq, dk, dv = (_empty_bnhd(t) if g is None else g for t, g in zip((q, k, v), grads))
    delta = torch.empty_like(lse)
    dq_acc = per_head_buffer(q, cfg) if dq_buffer is None else dq_buffer
    shapes = shape_args(head_dim, q.dtype)
    (q_, k_, v_, do_, dk_, dv_), use_tma = _operands(cfg, shapes, (q, cfg.block_m), (k, cfg.block_n),
                                                     (v, cfg.block_n), (grad_out, cfg.block_m), (dk, cfg.block_n),
                                                     (dv, cfg.block_n))
    launch(_prefix_causal_bwd_per_head, (batch * heads,), (
        q_, k_, v_, out, do_, lse, delta, dq, dk_, dv_, dq_acc, prefix_ptr, k,
    ), (
        prefix_int, *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(dq),
        *_strides(dk), *_strides(dv), heads, seq_len, scale, scale * LOG2_E,
    ), dict(PREFIX_IS_TENSOR=prefix_is_tensor, **shapes, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=use_tma,
            KEY_CENTRE=key_centre), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


def backward(grad_out, q, k, v, out, lse, prefix, scale: float, configs: AttentionConfigs | None = None,
             atomic_dq: bool = False, grads=(None,) * 3, key_centre: bool = False):
    """dq, dk, dv, each [B, H, N, D] stored [B, N, H, D], or written into ``grads`` = (dq, dk, dv) where given
    ([B, H, N, D] views with a unit last stride, e.g. of one packed [B, N, 3, H, D] gradient).

    Default: a row-dot pre-pass, then dK/dV and dQ in two launches, no atomics, so bit-identical run after run;
    where ``configs.backward_dq_delta`` is set, the dQ kernel computes delta itself and runs first (no pre-pass);
    where ``configs.backward_per_head`` is set, one launch does it all (:func:`backward_per_head`), as
    reproducible. Before any of these, where :func:`stored_ds_tiles` gives tiles (the table's choice, or
    ``STORED_DS``): dK/dV stores dS and dQ is one matmul per tile pair from it (:func:`backward_dq_from_ds`), as
    reproducible. ``atomic_dq=True``: one launch that adds dQ with fp32 atomics (tile ``configs.backward_atomic``,
    else ``backward_dkdv``).

    ``key_centre=True``: every dQ path computes dS K as dS~ K - rowsum(dS~) c, with dS~ the 16-bit dS its matmul
    takes and c the mean of the head's first KEY_CENTRE_ROWS keys (:func:`_key_centre`): the same dQ in exact
    arithmetic, without the error that a part shared by all keys brings through dS~'s rounding. No pre-pass and no
    copy of K; dK and dV are unchanged.
    """
    cfgs = configs or configs_for_call(q)
    dq, dk, dv = grads
    stored_ds = None if atomic_dq else stored_ds_tiles(q, cfgs)
    ds = _buffer_if_free(stored_ds_buffer, q, "stored-dS backward") if stored_ds else None
    if ds is not None:  # row dot, dK/dV storing dS, dQ from dS: 3 launches
        delta = backward_row_dot(grad_out, out)
        dk, dv = backward_dkdv(grad_out, q, k, v, lse, delta, prefix, scale, stored_ds[0], dk=dk, dv=dv, ds=ds)
        return backward_dq_from_ds(q, k, ds, prefix, scale, stored_ds[1], dq=dq, key_centre=key_centre), dk, dv
    per_head = None if atomic_dq else cfgs.backward_per_head
    dq_buffer = _buffer_if_free(lambda q: per_head_buffer(q, per_head), q, "per-head backward") if per_head else None
    if dq_buffer is not None:
        return backward_per_head(grad_out, q, k, v, out, lse, prefix, scale, per_head, grads, dq_buffer=dq_buffer,
                                 key_centre=key_centre)
    if cfgs.backward_dq_delta is not None and not atomic_dq:  # dQ first, computing delta for dK/dV: 2 launches
        delta = torch.empty_like(lse)
        dq = backward_dq(grad_out, q, k, v, lse, delta, prefix, scale, cfgs.backward_dq_delta, out=out, dq=dq,
                         key_centre=key_centre)
        dk, dv = backward_dkdv(grad_out, q, k, v, lse, delta, prefix, scale, cfgs.backward_dkdv, dk=dk, dv=dv)
        return dq, dk, dv
    delta = backward_row_dot(grad_out, out)
    if atomic_dq:
        return backward_atomic(grad_out, q, k, v, lse, delta, prefix, scale, cfgs.backward_atomic or cfgs.backward_dkdv,
                               grads, key_centre=key_centre)
    dk, dv = backward_dkdv(grad_out, q, k, v, lse, delta, prefix, scale, cfgs.backward_dkdv, dk=dk, dv=dv)
    dq = backward_dq(grad_out, q, k, v, lse, delta, prefix, scale, cfgs.backward_dq, dq=dq, key_centre=key_centre)
    return dq, dk, dv


def atomic_dq_measured_faster(q: torch.Tensor) -> bool:
    """Whether the measured table says the atomic-dQ backward beats the two-launch one for calls like ``q``."""
    return configs_for_call(q).backward_atomic is not None
