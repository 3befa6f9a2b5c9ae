"""The arithmetic behind the benchmark tables (the timings themselves need a GPU)."""
import os
import shutil

import pytest
import torch

import mimkernels
from benchmarks import bench_attention, common


def test_visible_pairs_counts_the_mask():
    prefix = torch.tensor([0, 1, 7, 13, 40])
    assert bench_attention.visible_pairs(13, prefix) == int(mimkernels.prefix_causal_mask(13, prefix).sum())


def test_roofline_is_the_larger_fraction():
    peaks = common.Peaks(tflops=100.0, gbps=1000.0)
    # 1 ms: 10 TFLOP/s is 10% of compute; 500 GB/s is 50% of bandwidth
    row = common.result("k", "p", "fwd", "s", "bf16", (1.0, 0.9, 1.1), flops=10e9, min_bytes=500e6, peaks=peaks)
    assert abs(row.tflops - 10.0) < 1e-9 and abs(row.gbps - 500.0) < 1e-9
    assert abs(row.roofline_pct - 50.0) < 1e-9


def test_speedups_compare_within_shape_and_mode():
    peaks = common.Peaks(1.0, 1.0)
    rows = [common.result("k", provider, mode, "s", "bf16", (ms, ms, ms), 1, 1, peaks)
            for provider, mode, ms in [("mimkernels", "fwd", 1.0), ("sdpa_dense_mask", "fwd", 3.0),
                                       ("mimkernels", "bwd", 2.0), ("flex", "bwd", 3.0)]]
    lines = common.speedups(rows)
    assert any("sdpa_dense_mask" in line and "3.00x" in line for line in lines)
    assert any("flex" in line and "1.50x" in line for line in lines)


def test_harness_runs_end_to_end(tmp_path, monkeypatch):
    """Every provider but FlexAttention (minutes to compile on a CPU), every mode, the CSV and the plot; the
    stored-dS and centred-keys providers are timed with their switch on (on the CPU the op runs its reference: the
    switch alone is checked), every other with both off, and they are back as they were after."""
    from mimkernels.ops import attention as attention_ops
    from mimkernels.triton import attention as kernels

    peaks = common.Peaks(1.0, 1.0)
    csv_path = tmp_path / "attention.csv"
    table = {"tiny_prefix": (2, 2, 37, 16, "prefix"), "tiny_full": (2, 2, 21, 16, "full")}
    switches_when_timed, timed = [], bench_attention._timed
    monkeypatch.setattr(bench_attention, "_timed", lambda fn, *args: switches_when_timed.append(
        (kernels.STORED_DS, attention_ops.CENTRE_KEYS)) or timed(fn, *args))
    rows = bench_attention.run(list(table), bench_attention.MODES, torch.float32, True, peaks, str(csv_path),
                               device="cpu", with_flex=False, table=table)
    want = {"mimkernels_stored_ds": (True, False), "mimkernels_centred_keys": (None, True),
            "mimkernels_centred_dq": (None, "dq")}
    assert [switches for switches, r in zip(switches_when_timed, rows)] == [
        want.get(r.provider, (None, False)) for r in rows]
    assert sum(r.provider in want for r in rows) == 24
    assert kernels.STORED_DS is None and attention_ops.CENTRE_KEYS is False  # unset (the table decides); off
    providers = {shape: {r.provider for r in rows if r.shape.startswith(shape)} for shape in table}
    assert providers["tiny_prefix"] == {"mimkernels", "mimkernels_nondet", "mimkernels_stored_ds",
                                        "mimkernels_centred_keys", "mimkernels_centred_dq", "sdpa_dense_mask",
                                        "sdpa_causal", "mimkernels_causal"}
    assert providers["tiny_full"] == {"mimkernels", "mimkernels_nondet", "mimkernels_stored_ds",
                                      "mimkernels_centred_keys", "mimkernels_centred_dq",
                                      "sdpa"}  # forced SDPA backends: CUDA only
    assert {r.mode for r in rows} == set(bench_attention.MODES)
    header = csv_path.read_text().splitlines()[0]
    assert header == ",".join(common.CSV_FIELDS)
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows)
    bench_attention.plot(rows, str(tmp_path / "attention.png"), device="cpu")
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_profile_runs_each_switched_provider_with_its_switch_on(monkeypatch):
    """profile_attention profiles bench_attention's providers: a switched one (the stored-dS backward, centred
    keys) with its switch on while it runs, else it would profile the default path under the other name."""
    from benchmarks import profile_attention
    from mimkernels.ops import attention as attention_ops

    profiled = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(profile_attention, "profile", lambda shape, provider: profiled.append(
        (provider, attention_ops.CENTRE_KEYS)) or [])
    profile_attention.main(["--shapes", "aim_600m", "--providers", "mimkernels", "mimkernels_centred_keys",
                            "mimkernels_centred_dq"])
    assert profiled == [("mimkernels", False), ("mimkernels_centred_keys", True), ("mimkernels_centred_dq", "dq")]
    assert attention_ops.CENTRE_KEYS is False


