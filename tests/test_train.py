"""The training CLI: runs, checkpoints, resume, data errors, and two-process DDP with gloo."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkernels import parallel, train

Image = pytest.importorskip("PIL.Image")  # the training CLI's image reader (a [train] extra)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "4", "--log-every", "1", "--quiet"]


def run_cli(capsys, *argv):
    code = train.main([*map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_images(folder: Path):
    gen = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gen.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(gen.integers(0, 255, (70, 50), dtype=np.uint8)).save(folder / "gray.jpg")  # grayscale
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(gen.integers(0, 255, (64, 64, 4), dtype=np.uint8)).save(folder / "sub" / "rgba.png")
    (folder / "notes.txt").write_text("not an image, and not looked at")


def test_mae_run_checkpoint_png_and_resume(tmp_path, capsys):
    out = tmp_path / "mae"
    code, stdout, _ = run_cli(capsys, "mae", "--steps", 3, "--save-every", 2, "--out", out, *TINY)
    assert code == 0 and "mae mae_vit_tiny_patch8: 3 steps" in stdout
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["model_name"] == "mae" and "patch_embed.proj.weight" in state["model"]
    with Image.open(out / "reconstruction.png") as png:  # original | masked | reconstruction, 4 rows, x4
        assert png.size == (3 * 256, 4 * 256) and png.mode == "RGB"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    code, stdout, _ = run_cli(capsys, "mae", "--steps", 5, "--out", out, "--resume", *TINY)
    assert code == 0 and "2 steps" in stdout
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 5
    assert resumed["optimizer"]["state"][0]["step"].item() == 5  # AdamW went on from step 3
    assert not torch.equal(resumed["model"]["blocks.0.attn.qkv.weight"], state["model"]["blocks.0.attn.qkv.weight"])


class Interrupted(Exception):
    """Stands for a run killed right after a checkpoint."""


# AIM without workers and micro-batches is in the other two AIM cases' paths (kept out: CI's time limit)
@pytest.mark.parametrize("model, workers, accumulate", [("mae", 0, 1), ("aim", 2, 1), ("aim", 0, 3)])
def test_resume_continues_exactly(tmp_path, capsys, monkeypatch, model, workers, accumulate):
    """A run stopped at step 3 of 7 and resumed logs the same losses, learning rates and gradient norms as an
    uninterrupted one: the data order and position, the crops (in loader workers too), the masks / prefixes and
    AdamW all continue (with micro-batches too)."""
    argv = [model, "--steps", 7, "--save-every", 3, "--workers", workers, *TINY, "--accumulate", accumulate]
    assert run_cli(capsys, *argv, "--out", tmp_path / "whole")[0] == 0

    save = train.save_checkpoint

    def save_then_die(model_, optimizer, args, step, *rest):
        save(model_, optimizer, args, step, *rest)
        if step == 3:
            raise Interrupted

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        run_cli(capsys, *argv, "--out", tmp_path / "parts")
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert run_cli(capsys, *argv, "--out", tmp_path / "parts", "--resume")[0] == 0

    whole, parts = (train.read_metrics(tmp_path / run / "metrics.jsonl") for run in ("whole", "parts"))
    assert [row["step"] for row in parts] == [row["step"] for row in whole] == list(range(1, 8))
    for key in ("loss", "lr", "grad_norm"):
        assert [row[key] for row in parts] == [row[key] for row in whole], key


def test_accumulated_micro_batches_train_as_one_batch(tmp_path, capsys):
    """--batch-size 4 --accumulate 2 against --batch-size 8: the same images, masks (drawn in turn from the CPU's
    generator), global batch and lr, so MAE logs the same losses and gradient norms to rounding and ends at the same
    weights."""
    common = ["mae", "--steps", 3, "--log-every", 1, "--quiet"]
    assert run_cli(capsys, *common, "--batch-size", 8, "--out", tmp_path / "one")[0] == 0
    assert run_cli(capsys, *common, "--batch-size", 4, "--accumulate", 2, "--out", tmp_path / "two")[0] == 0
    one, two = (train.read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two"))
    assert [row["lr"] for row in one] == [row["lr"] for row in two]
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and math.isclose(a["grad_norm"], b["grad_norm"],
                                                                                  rel_tol=1e-4), (a, b)
    weights = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"] for run in ("one", "two")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulate_is_checked(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["mae", "--accumulate", "0"])
    assert "--accumulate must be >= 1" in capsys.readouterr().err


def test_metrics_log_and_loss_plot(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "aim", "--steps", 4, "--out", tmp_path, "--batch-size", 4, "--log-every", 2)
    rows = train.read_metrics(tmp_path / "metrics.jsonl")
    assert code == 0 and [row["step"] for row in rows] == [2, 4]
    assert set(rows[0]) == {"step", "loss", "lr", "images_per_s", "grad_norm", "peak_memory_gib", "elapsed_s"}
    assert all(math.isfinite(row[key]) and row[key] > 0 for row in rows for key in ("loss", "lr", "grad_norm"))
    assert rows[0]["peak_memory_gib"] is None  # the CPU has no peak to report
    with Image.open(tmp_path / "loss.png") as png:
        assert png.size == (700, 400)
    assert f"metrics         {tmp_path / 'metrics.jsonl'}" in stdout
    assert f"loss curve      {tmp_path / 'loss.png'}" in stdout


def test_resume_survives_a_partial_metrics_line_and_names_changed_settings(tmp_path, capsys):
    assert run_cli(capsys, "mae", "--steps", 2, "--out", tmp_path, *TINY)[0] == 0
    with open(tmp_path / "metrics.jsonl", "a") as file:  # a run killed while appending a row
        file.write('{"step": 3, "loss": 0.')
    code, _, stderr = run_cli(capsys, "mae", "--steps", 3, "--out", tmp_path, "--resume", *TINY)
    assert code == 0 and "warning" not in stderr  # a JSONDecodeError traceback before
    assert [row["step"] for row in train.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    # a resumed run with other settings goes on, but says which differ (it was silent)
    code, _, stderr = run_cli(capsys, "mae", "--steps", 4, "--out", tmp_path, "--resume", "--no-norm-pix-loss",
                              "--batch-size", 4, "--log-every", 2, "--quiet")
    assert code == 0 and "warning: --resume: this run differs from the checkpoint's in" in stderr
    assert "--norm-pix-loss False (checkpoint: True)" in stderr and "--log-every" not in stderr
    assert "--batch-size" not in stderr  # TINY's 4 again
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["world"] == 1


def test_changed_settings_compares_what_defines_a_run(tmp_path):
    args = train.parse_args(["aim", "--data", str(tmp_path), "--batch-size", "8"])
    meta = {"args": vars(train.parse_args(["aim", "--data", str(tmp_path / "x" / ".."), "--batch-size", "8",
                                           "--steps", "500", "--log-every", "3"]))}
    assert train.changed_settings(meta, args, world=1) == []  # the same folder; more steps, other logging
    meta["args"]["seed"], meta["world"] = 3, 2
    assert train.changed_settings(meta, args, world=1) == ["--seed 0 (checkpoint: 3)", "1 rank (checkpoint: 2)"]


def test_stop_at_is_checked(capsys):
    assert train.parse_args(["mae", "--steps", "5", "--stop-at", "5"]).stop_at == 5
    for bad in ("0", "6"):
        with pytest.raises(SystemExit):
            train.parse_args(["mae", "--steps", "5", "--stop-at", bad])
    assert "--stop-at must lie in [1, --steps = 5], got 6" in capsys.readouterr().err


def test_progress_is_tqdm_and_quiet_silences_it(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "aim", "--steps", 2, "--batch-size", 4, "--log-every", 1, "--out", tmp_path)
    assert code == 0 and "2/2 [" in stdout and "img/s, lr" in stdout  # tqdm's bar, our postfix
    code, stdout, _ = run_cli(capsys, "aim", "--steps", 3, "--batch-size", 4, "--out", tmp_path, "--resume",
                              "--quiet")
    assert code == 0 and "3/3 [" not in stdout and "aim aim_tiny: 1 steps" in stdout


def test_tensorboard_events_or_a_clear_message(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "aim", "--steps", 2, "--out", tmp_path, "--tensorboard", *TINY)
    if importlib.util.find_spec("tensorboard") is None:
        assert code == 2 and "--tensorboard needs the tensorboard package" in stderr
    else:
        assert code == 0 and list(tmp_path.glob("events.out.tfevents.*"))


def test_crops_depend_only_on_seed_and_key():
    files = train.builtin_photos()[:2]
    dataset = train.CropDataset(files, 32, (0.2, 1.0), length=6, seed=5)
    first = [dataset[key] for key in range(6)]
    assert first[0].shape == (3, 32, 32) and abs(first[0].mean()) < 3  # normalised pixels
    assert torch.equal(dataset[3], first[3]) and not torch.equal(first[1], first[3])  # same key, same crop
    assert not torch.equal(dataset[6 + 3], first[3])  # the next epoch's visit of sample 3 draws a new crop
    other = train.CropDataset(files, 32, (0.2, 1.0), length=6, seed=5)
    assert torch.equal(other[6 + 3], dataset[6 + 3])  # in any process


def test_resumable_sampler_keys_and_skip():
    order = torch.utils.data.DistributedSampler(range(8), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler = train.ResumableSampler(order, period=8, skip=3)
    full = list(order)
    assert list(sampler) == full[3:] and list(sampler) == full  # the skip applies to the next epoch only
    sampler.set_epoch(2)
    order.set_epoch(2)
    assert list(sampler) == [16 + index for index in order]  # keys name the visit


def test_simmim_run_with_its_own_defaults(tmp_path, capsys):
    args = train.parse_args(["simmim"])
    assert (args.config, args.mask_ratio, args.norm_pix_loss) == ("simmim_vit_tiny_patch8", 0.6, False)
    assert train.parse_args(["mae"]).mask_ratio == 0.75 and train.parse_args(["mae"]).norm_pix_loss
    code, stdout, _ = run_cli(capsys, "simmim", "--steps", 2, "--out", tmp_path, *TINY)
    assert code == 0 and "simmim simmim_vit_tiny_patch8: 2 steps" in stdout
    with Image.open(tmp_path / "reconstruction.png") as png:  # original | masked | reconstruction
        assert png.size == (3 * 256, 4 * 256)
    with pytest.raises(SystemExit):
        train.parse_args(["simmim", "--mask-ratio", "0"])


def test_beit_run_fits_its_tokenizer_and_draws_the_accuracy_map(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "beit", "--steps", 2, "--out", tmp_path, "--vocab-size", 32, *TINY)
    assert code == 0 and "beit beit_vit_tiny_patch8: 2 steps" in stdout
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["model"]["tokenizer.centroids"].shape == (32, 8 * 8 * 3)  # resumes with the same vocabulary
    assert state["model"]["lm_head.weight"].shape[0] == 32
    with Image.open(tmp_path / "reconstruction.png") as png:  # original | masked | right / wrong codes
        assert png.size == (3 * 256, 4 * 256)
    code, _, stderr = run_cli(capsys, "beit", "--steps", 1, "--out", tmp_path / "big", "--vocab-size", 100000,
                              *TINY)
    assert code == 2 and "--vocab-size" in stderr and "cannot fit 100000 centres" in stderr
    # a ratio that masks no whole patch of the grid: a traceback after the tokenizer's fit before
    code, _, stderr = run_cli(capsys, "beit", "--steps", 1, "--out", tmp_path / "few", "--mask-ratio", 0.001, *TINY)
    assert code == 2 and "--mask-ratio 0.001: mask_ratio must mask some but not all" in stderr
    assert "Traceback" not in stderr


def test_beit_head_on_masked_patches_trains_as_the_head_on_all(tmp_path, capsys):
    """``--beit-head masked`` (the head on a mask's worth of patches): the same losses as the default head on every
    patch, step after step, and the accuracy map still drawn from its fewer logits."""
    losses = {}
    for head in ("all", "masked"):
        code, _, _ = run_cli(capsys, "beit", "--steps", 2, "--out", tmp_path / head, "--beit-head", head, *TINY)
        assert code == 0
        with open(tmp_path / head / "metrics.jsonl") as f:
            losses[head] = [json.loads(line)["loss"] for line in f]
        with Image.open(tmp_path / head / "reconstruction.png") as png:
            assert png.size == (3 * 256, 4 * 256)
    assert len(losses["all"]) == 2 and losses["masked"] == pytest.approx(losses["all"], rel=1e-5)
    with pytest.raises(SystemExit):
        train.parse_args(["beit", "--beit-head", "unmasked"])


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    pixels = np.asarray(train.open_rgb(tmp_path / "g16.png"))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    # Pillow's convert("RGB") clips 16-bit values at 255: 99.6% of this gradient came out white
    np.testing.assert_array_equal(pixels[..., 0], np.round(gradient / 257).astype(np.uint8))


def test_aim_on_a_folder_of_images(tmp_path, capsys):
    write_images(tmp_path / "photos")
    code, stdout, _ = run_cli(capsys, "aim", "--data", tmp_path / "photos", "--steps", 2, "--out", tmp_path / "aim",
                              *TINY)
    assert code == 0 and "aim aim_tiny: 2 steps" in stdout
    with Image.open(tmp_path / "aim" / "reconstruction.png") as png:  # original | prediction
        assert png.size == (2 * 256, 4 * 256)


def test_the_cli_runs_the_fused_kernels(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "mae", "--steps", 1, "--batch-size", 2, "--backend",
                              "auto" if torch.cuda.is_available() else "triton", "--out", tmp_path, "--quiet")
    assert code == 0 and math.isfinite(float(stdout.split("-> ")[1].split(",")[0]))


@pytest.mark.parametrize("model", ["aim", "beit"])
def test_the_cli_compiles_the_model(model, tmp_path, capsys):
    """--compile: the forward of every step under torch.compile(fullgraph=True) (aot_eager: no C++ toolchain); BEiT's
    forward draws its block-wise masks inside the compiled graph."""
    backend = "auto" if torch.cuda.is_available() else "triton"
    code, stdout, _ = run_cli(capsys, model, "--steps", 2, "--batch-size", 2, "--backend", backend,
                              "--compile", "aot_eager", "--out", tmp_path, "--quiet")
    assert code == 0 and math.isfinite(float(stdout.split("-> ")[1].split(",")[0]))


def test_activation_checkpointing_keeps_the_losses_compiled_or_not(tmp_path, capsys):
    """--activation-checkpointing recomputes each block in the backward: the same logged losses and gradient norms
    as a run without it, eagerly and with the whole forward compiled (aot_eager, checkpoints inside the graph)."""
    runs = {}
    for name, extra in (("plain", ()), ("checkpointed", ("--activation-checkpointing",)),
                        ("compiled", ("--activation-checkpointing", "--compile", "aot_eager"))):
        code, _, _ = run_cli(capsys, "aim", "--steps", 2, *TINY, "--out", tmp_path / name, *extra)
        assert code == 0
        runs[name] = train.read_metrics(tmp_path / name / "metrics.jsonl")
    for name in ("checkpointed", "compiled"):
        for key in ("loss", "grad_norm"):
            for got, want in zip(runs[name], runs["plain"]):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (name, key)


def test_compile_defaults_to_the_gpu_and_no_compile_turns_it_off():
    assert train.parse_args(["mae"]).compile == "auto" and train.parse_args(["mae", "--no-compile"]).compile is None
    assert train.parse_args(["mae", "--compile"]).compile == "inductor"
    assert train.default_compile_backend(torch.device("cpu")) is None
    assert train.default_compile_backend(torch.device("cuda")) == "inductor"


class CompileFailed(torch._dynamo.exc.TorchDynamoException):
    """Stands for Dynamo's and Inductor's errors (their constructors differ across torch releases)."""


def _failing_compile(*args, **kwargs):
    def compiled(*inputs, **kw):
        raise CompileFailed("no luck")
    return compiled


def test_a_default_compile_that_fails_falls_back_to_eager_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "default_compile_backend", lambda device: "aot_eager")
    monkeypatch.setattr(torch, "compile", _failing_compile)
    code, stdout, stderr = run_cli(capsys, "mae", "--steps", 2, "--out", tmp_path, "--quiet", *TINY)
    assert code == 0 and "warning: torch.compile failed (CompileFailed: no luck)" in stderr
    assert math.isfinite(float(stdout.split("-> ")[1].split(",")[0]))


def test_a_named_compile_backend_that_fails_raises(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile)
    with pytest.raises(CompileFailed):
        run_cli(capsys, "mae", "--steps", 1, "--compile", "aot_eager", "--out", tmp_path, "--quiet", *TINY)


@pytest.mark.parametrize("setup, argv, message", [
    (lambda p: (p / "empty").mkdir(), ["--data", "{p}/empty"], "no images found"),
    (lambda p: None, ["--data", "{p}/missing"], "no such folder"),
    (lambda p: (p / "bad").mkdir() or (p / "bad" / "x.png").write_bytes(b"not a png"), ["--data", "{p}/bad"],
     "cannot read image .*x.png"),
    (lambda p: (p / "float").mkdir() or Image.fromarray(np.ones((16, 16), np.float32)).save(p / "float" / "x.tif"),
     ["--data", "{p}/float"], "x.tif has floating-point pixels, whose range is unknown"),
    (lambda p: None, ["--resume", "{p}/none.pt"], "no checkpoint at"),
    (lambda p: None, ["--img-size", "60"], "not a multiple of patch_size"),
    # a ratio that keeps no patch: a traceback from the first forward before
    (lambda p: None, ["--mask-ratio", "0.99"], "--mask-ratio 0.99: mask_ratio=0.99 keeps no patch out of 64"),
    # and one so small that it masks none: a loss of 0 at every step (MAE's loss covers only the masked patches)
    (lambda p: None, ["--mask-ratio", "1e-17"], "--mask-ratio 1e-17: mask_ratio=1e-17 masks no patch out of 64"),
])
def test_bad_data_is_reported_without_a_traceback(tmp_path, capsys, setup, argv, message):
    setup(tmp_path)
    argv = [a.format(p=tmp_path) for a in argv]
    code, _, stderr = run_cli(capsys, "mae", "--steps", 1, "--out", tmp_path / "out", *argv, *TINY)
    assert code == 2 and "Traceback" not in stderr
    import re
    assert re.search(message, stderr), stderr


def test_resume_refuses_another_model(tmp_path, capsys):
    assert run_cli(capsys, "aim", "--steps", 1, "--out", tmp_path, *TINY)[0] == 0
    code, _, stderr = run_cli(capsys, "mae", "--steps", 2, "--out", tmp_path, "--resume", *TINY)
    assert code == 2 and "holds aim aim_tiny" in stderr


def test_bad_arguments_exit_with_usage(tmp_path, capsys):
    (tmp_path / "a_file").touch()
    for argv in (["mae", "--config", "aim_tiny"], ["aim", "--steps", "0"], ["vit"], ["mae", "--mask-ratio", "1"],
                 ["mae", "--out", str(tmp_path / "a_file")]):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2
    # optimizer settings are refused by name before a model is built (AdamW's own error came after it, as a
    # traceback, and a NaN learning rate passed it)
    for flag, value in (("--lr", "-1"), ("--lr", "nan"), ("--min-lr", "-1e-6"), ("--weight-decay", "inf"),
                        ("--clip-grad", "0"), ("--clip-grad", "nan")):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(["mae", f"{flag}={value}"])
        assert exit_info.value.code == 2 and f"{flag} must be a finite number" in capsys.readouterr().err
    # options of another family, and an image size of 0, were silently ignored (0 ran the config's size)
    for argv, message in ((["aim", "--mask-ratio", "0.5"], "--mask-ratio does not apply to aim"),
                          (["mae", "--vocab-size", "32"], "--vocab-size does not apply to mae (only to beit)"),
                          (["simmim", "--beit-head", "masked"], "--beit-head does not apply to simmim"),
                          (["mae", "--img-size", "0"], "--img-size must be >= 1, got 0"),
                          # a run that learnt nothing (a loss of 0) or never reached its learning rate
                          (["mae", "--mask-ratio", "0"], "--mask-ratio must lie in (0, 1): the loss covers only "
                                                         "masked patches, got 0.0"),
                          (["aim", "--steps", "10", "--warmup-steps", "11"], "--warmup-steps 11 is more than --steps "
                                                                              "10"),
                          (["aim", "--backend", "extension"], "the extension backend (--backend or MIMKERNELS_BACKEND) "
                                                              "has only the token ops"),
                          # torch.compile's InvalidBackend came as a traceback after the model was built
                          (["mae", "--compile", "inductr"], "--compile inductr: torch.compile has no such backend; "
                                                            "choose one of ")):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert train.parse_args(["beit"]).beit_head == "all" and train.parse_args(["mae"]).vocab_size == 64
    for value, message in ((" Extension ", "the extension backend"), ("fast", "MIMKERNELS_BACKEND must be one of")):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("MIMKERNELS_BACKEND", value)
            with pytest.raises(SystemExit) as exit_info:
                train.parse_args(["mae"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_gives_every_option_and_its_default_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "(default: no clipping) (default" not in out  # a default the help states is not appended again
    for option in ("--min-lr", "--weight-decay", "--log-every", "--seed"):  # each once had no help at all
        assert f"{option} {option[2:].upper().replace('-', '_')} " in out
    assert "(default: 0)" in out  # --save-every, --workers and --seed: a default of 0 is shown, not taken for False
    for family, defaults in train.DEFAULTS.items():  # the lr default of every model, from the table the CLI uses
        assert f"{family} {defaults['base_lr']:g} x batch/{defaults['lr_batch']}" in out


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train.save_atomically(lambda f: f.write(b"old"), path)

    def crash(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.save_atomically(crash, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_atomic_save_deletes_what_killed_saves_left(tmp_path):
    """A save killed outright leaves its hidden temporary file (no finally runs): the next save deletes it, and
    only the temporary files of that name."""
    path = tmp_path / "checkpoint.pt"
    (tmp_path / ".checkpoint.pt.tmp4242").write_bytes(b"half of a killed save")
    (tmp_path / ".reconstruction.png.tmp4242").write_bytes(b"another file's")
    train.save_atomically(lambda f: f.write(b"new"), path)
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".reconstruction.png.tmp4242", "checkpoint.pt"]


def test_lr_schedule_warms_up_then_decays():
    lrs = [train.lr_at(step, 100, 10, 1.0, 0.1) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_weight_decay_skips_biases_norms_and_tokens():
    from mimkernels.models import mae_vit_tiny_patch8

    model = mae_vit_tiny_patch8()
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "mask_token", "norm.weight", "norm.bias"}
    assert all(p.ndim > 1 for p in decay["params"]) and "pos_embed" not in {names[id(p)] for p in decay["params"]}


# train.main, then the names of gloo's threads still running in this process (Linux: /proc/self/task)
RUN_MAIN_THEN_LIST_GLOO_THREADS = """
import os, sys
from mimkernels import train
{prelude}
code = train.main(sys.argv[1:])
names = []
for task in os.listdir("/proc/self/task"):
    try:
        with open(f"/proc/self/task/{task}/comm") as comm:
            names.append(comm.read().strip())
    except FileNotFoundError:  # a thread that ended between the listing and the read (CI failed on one once)
        pass
# one write(2) of under PIPE_BUF bytes: the two ranks share the stderr pipe, and print's pieces interleaved once
os.write(2, f"gloo threads after main: {sorted(name for name in names if 'gloo' in name)}\\n".encode())
sys.exit(code)
"""


def _torchrun(tmp_path, out, *argv, prelude=""):
    """A 4-step tiny MAE run on 2 gloo ranks, after running the Python code ``prelude`` in each; its stdout and
    stderr. Fails unless both ranks exit cleanly and, with DDP, gloo's threads have stopped when main returns:
    threads left running to interpreter exit aborted a rank in CI once ("terminate called without an active
    exception")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runner = tmp_path / "run_main.py"
    runner.write_text(RUN_MAIN_THEN_LIST_GLOO_THREADS.replace("{prelude}", prelude))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(runner), "mae", "--steps", "4", "--out", str(out), *TINY, *map(str, argv)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if sys.platform == "linux" and "--fsdp" not in argv:  # under FSDP, torch's DTensor caches keep the group
        assert result.stderr.count("gloo threads after main: []") == 2, result.stderr[-3000:]
    return result.stdout, result.stderr


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 4-step MAE run on 2 gloo ranks with DDP: (its folder, its stdout)."""
    folder = tmp_path_factory.mktemp("ddp")
    return folder / "whole", _torchrun(folder, folder / "whole")[0]


def test_ddp_two_cpu_processes_keep_identical_parameters_and_resume_exactly(tmp_path, ddp_run):
    """torchrun with 2 processes on gloo: each rank trains on its own shard; the run ends by comparing every
    parameter tensor across ranks (train.replicas_in_sync) and fails if any differs. Rank 0 alone writes the
    metrics; a run stopped at step 2 (--stop-at) and resumed logs what the uninterrupted run logs."""
    whole_folder, stdout = ddp_run
    assert "parameters identical on all 2 ranks" in stdout
    assert torch.load(whole_folder / "checkpoint.pt", weights_only=False)["step"] == 4
    _torchrun(tmp_path, tmp_path / "parts", "--stop-at", 2)
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)["step"] == 2
    _torchrun(tmp_path, tmp_path / "parts", "--resume")
    whole, parts = train.read_metrics(whole_folder / "metrics.jsonl"), train.read_metrics(tmp_path / "parts" /
                                                                                          "metrics.jsonl")
    assert [row["step"] for row in whole] == [row["step"] for row in parts] == [1, 2, 3, 4]  # one writer
    for key in ("loss", "lr", "grad_norm"):
        assert [row[key] for row in parts] == [row[key] for row in whole], key


# a compile that fails as Dynamo's and Inductor's errors do, on the first forward, under DDP as without it (DDP needs
# a module holding the parameters, as torch.compile's OptimizedModule does)
FAILING_DEFAULT_COMPILE = """
import torch
class Failing(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
    def forward(self, *args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no luck")
torch.compile = lambda model, **options: Failing(model)
train.default_compile_backend = lambda device: "aot_eager"
"""


def test_ddp_runs_the_compiled_model(tmp_path, ddp_run):
    """--compile under DDP (2 gloo ranks, aot_eager): DDP wraps the compiled model, so Dynamo's DDPOptimizer splits
    its graph at DDP's gradient buckets; compiling the DDP wrapper instead failed with fullgraph (DDP's forward calls
    a logger Dynamo does not trace), so on GPUs the default compile fell back to eager. The losses and gradient norms
    are the eager DDP run's. A default compile that fails falls back to eager on both ranks, DDP kept."""
    ddp = train.read_metrics(ddp_run[0] / "metrics.jsonl")
    stdout, _ = _torchrun(tmp_path, tmp_path / "compiled", "--compile", "aot_eager")
    _, stderr = _torchrun(tmp_path, tmp_path / "fallback", prelude=FAILING_DEFAULT_COMPILE)
    assert stderr.count("warning: torch.compile failed (TorchDynamoException: no luck)") == 2
    for name in ("compiled", "fallback"):
        runs = train.read_metrics(tmp_path / name / "metrics.jsonl")
        assert len(runs) == len(ddp) == 4
        for a, b in zip(runs, ddp):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (name, a, b)
            assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5), (name, a, b)
    assert "parameters identical on all 2 ranks" in stdout


def test_fsdp_two_cpu_processes_match_ddp_and_resume_exactly(tmp_path, ddp_run):
    """--fsdp --activation-checkpointing on 2 gloo ranks trains what DDP on the same 2 ranks trains: each rank sees
    the same images and masks and computes the same losses bit for bit; only the gradient reduction differs
    (reduce-scatter instead of all-reduce), so the gradient norms agree to rounding. (A 1-process run draws other
    masks: they are seeded per rank.) Each rank writes its shards; a run stopped at step 2 and resumed logs what
    the uninterrupted one logs; the folder converts to one file that a plain model loads."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    stdout, _ = _torchrun(tmp_path, tmp_path / "whole", "--fsdp", "--activation-checkpointing")
    assert "sharded over 2 ranks (FSDP2)" in stdout
    folder = tmp_path / "whole" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
    ddp, fsdp = train.read_metrics(ddp_run[0] / "metrics.jsonl"), train.read_metrics(tmp_path / "whole" /
                                                                                     "metrics.jsonl")
    assert [row["loss"] for row in fsdp] == [row["loss"] for row in ddp]
    assert [row["lr"] for row in fsdp] == [row["lr"] for row in ddp]
    for a, b in zip(fsdp, ddp):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5), (a, b)

    _torchrun(tmp_path, tmp_path / "parts", "--fsdp", "--stop-at", 2)
    # as if the job had been killed in save_sharded's swap, once the step-2 checkpoint was complete in its staging
    # folder, and before the one it replaced was deleted: resume finishes the swap, and the run's saves go on
    (tmp_path / "parts" / "checkpoint").rename(tmp_path / "parts" / "checkpoint.tmp")
    (tmp_path / "parts" / "checkpoint.old").mkdir()
    (tmp_path / "parts" / "checkpoint.old" / "__0_0.distcp").write_bytes(b"an older shard")
    _torchrun(tmp_path, tmp_path / "parts", "--fsdp", "--resume")
    parts = train.read_metrics(tmp_path / "parts" / "metrics.jsonl")
    for key in ("loss", "lr", "grad_norm"):
        assert [row[key] for row in parts] == [row[key] for row in fsdp], key
    assert not (tmp_path / "parts" / "checkpoint.tmp").exists() and not (tmp_path / "parts" / "checkpoint.old").exists()
    assert parallel.read_meta(tmp_path / "parts" / "checkpoint")["step"] == 4

    dcp_to_torch_save(folder, tmp_path / "one.pt")
    state = torch.load(tmp_path / "one.pt", weights_only=False)
    model = train.build_model(train.parse_args(["mae"]))
    model.load_state_dict(state["model"])
    whole = torch.load(ddp_run[0] / "checkpoint.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():  # 4 steps of FSDP = 4 steps of DDP, to rounding
        torch.testing.assert_close(value, whole[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_accumulated_micro_batches_on_two_ranks(tmp_path, ddp_run, sharding):
    """--batch-size 2 --accumulate 2 on 2 gloo ranks trains what the DDP run with --batch-size 4 trains (the
    gradients reduced once per step, after the second micro-batch): the same losses and gradient norms to
    rounding, the same weights; DDP's ranks end in sync."""
    extra = ["--fsdp"] if sharding == "fsdp" else []
    stdout, _ = _torchrun(tmp_path, tmp_path / "accumulated", "--batch-size", 2, "--accumulate", 2, *extra)
    if sharding == "ddp":
        assert "parameters identical on all 2 ranks" in stdout
    whole, accumulated = (train.read_metrics(folder / "metrics.jsonl") for folder in (ddp_run[0],
                                                                                       tmp_path / "accumulated"))
    assert [row["lr"] for row in accumulated] == [row["lr"] for row in whole]
    for a, b in zip(accumulated, whole, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and math.isclose(a["grad_norm"], b["grad_norm"],
                                                                                  rel_tol=1e-4), (a, b)


def test_fsdp_needs_torchrun_and_its_checkpoint_needs_fsdp(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        train.parse_args(["mae", "--fsdp"])
    assert "--fsdp runs under torchrun" in capsys.readouterr().err
    (tmp_path / "checkpoint").mkdir()
    code, _, err = run_cli(capsys, "mae", "--steps", 2, *TINY, "--out", tmp_path, "--resume", tmp_path / "checkpoint")
    assert code == 2 and "is a sharded checkpoint of an --fsdp run" in err


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["mae", "aim"])
def test_cli_on_gpu_with_bf16_autocast(tmp_path, capsys, model):
    write_images(tmp_path / "photos")
    code, stdout, _ = run_cli(capsys, model, "--data", tmp_path / "photos", "--steps", 4, "--batch-size", 8,
                              "--lr", 1e-3, "--out", tmp_path / "run", "--log-every", 2, "--quiet")
    assert code == 0 and math.isfinite(float(stdout.split("-> ")[1].split(",")[0]))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["args"]["precision"] == "auto"
