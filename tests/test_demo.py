"""`make demo` (python -m mimkernels): the self-check, both training runs and the summary, shortened."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the demo times kernels and trains base-size "
                    "models: that is `make demo` itself")
def test_demo_runs_and_summarises(tmp_path):
    pytest.importorskip("PIL")
    pytest.importorskip("skimage")
    result = subprocess.run([sys.executable, "-m", "mimkernels", "--steps", "3", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split(" summary ")[-1]
    assert "self-check: all kernels match the reference" in summary
    for model in ("mae", "aim"):
        assert f"{tmp_path / model / 'reconstruction.png'}" in summary
        assert (tmp_path / model / "checkpoint.pt").is_file()