def test_shared_key_error_shows_what_each_centre_keys_mode_does(capsys):
    """benchmarks/shared_key_error.py on a small shape (interpreter on the CPU): with no shared part every mode is
    within a few times SDPA's error; with a large one ours without centring is far outside, both cures within, and
    the switch is off again after."""
    from benchmarks import shared_key_error
    from mimkernels.ops import attention as attention_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    for shared in (0.0, 32.0):
        errors = shared_key_error.relative_dq_errors((1, 2, 40, 16), shared, dtype, device)
        assert set(errors) == {*shared_key_error.MODES, "sdpa_dense_mask"}
        if shared == 0:
            assert max(errors.values()) <= 3 * errors["sdpa_dense_mask"], errors
        else:
            assert errors["ours"] > 10 * max(errors["ours_centred_keys"], errors["ours_centred_dq"]), errors
    assert attention_ops.CENTRE_KEYS is False
    assert shared_key_error.main(["--shape", "1", "1", "17", "16", "--shared", "0", "8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_targets_report_met_and_missed():
    peaks = common.Peaks(1.0, 1.0)
    rows = [common.result("attention", provider, mode, f"{shape}:B1", "bf16", (ms, ms, ms), 6e11 * ms, 1, peaks)
            for shape, provider, mode, ms in [
                ("aim_600m", "mimkernels", "fwd_bwd", 1.0), ("aim_600m", "sdpa_dense_mask", "fwd_bwd", 2.0),
                ("aim_600m", "flex", "fwd_bwd", 1.5), ("n4096", "mimkernels", "fwd", 0.001),
                ("aim_600m", "mimkernels", "fwd_bwd_graph", 0.5),
                ("aim_600m", "sdpa_dense_mask", "fwd_bwd_graph", 0.8)]]
    lines = bench_attention.targets(rows, {("aim_600m", "mimkernels"): 10.0, ("aim_600m", "flex"): 9.0})
    assert any("sdpa_dense_mask" in line and "2.00x" in line and line.endswith(" met") for line in lines)
    # the same target on GPU time (CUDA graph), reported beside the per-call one
    assert any("fwd_bwd_graph" in line and "sdpa_dense_mask" in line and "1.60x" in line and line.endswith(" met")
               for line in lines)
    assert any("vs flex " in line and "1.50x" in line and line.endswith("MISSED") for line in lines)
    assert any("TFLOP/s" in line and "target >= 500" in line and line.endswith(" met") for line in lines)
    assert any("peak" in line and line.endswith("MISSED") for line in lines)
    assert not any("aim_3b" in line for line in lines)  # nothing is reported for shapes not measured


def test_routing_lines_compare_gpu_time_with_the_routing_rule():
    """Each line: our speedup over SDPA on GPU time and whether deterministic=False's choice agrees with it. Off CUDA
    nothing routes to SDPA, so there a faster SDPA disagrees."""
    peaks = common.Peaks(1.0, 1.0)
    rows = [common.result("attention", provider, "fwd_bwd_graph", f"{shape}:B1", "bf16", (ms, ms, ms), 1, 1, peaks)
            for shape, provider, ms in [("mae_encoder", "mimkernels", 1.0), ("mae_encoder", "sdpa", 1.5),
                                        ("aim_600m", "mimkernels_causal", 1.0), ("aim_600m", "sdpa_causal", 0.5),
                                        ("vit_b", "mimkernels", 1.0)]]
    lines = bench_attention.routing(rows, device="cpu")
    assert any(line.split()[:2] == ["mae_encoder", "full"] and "1.50x" in line and "routed to ours" in line
               and line.endswith("agrees") for line in lines)
    assert any(line.startswith("aim_600m") and "0.50x" in line and line.endswith("DISAGREES") for line in lines)
    assert not any(line.startswith(("vit_b", "aim_3b")) for line in lines)  # no SDPA row, no line


def test_norms_harness_runs_end_to_end(tmp_path):
    from benchmarks import bench_norms

    csv_path = tmp_path / "norms.csv"
    rows = bench_norms.run(["aim_600m"], torch.float32, True, common.Peaks(1.0, 1.0), str(csv_path), device="cpu",
                           scale=4096, compile_backend="aot_eager")
    providers = ("torch_unfused", "torch_compiled", "mimkernels", "mimkernels_triton")
    assert {(r.provider, r.mode) for r in rows} == {(p, m) for p in providers for m in bench_norms.MODES}
    assert bench_norms.MODES == ("fwd", "fwd_bwd", "fwd_bwd_graph")
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows)
    fwd = next(r for r in rows if r.mode == "fwd")
    assert fwd.gbps * fwd.ms_p50 * 1e6 == pytest.approx(4 * 1536 * 12, rel=1e-3)  # rows x width x 12 bytes


def test_step_traffic_counts_what_the_fused_norms_remove():
    """One MAE step's ops on the CPU: with FUSED_ADD_NORM only each stack's first norm1 is an aten LayerNorm (forward
    and backward), and the adds and casts that the fused kernel absorbs move fewer bytes."""
    from benchmarks import step_traffic
    from mimkernels import models

    counts = step_traffic.step_traffic("mae", "mae_vit_tiny_patch8", 2, ("mimkernels", "mimkernels_fused_norm",
                                                                         "timm_sdpa"))
    plain, fused, official = counts["mimkernels"], counts["mimkernels_fused_norm"], counts["timm_sdpa"]
    model = models.mae_vit_tiny_patch8()
    norms = (2 * len(model.blocks) + 1) + (2 * len(model.decoder_blocks) + 1)
    assert plain.ops["layernorm"] == official.ops["layernorm"] == 2 * norms  # forward and backward of each
    assert fused.ops["layernorm"] == 2 * 2
    assert fused.bytes["elementwise"] < 0.6 * plain.bytes["elementwise"]
    assert fused.bytes["copy_index"] < plain.bytes["copy_index"]
    assert plain.bytes["ours"] > 0 and official.bytes["ours"] == 0 < official.bytes["attn_sdpa"]
    assert plain.bytes["gemm"] == fused.bytes["gemm"] < official.bytes["gemm"]  # + its Conv2d patch embedding
    text = step_traffic.report("mae tiny", counts)
    assert "not GEMM, not ours" in text and "timm_sdpa" in text
    assert sum(fused.op_bytes.values()) == sum(fused.bytes.values())
    assert fused.op_calls["layernorm", "native_layer_norm"] == 2 and fused.op_calls["ours", "_add_layer_norm_fwd"] > 0
    by_op = step_traffic.report_by_op("mae tiny", counts, 3)
    assert by_op.count("\n") == 1 + 3 * (1 + 3) and "mm " not in by_op  # GEMMs left out


def test_tokens_harness_runs_end_to_end(tmp_path):
    from benchmarks import bench_tokens

    csv_path = tmp_path / "tokens.csv"
    rows = bench_tokens.run(["mae_base"], torch.float32, True, common.Peaks(1.0, 1.0), str(csv_path),
                            device="cpu", batch=2)
    providers = {r.provider for r in rows}
    assert {"official_mae", "torch_gather", "mimkernels", "mimkernels_triton", "mimkernels_fused_bwd"} <= providers
    assert {r.shape.split(":")[0] for r in rows} == {"encoder", "decoder"}
    assert {r.mode for r in rows} == set(bench_tokens.MODES) == {"fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph"}
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows)
    assert any("official_mae" in line and line.endswith("x") for line in common.speedups(rows))
    lines = bench_tokens.targets(rows)
    # both jobs, per call and on GPU time: 2 x 2 speedup lines, 2 x 2 roofline lines
    assert sum("vs official_mae" in line for line in lines) == 4
    assert sum("of roofline" in line for line in lines) == 4
    assert all(line.endswith(("met", "MISSED")) for line in lines[1:])


