"""The shipped Triton configs compile for sm_90 without spilling registers (no GPU needed).

Runs ``python -m benchmarks.kernel_report --quick`` in a subprocess: the compiler, not the interpreter, must
see the kernels, and this session's TRITON_INTERPRET=1 has already replaced them.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_default_configs_do_not_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--quick"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "0 spill" in run.stdout
    assert run.stdout.count("_prefix_causal_fwd") == 9  # 3 head-dim classes x 3 dtypes were compiled
    for kernel in ("_patch_embed_fwd", "_patch_embed_weight_grad", "_masked_patch_loss_bwd", "_restore_rows"):
        assert run.stdout.count(kernel) == 3, kernel
