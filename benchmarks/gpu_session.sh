#!/usr/bin/env bash
# A lent GPU's whole session in one command: the prepared checks, most important first, inside a time budget.
#
#   BUDGET_S=560 STEPS="attention tests sanitizer models" MIMKERNELS_COMMIT=<sha> bash benchmarks/gpu_session.sh
#
# A session has 15 minutes of device time, machine start included, and one call at most 10; the checks below
# take about 19 minutes together. So each step gets what it needs or what the budget has left, whichever is less,
# and a step that would get under MIN_STEP_S (default 60) is skipped, not half run: a second call can take it
# (STEPS=<the skipped ones> BUDGET_S=<what is left>). Steps, run in the order STEPS names them:
#   attention     issue 9: per-kernel GPU time and host time, then bench_attention (gpu_attention.sh "profile bench"), ~5 min
#   tests         issue 10: the extension built, every `gpu` test (gpu_check.sh "build tests"; 6 pytest-xdist
#                 workers since run 10, so that cold compiles run in parallel), ~9 min cold in one process
#   sanitizer     issue 10: compute-sanitizer memcheck over every kernel (gpu_check.sh): a pass that compiles them,
#                 then memcheck; over 90 s with a cold cache in run 10, 3.5 min allowed
#   models        issue 11: bench_norms, bench_mlp --sweep, bench_models eager + compiled with a profile
#                 (gpu_check.sh), ~9 min
#   steps_mae     issue 11: bench_models alone at MAE ViT-L, eager + compiled + the A/B switches, with a profile
#   steps_aim     the same at AIM-600M (`models` without its kernel benchmarks, one shape per step: run 10's
#                 `models` spent its 316 s on those and the first three providers of MAE ViT-L), ~5.5 min each
#   steps_mae_b64 the same at MAE ViT-L with the official recipe's 64 images per GPU: whether a step that does a
#                 quarter of the GPU work for the same host work waits for its host (the profile's kernel share)
#   mim_ops       issue 11: token ops, patch embedding and masked loss, per call and GPU time, with the targets
#                 (gpu_check.sh `mim_ops`; the extension's token ops where `tests` built it first), ~3 min
#   integrations  issue 12: bench_integrations eager + compiled (gpu_check.sh), timm ViT-B and HF ViTMAE, ~6.5 min
#   integrations_mae  the same for facebookresearch/mae's own model (timm's modules in a class of its own), ~4 min
#   tune          issue 9, after a kernel change: the tile sweep (gpu_attention.sh "tune"; TUNE_SHAPES picks shapes),
#                 225 s in run 10 for 9 shapes, 101 s in run 9 for 6;
#                 9 shapes since (N257 has a class of its own; MAE ViT-H's encoder), 5.5 min allowed
#   tune_stored_ds issue 9, after a `tune` in which the stored-dS backward won: its kernels swept at the other shapes
#                 where its buffer fits (STORED_DS_SHAPES), every other kernel timed at the table's tile only
#                 (tune_attention --sweep), so the table gives it their entries where it wins there too; ~2.5 min
# The device tool brings back at most 8 files: each step writes into its own folder, which is then packed into
# $OUT/<step>.tar.gz (after the step, so a call cut short still returns the steps before it); session.txt says
# what ran, for how long, and with which exit code. Unpack with `tar -xzf` under benchmarks/results/<device>/.
# triton_cache_compiled_here.tar.xz (where the machine compiled any Triton kernel) holds those kernels: not a result
# to commit, but a cache for the next call (copy it into benchmarks/.triton-cache/, which `carry` names).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
BUDGET_S=${BUDGET_S:-560}
MIN_STEP_S=${MIN_STEP_S:-60}
STEPS=${STEPS:-attention tests sanitizer models}
mkdir -p "$OUT"
log="$OUT/session.txt"
start=$SECONDS
status=0
echo "gpu_session: steps '$STEPS', budget ${BUDGET_S} s, commit ${MIMKERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" \
  | tee "$log"