@pytest.mark.parametrize("job", ["encoder", "decoder"])
def test_tokens_fused_backward_provider_times_the_fused_backward(job, monkeypatch):
    """mimkernels_fused_bwd's timed step runs the one-pass backward kernel (ops.tokens.FUSED_BACKWARD is read where
    the backward runs: a switch set around the forward alone left it off there), the other providers do not."""
    from benchmarks import bench_tokens
    from mimkernels.ops import tokens as token_ops

    calls, rows_backward = [], token_ops._triton_kernels.rows_backward
    monkeypatch.setattr(token_ops._triton_kernels, "rows_backward",
                        lambda *args: calls.append(1) or rows_backward(*args))
    args, leaves, _, _ = bench_tokens.job_inputs(job, 2, 8, 16, torch.float32, "cpu")
    for provider, fn in bench_tokens.providers(job).items():
        calls.clear()
        grad_out = torch.randn_like(fn(*args))
        bench_tokens._step(fn, args, leaves, grad_out, "fwd_bwd", provider)()
        assert len(calls) == (provider == "mimkernels_fused_bwd"), provider
    assert not token_ops.FUSED_BACKWARD  # put back


def test_patch_embed_harness_runs_end_to_end(tmp_path):
    from benchmarks import bench_patch_embed

    csv_path = tmp_path / "patch_embed.csv"
    rows = bench_patch_embed.run(["vit_b16"], torch.float32, True, common.Peaks(1.0, 1.0), str(csv_path),
                                 device="cpu", batch=2, size=32)
    assert {r.kernel for r in rows} == {"patch_embed", "masked_patch_loss"}
    assert {r.shape.split(":")[0] for r in rows} == {"full", "mae", "simmim", "loss"}
    assert {r.provider for r in rows if r.kernel == "masked_patch_loss"} == {"official_mae", "mimkernels",
                                                                              "mimkernels_grouped"}
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows)
    assert len(common.speedups(rows)) > 1
    assert {r.mode for r in rows} == set(bench_patch_embed.MODES)
    lines = bench_patch_embed.targets(rows)
    assert sum("vs conv2d" in line for line in lines) == 3 * 2  # full, mae, simmim; per call and GPU time
    assert sum("vs official_mae" in line for line in lines) == 2  # the loss
    assert sum("of roofline" in line for line in lines) == 4 * 2  # three embeddings and the loss, fwd and fwd_bwd


