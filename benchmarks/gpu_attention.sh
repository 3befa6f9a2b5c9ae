#!/usr/bin/env bash
# Attention on a lent GPU in one call (about 8 minutes): tune the tile table, profile and benchmark against the
# baselines with the new table, then the attention GPU tests. STEPS picks steps, in this order whatever is named:
# tune profile bench tests (default: all; without tune the committed table runs, e.g. when the kernels have not
# changed since its sweep). Raw outputs under $OUT (default benchmarks/results/local; at most 8 files, the device
# tool's limit). Commit them under benchmarks/results/<device>/ and the table with
# `python -m benchmarks.tune_attention --from-csv <them>/tune_attention.csv --write-table`.
# TUNE_SHAPES (default: all of tune_attention's) tunes only those shapes, e.g. after a change that only some use;
# the table keeps the other entries. TUNE_SWEEP (kernel names) sweeps only those kernels' candidates and times the
# others at the table's tiles (tune_attention --sweep), e.g. the stored-dS backward at shapes tuned before it.
# Where the tree has no .git (the device copy), pass the commit: MIMKERNELS_COMMIT=<sha> benchmarks/gpu_attention.sh
# Uses the machine's own python3 (its torch and triton): nothing is installed, nothing is fetched.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
PY=${PYTHON:-python3}
TUNE_S=${TUNE_S:-200}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
STEPS=" ${STEPS:-tune profile bench tests} "
wants() { [[ "$STEPS" == *" $1 "* ]]; }
source benchmarks/gpu_env.sh

if wants tune; then
  echo "== tune the attention tile table (budget ${TUNE_S} s)"
  timeout $((TUNE_S + 90)) $PY -m benchmarks.tune_attention --budget-s "$TUNE_S" --out "$OUT" --write-table \
    ${TUNE_SHAPES:+--shapes $TUNE_SHAPES} ${TUNE_SWEEP:+--sweep $TUNE_SWEEP} \
    > "$OUT/tune_attention.txt" 2>&1 || status=1
  tail -n 12 "$OUT/tune_attention.txt"  # the table it wrote can be rebuilt from tune_attention.csv (--from-csv)
fi

if wants profile; then
  echo "== GPU time per kernel and host time per call, with the table"
  timeout ${PROFILE_S:-45} $PY -m benchmarks.profile_attention --shapes aim_600m mae_encoder \
    --providers mimkernels mimkernels_centred_keys mimkernels_centred_dq sdpa_dense_mask sdpa > "$OUT/profile_attention.txt" 2>&1 || status=1
  # where our host time per call goes (our Python, Triton's launcher, its TMA descriptor encodes): cProfile, seconds
  timeout ${PROFILE_HOST_S:-30} $PY -m benchmarks.profile_attention --host --shapes aim_600m mae_encoder \
    >> "$OUT/profile_attention.txt" 2>&1 || status=1
  grep "==" "$OUT/profile_attention.txt"
fi

if wants bench; then
  echo "== benchmark with the table (fwd_bwd per call, fwd_bwd_graph as GPU time)"
  timeout ${BENCH_S:-210} $PY -m benchmarks.bench_attention --quick --no-plot --out "$OUT" \
    > "$OUT/bench_attention.txt" 2>&1 || status=1
  grep -E "^(==|[a-z_0-9]+ +(fwd|bwd|fwd_bwd|peak)|memory)" "$OUT/bench_attention.txt" | tail -n 90
  # dQ's bf16 error with keys that share a large part, per CENTRE_KEYS mode (seconds; the CPU cannot run bf16 dots)
  timeout ${SHARED_KEY_S:-40} $PY -m benchmarks.shared_key_error --dtype bf16 --shape 8 12 256 128 \
    > "$OUT/shared_key_error.txt" 2>&1 || status=1
  cat "$OUT/shared_key_error.txt"
fi

if wants tests; then
  echo "== attention GPU tests"
  timeout ${TEST_S:-150} $PY -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py tests/test_compile.py \
    > "$OUT/pytest_attention_gpu.txt" 2>&1 || status=1
  tail -n 8 "$OUT/pytest_attention_gpu.txt"
fi
exit $status