# the compile cache made without a GPU (make triton-cache), where the call carried it: whether it fits this Triton
cache_tool() { PYTHONPATH=$PWD ${PYTHON:-python3} -m benchmarks.triton_cache "$@" 2>&1 | tee -a "$log"; }
for archive in "${CARRIED_CACHE:-benchmarks/.triton-cache}"/*.tar.xz; do
  [ -f "$archive" ] && cache_tool unpack "$archive"
done

needs() {  # step -> seconds it takes when nothing is cut (the inner scripts' own timeouts, added up)
  case $1 in
    attention) echo 300 ;; tests) echo 550 ;; sanitizer) echo 220 ;; models) echo 550 ;; integrations) echo 390 ;;
    integrations_mae) echo 240 ;;
    steps_mae | steps_mae_b64 | steps_aim) echo 330 ;; tune) echo 330 ;; tune_stored_ds) echo 180 ;; mim_ops) echo 190 ;;
    *) echo 0 ;;
  esac
}

run_step() {  # step, seconds it may take: runs it with OUT=$OUT/<step>
  local dir="$OUT/$1"
  case $1 in
    attention) OUT=$dir STEPS="profile bench" bash benchmarks/gpu_attention.sh ;;
    tune) OUT=$dir STEPS="tune" TUNE_S=$(($2 - 90)) bash benchmarks/gpu_attention.sh ;;
    tune_stored_ds) OUT=$dir STEPS="tune" TUNE_S=$(($2 - 90)) TUNE_SWEEP="backward_dkdv_ds backward_dq_from_ds" \
      TUNE_SHAPES="${STORED_DS_SHAPES:-n1024 vit_b mae_encoder mae_decoder vit_b_n257}" \
      bash benchmarks/gpu_attention.sh ;;
    tests) OUT=$dir STEPS="build tests" bash benchmarks/gpu_check.sh ;;
    sanitizer | models | integrations | mim_ops) OUT=$dir STEPS="$1" bash benchmarks/gpu_check.sh ;;
    integrations_mae) OUT=$dir STEPS=integrations INTEGRATION_SHAPES=official_mae_b16 INTEGRATIONS_S=$(($2 - 10)) \
      bash benchmarks/gpu_check.sh ;;
    steps_*) OUT=$dir STEPS=steps MODEL_SHAPES=$(model_shape "$1") STEPS_S=$(($2 - 10)) bash benchmarks/gpu_check.sh ;;
  esac
}

model_shape() {  # steps_* step -> the bench_models shape it times
  case $1 in steps_mae) echo mae_vit_l ;; steps_mae_b64) echo mae_vit_l_b64 ;; steps_aim) echo aim_600m ;; esac
}

children_of() {  # pid -> its child pids (procps' pgrep, or the kernel's list where the machine has no procps)
  if command -v pgrep > /dev/null; then pgrep -P "$1"; else cat /proc/"$1"/task/*/children 2> /dev/null; fi
}

kill_tree() {  # pid: it and every descendant (the inner scripts' own `timeout`s start process groups of their own,
  local child  # so neither `timeout` nor a group kill from here reaches their benchmarks). Top down, each stopped
  kill -STOP "$1" 2> /dev/null  # first: a script whose child just died cannot start its next command meanwhile
  for child in $(children_of "$1"); do kill_tree "$child"; done
  kill -TERM "$1" 2> /dev/null
  kill -CONT "$1" 2> /dev/null
}

for step in $STEPS; do
  need=$(needs "$step")
  if [ "$need" = 0 ]; then
    echo "== $step: unknown step (attention tests sanitizer models steps_mae steps_aim steps_mae_b64 mim_ops" \
      "integrations integrations_mae tune tune_stored_ds)" | tee -a "$log"
    status=2
    continue
  fi
  left=$((BUDGET_S - (SECONDS - start)))
  give=$((need < left ? need : left))
  if [ "$give" -lt "$MIN_STEP_S" ]; then
    echo "== $step: skipped, ${left} s of the budget left (it needs ${need} s)" | tee -a "$log"
    continue
  fi
  echo "== $step: up to ${give} s" | tee -a "$log"
  began=$SECONDS
  mkdir -p "$OUT/$step"
  run_step "$step" "$give" > "$OUT/$step/console.txt" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2> /dev/null && [ $((SECONDS - began)) -lt "$give" ]; do sleep 1; done
  if kill -0 "$pid" 2> /dev/null; then
    kill_tree "$pid"
    wait "$pid"
    code=124
  else
    wait "$pid"
    code=$?
  fi
  tail -n 40 "$OUT/$step/console.txt"
  [ "$code" = 0 ] || status=1
  tar -czf "$OUT/$step.tar.gz" -C "$OUT" "$step" && rm -rf "${OUT:?}/$step"  # without tar the folder stays
  echo "== $step: exit $code$([ "$code" = 124 ] && echo ' (cut at its time)') after $((SECONDS - began)) s" \
    | tee -a "$log"
done
# what this machine compiled all the same, by kernel name (what the carried archive lacked), and the kernels
# themselves: copied into benchmarks/.triton-cache/, the next call or session carries them too
cache_tool report --pack "$OUT/triton_cache_compiled_here.tar.xz"
echo "gpu_session: $((SECONDS - start)) s in all" | tee -a "$log"
exit $status