def test_target_lines_compare_ours_with_each_baseline_on_the_same_shape():
    """Speedups pair rows of one full shape (two shapes sharing a name are two lines); unmeasured shapes, modes or
    baselines give none; rooflines compare the row's own percentage."""
    peaks = common.Peaks(100.0, 100.0)
    measured = [("encoder:a:B1", "mimkernels", 1.0, 7e7), ("encoder:a:B1", "official", 3.0, 7e7),
                ("encoder:b:B1", "mimkernels", 1.0, 5e7), ("encoder:b:B1", "official", 2.0, 5e7),
                ("decoder:a:B1", "mimkernels", 1.0, 1e7)]
    rows = [common.result("k", provider, "fwd_bwd_graph", shape, "bf16", (ms, ms, ms), 0, bytes_, peaks)
            for shape, provider, ms, bytes_ in measured]
    rows.append(common.result("k", "mimkernels", "fwd", "encoder:a:B1", "bf16", (1.0, 1.0, 1.0), 0, 1, peaks))
    lines = common.speedup_target_lines(rows, [(("encoder", "decoder"), "fwd_bwd_graph", "official", 2.5)])
    assert len(lines) == 2  # decoder: no baseline row
    assert lines[0].startswith("encoder:a:B1") and "3.00x" in lines[0] and lines[0].endswith(" met")
    assert lines[1].startswith("encoder:b:B1") and "2.00x" in lines[1] and lines[1].endswith("MISSED")
    roofline = common.roofline_target_lines(rows, [(("encoder", "decoder"), "fwd_bwd_graph", 60.0)])
    assert [line.split()[0] for line in roofline] == ["encoder:a:B1", "encoder:b:B1", "decoder:a:B1"]
    assert [line.split()[-1] for line in roofline] == ["met", "MISSED", "MISSED"]  # 70%, 50%, 10% of 100 GB/s


def test_models_harness_runs_end_to_end(tmp_path):
    from benchmarks import bench_models

    configs = {"mae": ("mae", "mae_vit_tiny_patch8", 2), "aim": ("aim", "aim_tiny", 2)}
    csv_path = tmp_path / "models.csv"
    rows = bench_models.run(["mae", "aim"], torch.float32, True, common.Peaks(1.0, 1.0), str(csv_path),
                            device="cpu", configs=configs, profile=True)
    assert {(r.kernel, r.provider) for r in rows} == {
        ("mae_train_step", "mimkernels"), ("mae_train_step", "timm_sdpa"), ("mae_train_step", "mimkernels_views"),
        ("mae_train_step", "mimkernels_fused_norm"), ("mae_train_step", "mimkernels_fused_mlp"),
        ("aim_train_step", "mimkernels"), ("aim_train_step", "ml_aim_dense_mask"),
        ("aim_train_step", "mimkernels_views"), ("aim_train_step", "mimkernels_fused_norm"),
        ("aim_train_step", "mimkernels_fused_mlp")}
    summary = (tmp_path / "models_summary.csv").read_text().splitlines()
    assert summary[0].startswith("shape,provider,images_per_s,peak_gib,speedup,mfu") and len(summary) == 11
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows)
    flops = {r.kernel: r.tflops * r.ms_p50 * 1e9 for r in rows if r.provider == "mimkernels"}
    assert flops["mae_train_step"] == pytest.approx(bench_models.model_flops("mae", "mae_vit_tiny_patch8", 2), rel=1e-3)
    profile = (tmp_path / "train_step_profile.txt").read_text()
    assert profile.count("## ") == len(rows) and "gemm" in profile and profile.count("% of the ") == len(rows)


def test_model_flops_are_the_published_counts():
    """Per image, forward + backward: MAE ViT-L/16 at 75% masking about 125 GFLOP, AIM-600M about 1.7 TFLOP
    (benchmarks/NOTES.md's hand count), and linear in the batch."""
    from benchmarks import bench_models

    assert bench_models.model_flops("mae", "mae_vit_large_patch16", 1) / 1e9 == pytest.approx(124.2, rel=0.01)
    assert bench_models.model_flops("aim", "aim_600m", 2) / 1e9 == pytest.approx(2 * 1696.3, rel=0.01)


@pytest.mark.parametrize("name, category", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("_prefix_causal_bwd_dkdv", "attn_ours"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128", "attn_sdpa"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_",
     "copy_index"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>",
     "copy_index"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluBackwardCUDAKernelImpl(at::TensorIteratorBas",
     "elementwise"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<float, float, 32u", "layernorm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::FusedOpti",
     "optimizer"),
    ("_restore_rows", "mim_ops_ours"),
    ("triton_per_fused_native_layer_norm_0", "layernorm"),
    ("triton_poi_fused_add_gelu_1", "inductor_fused"),
])
def test_kernel_categories(name, category):
    from benchmarks import bench_models

    assert bench_models.kernel_category(name) == category


def test_step_profile_says_how_much_of_the_step_the_kernels_took():
    """A step whose kernels fill a fifth of its time waited for the host: the profile's head line says so."""
    from benchmarks import bench_models

    text = bench_models.profile_text("mae_vit_l_b64 mimkernels", {"gemm": 3.0, "attn_ours": 1.0},
                                     [(3.0, "nvjet_gemm"), (1.0, "_prefix_causal_fwd")], step_ms=20.0)
    assert text.splitlines()[0] == "## mae_vit_l_b64 mimkernels: 4.00 ms of kernel time, 20% of the 20.00 ms step"
    assert text.splitlines()[1].split() == ["gemm", "3.00", "ms", "75.0%"]


