# Sourced by the gpu_*.sh scripts: the run's provenance (commit, date, GPU, driver, clocks, torch / Triton / CUDA),
# printed and written to $OUT/env.txt. Needs OUT and PY set.
{
  echo "commit: ${MIMKERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# Triton's compile cache for this GPU made on a machine without one (benchmarks/triton_cache.py), where the device
# call carried it (carry: benchmarks/.triton-cache; CARRIED_CACHE names another folder): its kernels are loaded
# instead of compiled where their keys match
for archive in "${CARRIED_CACHE:-benchmarks/.triton-cache}"/*.tar.xz; do
  [ -f "$archive" ] && $PY -m benchmarks.triton_cache unpack "$archive" 2>&1 | tee -a "$OUT/env.txt"
done
