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


def test_speed_check_times_every_hot_path_against_its_baseline(device, capsys):
    """The demo's GPU timings, run here on tiny shapes (fp32: the interpreter's bf16 dot is broken)."""
    from mimkernels.__main__ import SPEED_SHAPES, speed_check

    tiny = {"aim_attention": (2, 2, 17, 16), "mae_attention": (2, 2, 5, 16), "mae_tokens": (2, 8, 16),
            "mae_patch_embed": (2, 16, 8, 16)}
    assert tiny.keys() == SPEED_SHAPES.keys()
    rows = speed_check(tiny, device, dtype=torch.float32)
    assert [name.split()[0] for name, _, _ in rows] == ["prefix-causal", "full", "MAE", "kept-patch"]
    assert all(ours > 0 and baseline > 0 for _, ours, baseline in rows)
    assert capsys.readouterr().out.count("x\n") == len(rows)


def test_package_never_imports_the_repository_benchmarks():
    """An installed wheel has no benchmarks/: the package must work without it."""
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "mimkernels").rglob("*.py")
                 if any(line.lstrip().startswith(("from benchmarks", "import benchmarks"))
                        for line in path.read_text().splitlines())]
    assert offenders == []


def test_commit_is_this_checkout_or_the_environment(monkeypatch, tmp_path):
    from mimkernels import timing

    monkeypatch.setenv("MIMKERNELS_COMMIT", "abc1234")
    assert timing.commit() == "abc1234"
    monkeypatch.delenv("MIMKERNELS_COMMIT")
    here = timing.commit()
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert here.removesuffix("-dirty") == head
    else:
        assert here == "unknown"
    # whatever repository encloses the working directory does not matter
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    assert timing.commit() == here


def test_demo_refuses_bad_steps_before_the_self_check(capsys):
    from mimkernels.__main__ import main

    with pytest.raises(SystemExit) as exit_info:  # the training CLI refused it, after the whole self-check
        main(["--steps", "0", "--no-train"])
    assert exit_info.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err


def test_demo_restarts_under_the_interpreter_with_the_arguments_it_was_given(monkeypatch):
    import mimkernels.__main__ as demo

    class Restarted(Exception):
        pass

    def execve(path, argv, env):
        raise Restarted(argv, env)

    monkeypatch.setattr(demo, "HAS_GPU", False)
    monkeypatch.setattr(demo._backend, "triton_interpreted", lambda: False)
    monkeypatch.setattr(demo.os, "execve", execve)
    with pytest.raises(Restarted) as restart:  # main(argv) restarted with the caller's sys.argv before
        demo.main(["--no-train", "--steps", "5"])
    argv, env = restart.value.args
    assert argv[1:] == ["-m", "mimkernels", "--no-train", "--steps", "5"] and env["TRITON_INTERPRET"] == "1"


def test_demo_without_triton_checks_what_is_installed(monkeypatch, capsys):
    """Where triton is not installed (macOS, Windows: pyproject installs it on Linux only) the demo ran the Triton
    checks anyway and died in a RuntimeError traceback; now it checks what is there and says what it left out."""
    import mimkernels.__main__ as demo

    def execve(*args):
        raise AssertionError("restarted for an interpreter that is not installed")

    monkeypatch.setattr(demo, "HAS_GPU", False)
    monkeypatch.setattr(demo._backend, "_HAS_TRITON", False)
    monkeypatch.setattr(demo._backend, "_HAS_EXTENSION", False)
    monkeypatch.setattr(demo._backend, "triton_interpreted", lambda: False)
    monkeypatch.setattr(demo.os, "execve", execve)
    assert demo.main(["--no-train"]) == 0
    out = capsys.readouterr().out
    assert "triton kernels not checked: the triton package is not installed" in out
    assert "self-check: all kernels match the reference; triton's not checked (not available here); extension's " \
           "not checked" in out
    assert "Triton interpreter" not in out