def test_targets_are_those_of_the_issues_batch_only():
    """MAE ViT-L's targets are at B256 (issue 11); rows of the official per-GPU batch (mae_vit_l_b64) are reported,
    never counted as that target's."""
    from benchmarks import bench_models

    def row(shape, provider, images_per_s):
        return {"shape": shape, "provider": provider, "images_per_s": images_per_s, "peak_gib": 1.0}

    b64 = "mae_vit_l_b64:mae_vit_large_patch16:B64"
    assert bench_models.SHAPES["mae_vit_l_b64"] == ("mae", "mae_vit_large_patch16", 64)
    assert bench_models.target_lines([row(b64, "mimkernels", 200.0), row(b64, "timm_sdpa", 100.0)]) == []
    b256 = "mae_vit_l:mae_vit_large_patch16:B256"
    assert bench_models.target_lines([row(b256, "mimkernels", 200.0), row(b256, "timm_sdpa", 100.0),
                                      row(b64, "timm_sdpa", 20.0)])[0].startswith(
        "target mae_vit_l: mimkernels 2.00x timm_sdpa (goal >= 1.3x: met)")


def test_target_lines_compare_each_pair():
    from benchmarks import bench_models

    def row(provider, images_per_s, peak):
        return {"shape": "aim_600m:aim_600m:B64", "provider": provider, "images_per_s": images_per_s, "peak_gib": peak}

    lines = bench_models.target_lines([row("mimkernels", 130.0, 40.0), row("ml_aim_dense_mask", 100.0, 41.0),
                                       row("mimkernels_compiled", 100.0, 30.0),
                                       row("ml_aim_dense_mask_compiled", 100.0, 29.0)])
    assert lines == [
        "target aim_600m: mimkernels 1.30x ml_aim_dense_mask (goal >= 1.25x: met), peak 40.00 vs 41.00 GiB (met)",
        "target aim_600m: mimkernels_compiled 1.00x ml_aim_dense_mask_compiled (goal >= 1.05x: missed), "
        "peak 30.00 vs 29.00 GiB (missed)"]


def test_models_harness_times_simmim_and_beit_against_the_official_forwards():
    """The SimMIM and BEiT baselines (Conv2d, blended mask token, official losses) agree with ours: both timed."""
    from benchmarks import bench_models

    rows = bench_models.run(["simmim", "beit"], torch.float32, True, common.Peaks(1.0, 1.0), None, device="cpu",
                            configs={"simmim": ("simmim", "simmim_vit_tiny_patch8", 2),
                                     "beit": ("beit", "beit_vit_tiny_patch8", 2)})
    assert {(r.kernel, r.provider) for r in rows} == {
        ("simmim_train_step", "mimkernels"), ("simmim_train_step", "conv_blend"),
        ("simmim_train_step", "mimkernels_views"), ("simmim_train_step", "mimkernels_fused_norm"),
        ("simmim_train_step", "mimkernels_fused_mlp"), ("beit_train_step", "mimkernels"),
        ("beit_train_step", "conv_index"), ("beit_train_step", "mimkernels_views"),
        ("beit_train_step", "mimkernels_fused_norm"), ("beit_train_step", "mimkernels_fused_mlp"),
        ("beit_train_step", "mimkernels_masked_head")}


def test_models_harness_times_compiled_providers(tmp_path):
    """--compile adds <provider>_compiled for each provider (aot_eager here: no C++ toolchain needed)."""
    from benchmarks import bench_models

    rows = bench_models.run(["mae"], torch.float32, True, common.Peaks(1.0, 1.0), None, device="cpu",
                            configs={"mae": ("mae", "mae_vit_tiny_patch8", 2)}, compile_backend="aot_eager")
    assert {r.provider for r in rows} == {"mimkernels", "timm_sdpa", "mimkernels_compiled", "timm_sdpa_compiled",
                                          "mimkernels_views", "mimkernels_fused_norm", "mimkernels_fused_mlp"}
    compiled = [r.provider.endswith("_compiled") for r in rows]  # timed last: a cut GPU run has the A/B answers
    assert rows[0].provider == "mimkernels" and compiled == sorted(compiled)


def test_integrations_harness_runs_end_to_end(tmp_path):
    """Tiny timm ViT, HF ViTMAE and official MAE, patched and not, eager and compiled (aot_eager), on the CPU."""
    from benchmarks import bench_integrations

    csv_path = tmp_path / "integrations.csv"
    rows = bench_integrations.run(list(bench_integrations.SHAPES), torch.float32, True, common.Peaks(1.0, 1.0),
                                  str(csv_path), device="cpu", compile_backend="aot_eager", tiny=True)
    providers = {"unpatched", "mimkernels", "mimkernels_fused_norm", "mimkernels_fused_mlp"}
    providers |= {f"{provider}_compiled" for provider in providers}
    assert {(r.kernel, r.provider) for r in rows} == {(f"{name}_train_step", provider) for provider in providers
                                                     for name in bench_integrations.SHAPES}
    summary = (tmp_path / "integrations_summary.csv").read_text().splitlines()
    assert summary[0].startswith("shape,provider,images_per_s,peak_gib,speedup") and len(summary) == 1 + 24
    lines = bench_integrations.target_lines([{"shape": "m:B2", "provider": "mimkernels", "speedup": 0.9},
                                             {"shape": "m:B2", "provider": "mimkernels_compiled", "speedup": 1.2}])
    assert lines == ["target m:B2 mimkernels: 0.90x the unpatched model (missed)",
                     "target m:B2 mimkernels_compiled: 1.20x the unpatched model (met)"]


