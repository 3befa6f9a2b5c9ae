#!/usr/bin/env bash
# One-shot check on a lent GPU: extension build, environment, GPU tests, compute-sanitizer memcheck, quick benchmarks
# (kernels, then model training steps). Every step has its own timeout; the default four add up to 14.5 minutes, more
# than one device call's 10: give the call timeout_s=600 and expect the model benchmarks to be cut if every step runs long.
# (The kernel resource report needs no GPU: python -m benchmarks.kernel_report.)
# STEPS picks steps, in this order whatever is named: build tests sanitizer bench mim_ops models steps integrations
# (default: the first four; `mim_ops` is bench_tokens and bench_patch_embed alone, about 3 minutes; `steps` is the
# last part of `models` alone: bench_models at MODEL_SHAPES within STEPS_S seconds).
# The correctness half alone, about 5 minutes: STEPS="build tests sanitizer" benchmarks/gpu_check.sh
# The training-step questions (issue 11), about 8.5 minutes: STEPS=models benchmarks/gpu_check.sh (the fused add +
# LayerNorm alone, the MLP with GELU inside its GEMMs alone with a sweep of its tiles, then MAE ViT-L and AIM-600M
# steps eager and compiled with MFU, the packed-qkv, fused-norm and fused-MLP A/B providers, and a per-category GPU
# profile of each step in train_step_profile.txt)
# Writes under $OUT (default benchmarks/results/local); commit what it measured, raw, under benchmarks/results/.
# Where the tree has no .git (the device copy), pass the commit: MIMKERNELS_COMMIT=<sha> benchmarks/gpu_check.sh
# Uses the machine's own python3 (its torch and triton): nothing is installed, nothing is fetched.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
status=0
mlp_tile=${MLP_TILE:-}  # the fused-MLP provider's tile; the `models` step sets it from its sweep
STEPS=" ${STEPS:-build tests sanitizer bench} "
wants() { [[ "$STEPS" == *" $1 "* ]]; }

if wants build; then
echo "== build the extension (csrc/) in place"
timeout 120 $PY setup.py build_ext --inplace > "$OUT/build.txt" 2>&1 || { status=1; tail -n 20 "$OUT/build.txt"; }
fi

source benchmarks/gpu_env.sh

if wants tests; then
echo "== GPU tests"
# On a fresh machine Triton compiles every kernel first: run 9's cold suite was cut at 39% after 240 s, the warm one
# took 192 s. pytest-xdist workers (in the machine's image) compile in parallel on its cores and share the GPU; by
# file (loadfile), so the big-tensor tests of one file never hold GPU memory at once. GPU_TEST_WORKERS=0: one process.
workers=${GPU_TEST_WORKERS:-6}
xdist=$([ "$workers" != 0 ] && $PY -c "import xdist" 2> /dev/null && echo "-n $workers --dist loadfile")
echo "pytest-xdist: ${xdist:-not used}"
timeout 420 $PY -m pytest -q -m gpu $xdist -p no:cacheprovider tests > "$OUT/pytest_gpu.txt" 2>&1 || status=1
tail -n 15 "$OUT/pytest_gpu.txt"
fi

if wants sanitizer; then
echo "== compute-sanitizer memcheck over every kernel (benchmarks/sanitizer_cases.py)"
# no caching allocator: every tensor its own allocation, so an access past its end is outside any allocation
# SANITIZER_CASES: groups of benchmarks/sanitizer_cases.py (default all), e.g. the ones a cut run did not reach.
# Run 10 (2026-12-04) ran out of 90 s with the Triton cache cold: one pass without the sanitizer compiles every
# kernel first, so memcheck's time goes to running them.
sanitizer_s=${SANITIZER_S:-150}
if command -v compute-sanitizer > /dev/null; then
  timeout 60 $PY -m benchmarks.sanitizer_cases ${SANITIZER_CASES:-} > "$OUT/sanitizer_warm.txt" 2>&1 \
    || echo "(the pass that fills the compile cache failed or ran out of 60 s: see sanitizer_warm.txt)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$sanitizer_s" compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m benchmarks.sanitizer_cases ${SANITIZER_CASES:-} > "$OUT/sanitizer.txt" 2>&1
  case $? in
    0) verdict="clean: no memory errors" ;;
    9) verdict="MEMORY ERRORS (see sanitizer.txt)"; status=1 ;;
    124) verdict="timed out after ${sanitizer_s} s: incomplete (the groups after the last 'ran' line were not reached)" ;;
    *) verdict="could not run here (see sanitizer.txt; gVisor machines refuse the device)" ;;
  esac
