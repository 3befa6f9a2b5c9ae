"""The shipped Triton configs compile for sm_90 without spilling registers (no GPU needed).

Runs ``python -m benchmarks.kernel_report --quick`` in a subprocess: the compiler, not the interpreter, must
see the kernels, and this session's TRITON_INTERPRET=1 has already replaced them.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernel_report(*argv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", *argv], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


def test_default_configs_do_not_spill():
    run = kernel_report("--quick")
    assert "0 spill" in run.stdout
    assert run.stdout.count("_prefix_causal_fwd") == 9  # 3 head-dim classes x 3 dtypes were compiled
    for kernel in ("_patch_embed_weight_grad", "_restore_rows"):
        assert run.stdout.count(kernel) == 3, kernel
    assert run.stdout.count("_patch_embed_fwd") == 6  # MAE's kept rows and SimMIM's / BEiT's mask token, 3 dtypes
    assert run.stdout.count("_masked_patch_loss_bwd") == 12  # MAE's and SimMIM's losses, 1 and 8 patches a program
    assert run.stdout.count("_rows_backward") == 6  # the token ops' one-pass backwards, both directions, 3 dtypes
    # the portable tiles run on every GPU without a measured table: consumer Ampere / Ada / Blackwell cards give a
    # block at most 99 KB of shared memory (A100 164 KB, H100 227 KB)
    shared = [int(size) for size in re.findall(r"smem +(\d+) B", run.stdout)]
    assert len(shared) == run.stdout.count(" regs ") and max(shared) <= 99 * 1024, max(shared)


def test_tma_candidates_compile_for_hopper():
    """The tuner's TMA candidates, as the tensor-descriptor kernels a Hopper GPU would run (no GPU needed to
    compile them): each must compile, or the sweep on the GPU would spend its time on failures."""
    from mimkernels.triton import attention_tuning, mlp

    run = kernel_report("--tma", "--quick", "--without-twins")  # D = 128, the TMA kernels alone
    candidates = sum("+tma" in text for texts in attention_tuning.CANDIDATES.values() for text in texts)
    candidates += 2 * sum(tile.tma for tile in mlp.CANDIDATES)  # the MLP's two GEMM kernels per tile
    assert run.stdout.count(" tma ") == run.stdout.count(" regs ") == candidates, run.stdout[-4000:]
    assert f"{candidates} TMA candidates compiled for sm_90" in run.stdout


def test_split_head_dim_candidates_compile_for_hopper():
    """The tuner's split-head-dim candidates at D = 80, as the kernels a GPU would run: each must compile (the
    interpreter runs Python that the compiler may refuse), or the sweep would spend its time on failures."""
    from mimkernels.triton import attention_tuning

    run = kernel_report("--split", "--quick")
    candidates = sum("+splitd" in text for texts in attention_tuning.CANDIDATES.values() for text in texts)
    assert run.stdout.count("_split_d ") == candidates, run.stdout[-4000:]
    assert f"{candidates} split-head-dim candidates compiled for sm_90" in run.stdout


def test_stored_ds_kernels_compile_for_hopper():
    """The stored-dS backward (kernels.STORED_DS) with the measured table's D 128 tiles: the dK/dV kernel storing dS
    (through a descriptor for the +tma tiles without tails) and the dQ kernel reading it, each must compile."""
    from mimkernels.triton import attention_tiles

    run = kernel_report("--stored-ds", "--quick")
    classes = sum(key[0] == 90 and key[1] == 2 and key[2] == 128 for key in attention_tiles.MEASURED)
    assert run.stdout.count(" from-ds ") == classes, run.stdout[-4000:]  # D 128 never splits: both kernels each
    assert f"{2 * classes} stored-dS kernels compiled for sm_90" in run.stdout


def test_dq_kernels_with_the_key_centre_compile_for_hopper():
    """CENTRE_KEYS "dq": every kernel that computes dQ (the dQ kernel with and without delta, split head dim, dQ from
    the stored dS, the atomic dK/dV kernel, the per-head backward), through pointers and TMA, must compile with the
    correction (the interpreter runs Python that the compiler may refuse)."""
    from mimkernels.triton import attention_tiles

    run = kernel_report("--key-centre", "--quick", "--without-twins")
    centred = [line for line in run.stdout.splitlines() if "+centre" in line]
    kernels = {line.split()[0] for line in centred}
    assert kernels == {"_prefix_causal_bwd_dq", "_prefix_causal_bwd_dq_split_d", "_prefix_causal_bwd_dq_from_ds",
                       "_prefix_causal_bwd_dkdv", "_prefix_causal_bwd_per_head"}, kernels
    assert all(" atomic " in line for line in centred if line.startswith("_prefix_causal_bwd_dkdv "))
    assert any(" tma " in line for line in centred) and any(" tma " not in line for line in centred)
    table = sum(key[0] == 90 and key[1] == 2 and key[2] == 128 for key in attention_tiles.MEASURED)
    assert sum(" N<=" in line for line in centred) >= table  # at least each class's dQ kernel
    assert run.stdout.count(" regs ") == len(centred)  # no twin without the correction
    assert f"{len(centred)} dQ kernels with the keys' shared part taken out compiled for sm_90" in run.stdout