def test_sanitizer_cases_run(device, monkeypatch):
    """The program gpu_check.sh runs under compute-sanitizer: every case runs (here on small CPU tensors)."""
    from benchmarks import sanitizer_cases

    if device == "cpu":  # the interpreter is slow: the edge cases only, small
        monkeypatch.setattr(sanitizer_cases, "ATTENTION_CASES", [((2, 1, 19, 40), torch.float32),
                                                                 ((1, 1, 1, 16), torch.float16)])
        monkeypatch.setattr(sanitizer_cases, "NORM_CASES", [(1, 40), (260, 24)])
        monkeypatch.setattr(sanitizer_cases, "MLP_CASES", [(1, 40, 72, True, torch.float16),
                                                           (37, 24, 40, False, torch.float32)])
    with mimkernels.use_backend("triton"):
        names = [name for cases in sanitizer_cases.CASES.values() for name in cases(device)]
    token_backends = {"triton", "extension"} & set(mimkernels.available_backends())
    tma_cases = min(3, len(sanitizer_cases.ATTENTION_CASES))
    tma_mlp_cases = 2 * sum(case[-1] != torch.float32 for case in sanitizer_cases.MLP_CASES)  # two tiles each
    one_pass_token_backwards = "triton" in token_backends
    expected = (len(sanitizer_cases.ATTENTION_CASES) + tma_cases + 3 + len(token_backends) + one_pass_token_backwards
                + len(sanitizer_cases.NORM_CASES) + len(sanitizer_cases.MLP_CASES) + 3)  # 3 split-head-dim cases
    assert one_pass_token_backwards == any("one-pass backwards" in name for name in names)
    assert sum(name.startswith("split attention") for name in names) == 3
    if device == "cpu":  # the interpreter reads descriptors like Hopper: the TMA cases really ran
        assert sum(name.startswith("tma attention") and "not run" not in name for name in names) == tma_cases
        assert sum(name.endswith("+tma") for name in names) == tma_mlp_cases
    tma_mlp_ran = sum(name.endswith("+tma") for name in names)
    assert tma_mlp_ran in (tma_mlp_cases, 0)  # 0: a GPU without TMA, which says so in one line
    assert len(names) == expected + (tma_mlp_ran or 1)


def test_sanitizer_cases_refuse_an_unknown_group(capsys):
    """A group name the script does not know is refused by name (before it looks for a GPU), not silently skipped."""
    from benchmarks import sanitizer_cases

    assert sanitizer_cases.main(["norms", "nroms"]) == 2
    assert "unknown case groups ['nroms']" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("pgrep") is None or shutil.which("tar") is None, reason="needs pgrep and tar")