else
  verdict="compute-sanitizer not on PATH"
fi
echo "compute-sanitizer memcheck: $verdict" | tee -a "$OUT/sanitizer.txt"
fi

if wants bench; then
echo "== quick benchmarks"
# four shapes (AIM, long N, MAE encoder, D = 80): all nine and the tile sweep are benchmarks/gpu_attention.sh's job
timeout 130 $PY -m benchmarks.bench_attention --quick --no-plot --shapes aim_600m n4096 mae_encoder vit_h_n257 \
  --out "$OUT" > "$OUT/bench_attention.txt" 2>&1 || status=1
tail -n 25 "$OUT/bench_attention.txt"
fi

if wants bench || wants mim_ops; then
# issue 11's MIM ops (token drop / restore, patch embedding, masked loss) per call and on GPU time, with the issue's
# targets printed last; "mimkernels" is the compiled extension where `build` ran before (this call or an earlier one)
echo "== MIM ops: tokens, patch embedding, loss (per call and GPU time)"
timeout 80 $PY -m benchmarks.bench_tokens --quick --out "$OUT" > "$OUT/bench_tokens.txt" 2>&1 || status=1
timeout 100 $PY -m benchmarks.bench_patch_embed --quick --out "$OUT" > "$OUT/bench_patch_embed.txt" 2>&1 || status=1
tail -n 12 "$OUT/bench_tokens.txt"
tail -n 16 "$OUT/bench_patch_embed.txt"
fi

if wants bench; then
timeout 110 $PY -m benchmarks.bench_models --quick --shapes mae_vit_l aim_600m --out "$OUT" > "$OUT/bench_models.txt" 2>&1 \
  || status=1
tail -n 8 "$OUT/bench_models.txt"
fi

if wants models; then
echo "== training steps: fused norm, fused MLP (with its tile sweep), then eager + compiled steps with a profile"
timeout 60 $PY -m benchmarks.bench_norms --quick --out "$OUT" > "$OUT/bench_norms.txt" 2>&1 || status=1
timeout 150 $PY -m benchmarks.bench_mlp --quick --sweep --out "$OUT" > "$OUT/bench_mlp.txt" 2>&1 || status=1
# the fused-MLP provider runs the sweep's best tile at AIM-600M's MLP shape (the shipped one if the sweep found none)
mlp_tile=$(sed -n 's/^  best tile aim_600m: \([0-9][^ ]*\) .*/\1/p' "$OUT/bench_mlp.txt" | head -n 1)
tail -n 20 "$OUT/bench_norms.txt"
tail -n 20 "$OUT/bench_mlp.txt"
fi

if wants models || wants steps; then
# the training steps alone (step `steps`): MODEL_SHAPES (default both) eager and compiled, with a profile. Each
# shape takes about 5 minutes (run 10: the compiles come first, then each provider's timing and profile)
echo "== training steps, eager and compiled, with a profile: ${MODEL_SHAPES:-mae_vit_l aim_600m}"
timeout "${STEPS_S:-330}" $PY -m benchmarks.bench_models --quick --compile --profile \
  --shapes ${MODEL_SHAPES:-mae_vit_l aim_600m} --out "$OUT" ${mlp_tile:+--mlp-tile "$mlp_tile"} \
  > "$OUT/bench_models.txt" 2>&1 || status=1
tail -n 30 "$OUT/bench_models.txt"
fi

if wants integrations; then
echo "== timm / Hugging Face training steps, patched and not, eager and compiled"
timeout "${INTEGRATIONS_S:-380}" $PY -m benchmarks.bench_integrations --quick --compile \
  --shapes ${INTEGRATION_SHAPES:-timm_vit_b16 hf_vit_mae_base} --out "$OUT" > "$OUT/bench_integrations.txt" 2>&1 \
  || status=1
tail -n 16 "$OUT/bench_integrations.txt"
fi
exit $status