def test_gpu_session_runs_steps_in_order_within_its_budget(tmp_path):
    """benchmarks/gpu_session.sh with a stand-in python that only sleeps: the first step runs whole, the second is
    cut at what the budget has left (its processes too, however deep), the third is skipped, an unknown step fails
    the run; each step comes back as one archive."""
    import pathlib
    import subprocess
    import tarfile
    import time

    pause = f"3.{os.getpid()}"  # seconds: a command line no other process has
    python = tmp_path / "python"
    python.write_text(f"#!/usr/bin/env bash\nsleep {pause}\necho stand-in python \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "BUDGET_S": "9", "MIN_STEP_S": "2",
           "STEPS": "sanitizer models attention no_such_step", "MIMKERNELS_COMMIT": "abc123",
           "CARRIED_CACHE": str(tmp_path)}  # no carried compile cache: its unpack would take the budget's time
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    log = (out / "session.txt").read_text()
    assert run.returncode != 0, run.stdout
    assert "commit abc123" in log
    assert "== sanitizer: exit 0 after" in log  # gpu_env's python call, then no compute-sanitizer here
    assert "== models: exit 124 (cut at its time)" in log  # gpu_env 3 s + bench_norms 3 s > what was left
    assert "== attention: skipped" in log and "== no_such_step: unknown step" in log
    assert sorted(p.name for p in out.iterdir()) == ["models.tar.gz", "sanitizer.tar.gz", "session.txt"]
    with tarfile.open(out / "models.tar.gz") as archive:
        assert "models/console.txt" in archive.getnames() and "models/env.txt" in archive.getnames()
    for _ in range(50):  # a killed process may take a moment to go
        left = subprocess.run(["pgrep", "-f", f"sleep {pause}|{python}"], capture_output=True, text=True).stdout
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"the cut step's processes outlived it: {left.split()}"


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_gpu_session_tunes_the_stored_ds_kernels_at_the_other_shapes(tmp_path):
    """The tune_stored_ds step runs tune_attention with --sweep of the two stored-dS kernels at the shapes tuned
    before them (STORED_DS_SHAPES overrides), writing the table."""
    import pathlib
    import subprocess
    import tarfile

    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\necho stand-in python \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    for shapes, want in ((None, "n1024 vit_b mae_encoder mae_decoder vit_b_n257"), ("vit_b", "vit_b")):
        env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "BUDGET_S": "200", "STEPS": "tune_stored_ds",
               "MIMKERNELS_COMMIT": "abc123", "CARRIED_CACHE": str(tmp_path),
               **({"STORED_DS_SHAPES": shapes} if shapes else {})}
        env.pop("TRITON_INTERPRET", None)
        subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=True)
        with tarfile.open(out / "tune_stored_ds.tar.gz") as archive:
            tune_log = archive.extractfile("tune_stored_ds/tune_attention.txt").read().decode()
        assert "stand-in python -m benchmarks.tune_attention --budget-s 90 " in tune_log
        assert f"--write-table --shapes {want} --sweep backward_dkdv_ds backward_dq_from_ds" in tune_log


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_gpu_session_unpacks_a_carried_compile_cache(tmp_path):
    """Where the device call carried a compile cache (benchmarks/triton_cache.py), gpu_session.sh unpacks it before
    its steps (into session.txt: whether it fits the machine's Triton), each step's script again (a no-op the
    second time; into the step's env.txt), and ends with how many kernels the machine compiled itself."""
    import pathlib
    import subprocess
    import tarfile

    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\necho stand-in python \"$@\"\n")
    python.chmod(0o755)
    carried, out = tmp_path / "carried", tmp_path / "out"
    carried.mkdir()
    (carried / "sm90.tar.xz").write_bytes(b"")
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "BUDGET_S": "300", "STEPS": "mim_ops",
           "MIMKERNELS_COMMIT": "abc123", "CARRIED_CACHE": str(carried)}
    env.pop("TRITON_INTERPRET", None)
    subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=True)
    unpack = f"stand-in python -m benchmarks.triton_cache unpack {carried}/sm90.tar.xz"
    lines = (out / "session.txt").read_text().splitlines()
    assert lines[1] == unpack
    report = f"stand-in python -m benchmarks.triton_cache report --pack {out}/triton_cache_compiled_here.tar.xz"
    assert lines[-2] == report
    with tarfile.open(out / "mim_ops.tar.gz") as archive:
        assert unpack in archive.extractfile("mim_ops/env.txt").read().decode()


def _session_step_log(tmp_path, step: str, log_name: str) -> str:
    """What gpu_session.sh's ``step`` wrote into its ``log_name``, run with a stand-in python that prints its
    arguments: the command line each benchmark of the step got."""
    import pathlib
    import subprocess
    import tarfile

    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\necho stand-in python \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "BUDGET_S": "400", "STEPS": step,
           "MIMKERNELS_COMMIT": "abc123", "CARRIED_CACHE": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, check=True)
    with tarfile.open(out / f"{step}.tar.gz") as archive:
        return archive.extractfile(f"{step}/{log_name}").read().decode()


@pytest.mark.parametrize("step, shape", [("steps_mae", "mae_vit_l"), ("steps_aim", "aim_600m"),
                                         ("steps_mae_b64", "mae_vit_l_b64")])
def test_gpu_session_training_step_steps_time_their_shape(tmp_path, step, shape):
    """Each steps_* step of gpu_session.sh runs bench_models (eager, compiled, profiled) at its one shape."""
    from benchmarks import bench_models

    log = _session_step_log(tmp_path, step, "bench_models.txt")
    assert f"-m benchmarks.bench_models --quick --compile --profile --shapes {shape} --out" in log
    assert shape in bench_models.SHAPES


@pytest.mark.parametrize("step, shapes", [("integrations", "timm_vit_b16 hf_vit_mae_base"),
                                          ("integrations_mae", "official_mae_b16")])
def test_gpu_session_integration_steps_time_their_models(tmp_path, step, shapes):
    """gpu_session.sh's integrations steps run bench_integrations (eager and compiled) on their models: the
    timm / Hugging Face pair, or the official MAE model alone, so that each fits one device call's step budget."""
    from benchmarks import bench_integrations

    log = _session_step_log(tmp_path, step, "bench_integrations.txt")
    assert f"-m benchmarks.bench_integrations --quick --compile --shapes {shapes} --out" in log
    assert set(shapes.split()) <= set(bench_integrations.SHAPES)


def test_mlp_harness_runs_end_to_end(tmp_path):
    from benchmarks import bench_mlp
    from mimkernels.triton import mlp as mlp_kernels

    csv_path = tmp_path / "mlp.csv"
    shipped = mlp_kernels.CONFIGS[2]
    rows = bench_mlp.run(["aim_600m"], torch.float16, True, common.Peaks(1.0, 1.0), str(csv_path), device="cpu",
                         scale=64, compile_backend="aot_eager", sweep=True)
    assert mlp_kernels.CONFIGS[2] == shipped  # the sweep puts the shipped tile back
    plain = {(p, m) for p in ("torch_unfused", "torch_compiled", "mimkernels", "mimkernels_triton")
             for m in ("fwd", "fwd_bwd")}
    swept = {(f"mimkernels_triton@{bench_mlp.tile_name(c)}", "fwd_bwd") for c in mlp_kernels.CANDIDATES}
    assert {(r.provider, r.mode) for r in rows} == plain | swept
    assert len(csv_path.read_text().splitlines()) == 1 + len(rows)
    fwd = next(r for r in rows if r.mode == "fwd")
    rows_, width, hidden = 16384 // 64, 1536 // 64, 6144 // 64
    assert fwd.tflops * fwd.ms_p50 * 1e9 == pytest.approx(2 * 2 * rows_ * width * hidden, rel=1e-3)


def test_mlp_sweep_runs_each_candidate_in_forward_and_backward(monkeypatch):
    """A swept tile is the tile of both GEMM kernels its fwd_bwd row times, the backward's too (run 10's sweep put
    the shipped tile back when the forward returned, so its rows timed the candidate's forward with the shipped
    tile's backward)."""
    from benchmarks import bench_mlp
    from mimkernels.triton import mlp as mlp_kernels

    candidate = (32, 32, 32, 8, 4, 1)
    monkeypatch.setattr(mlp_kernels, "CANDIDATES", (candidate,))
    launched, launch_gemm = [], mlp_kernels._launch_gemm

    def recorded(kernel, *args):
        launched.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, tuple(mlp_kernels.CONFIGS[2])))
        return launch_gemm(kernel, *args)

    monkeypatch.setattr(mlp_kernels, "_launch_gemm", recorded)
    monkeypatch.setattr(bench_mlp, "providers", lambda compile_backend: {})  # the swept provider alone
    bench_mlp.run(["mae_vit_l"], torch.float16, True, common.Peaks(1.0, 1.0), None, device="cpu", scale=128,
                  sweep=True)
    assert {"_linear_gelu_fwd", "_matmul_gelu_grad"} == {name for name, _ in launched}
    assert {tile for _, tile in launched} == {candidate}


def test_mlp_sweep_reports_a_candidate_that_fails_and_goes_on(monkeypatch, capsys):
    """A tile that cannot run (here a block size Triton rejects; on a GPU, one that needs more shared memory than
    the GPU has) is reported and skipped; the other providers are timed."""
    from benchmarks import bench_mlp
    from mimkernels.triton import mlp as mlp_kernels

    good, bad = (32, 32, 32, 8, 4, 1), (48, 32, 32, 8, 4, 1)
    monkeypatch.setattr(mlp_kernels, "CANDIDATES", (bad, good))
    rows = bench_mlp.run(["mae_vit_l"], torch.float16, True, common.Peaks(1.0, 1.0), None, device="cpu",
                         scale=128, compile_backend="aot_eager", sweep=True)
    swept = {r.provider for r in rows if "@" in r.provider}
    assert swept == {f"mimkernels_triton@{bench_mlp.tile_name(good)}"}
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if " failed: " in line]
    assert len(failed) == 1 and f"mimkernels_triton@{bench_mlp.tile_name(bad)}" in failed[0]
    # the line gpu_check.sh reads the winner from (for bench_models --mlp-tile)
    assert f"  best tile mae_vit_l: {bench_mlp.tile_name(good)} " in out


def test_models_takes_the_mlp_tile_to_run(monkeypatch):
    """bench_models --mlp-tile puts the sweep's winner in gelu_mlp's 2-byte slot for the run; a name that is no
    tile stops it before any timing."""
    from benchmarks import bench_models
    from mimkernels.triton import mlp as mlp_kernels

    monkeypatch.setitem(mlp_kernels.CONFIGS, 2, mlp_kernels.CONFIGS[2])  # restored after the test
    argv = ["--quick", "--mlp-tile", "128x128x64g8w8s3+tma", "--shapes", "aim_600m"]
    bench_models.take_mlp_tile(argv)
    assert argv == ["--quick", "--shapes", "aim_600m"]
    assert mlp_kernels.CONFIGS[2] == mlp_kernels.GemmTile(128, 128, 64, 8, 8, 3, tma=True)
    with pytest.raises(ValueError, match="not a GEMM tile"):
        bench_models.take_mlp_tile(["--mlp-tile", "fastest"])
    with pytest.raises(SystemExit, match="needs a tile"):
        bench_models.take_mlp_tile(["--mlp-tile"])


def test_models_harness_reports_a_failing_provider_and_times_the_rest(monkeypatch, capsys):
    """An A/B provider whose new kernel fails (here gelu_mlp raising) is reported as FAILED and not timed; ours and
    the baseline still are."""
    from benchmarks import bench_models

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(mimkernels, "gelu_mlp", broken)
    rows = bench_models.run(["mae"], torch.float32, True, common.Peaks(1.0, 1.0), None, device="cpu",
                            configs={"mae": ("mae", "mae_vit_tiny_patch8", 2)})
    assert {r.provider for r in rows} == {"mimkernels", "timm_sdpa", "mimkernels_views", "mimkernels_fused_norm"}
    assert "mae mimkernels_fused_mlp: FAILED, not timed: RuntimeError: no kernel today" in capsys.readouterr().out
