"""Training-step throughput and peak memory of the reference models: fused vs the usual builds (GPU).

One training step = forward + backward under bf16 autocast + a fused AdamW step, on the same model object
(same parameters, same optimizer) for every provider, in this process:
  mimkernels         the model as shipped (mimkernels.models, auto backend: fused kernels)
  timm_sdpa          MAE: facebookresearch/mae's forward on timm-style blocks with SDPA (benchmarks/official.py)
  ml_aim_dense_mask  AIM: ml-aim's PrefixCausalAttention (dense [B,1,N,N] bool mask + SDPA), Conv2d patches,
                     unfused loss
  conv_blend         SimMIM: microsoft/SimMIM's ViT forward (Conv2d patches, mask token blended in, SDPA,
                     unfused masked L1)
  conv_index         BEiT: the official pre-training forward (Conv2d patches, mask token blended in, SDPA, the
                     head on x[bool_masked_pos]; random tokenizer centres)
  mimkernels_views   ours with q, k, v views of the qkv projection instead of the packed qkv_attention (an A/B
                     of the two copies per attention layer that the packed op saves)
  mimkernels_fused_norm  ours with every residual add fused with the LayerNorm after it, across blocks too
                     (mimkernels.add_layer_norm, models.vit.FUSED_ADD_NORM; off by default until this A/B measures
                     it faster)
  mimkernels_fused_mlp  ours with every MLP's GELU inside its GEMMs (mimkernels.gelu_mlp, models.vit.FUSED_GELU_MLP;
                     off by default until this A/B measures it faster)
  mimkernels_masked_head  BEiT: ours with the head on the masked patches only (``BEiT(head_on="masked")``, a
                     static masked_count() rows per sample, no sync; off by default until this A/B measures it
                     faster)
Just before it is timed, each provider's loss is checked against ours on the same images, noise, prefixes and
parameters. The eager providers are timed first, the compiled ones last (their compiles take most of a run).
With --compile each provider (not the A/B one) is also timed under torch.compile (Inductor) as
``<provider>_compiled``: the step's forward and loss compiled, backward and AdamW as usual.

Each row also gives MFU: the model's FLOPs per step (forward + backward of the official computation, counted by
``torch.utils.flop_counter`` on the meta device; the same count for every provider of a shape) over the step
time and the matmul peak measured in the same run. ``--profile`` writes ``train_step_profile.txt`` beside the
CSV: one step of each provider under the profiler, GPU time by kernel category (GEMM, attention, copies, ...),
the slowest kernels, and the kernels' share of the timed step (well under 100%: the GPU waited for the host, a
step bound by its Python and launches rather than its kernels). ``--mlp-tile T`` runs gelu_mlp (the fused-MLP
provider) with the 2-byte tile T, e.g. ``bench_mlp --sweep``'s best. Shapes: MAE ViT-L and AIM-600M at the issue's
batches (256, 64), ``mae_vit_l_b64`` at the official MAE recipe's 64 images per GPU, ViT-B MAE, SimMIM, BEiT.

Targets (issue 11): MAE ViT-L step >= 1.3x timm_sdpa eager and >= 1.1x it compiled (ours compiled), AIM-600M
>= 1.25x ml_aim_dense_mask eager and >= 1.05x compiled; peak memory no higher than the baseline's in each
pair. They are printed as met / missed, never asserted.

    python -m benchmarks.bench_models [--quick] [--compile] [--profile] [--mlp-tile T] [--shapes mae_vit_l ...]
        [--out DIR]
"""
from __future__ import annotations

import collections
import csv
import os
import re
import statistics
import sys
import time

import torch

from benchmarks import common, official
from mimkernels import models
from mimkernels import nn as mimkernels_nn
from mimkernels.models import vit

# name -> (model family, config, batch); AIM-600M at 256 images would not fit an 80 GB card with AdamW
SHAPES = {
    "mae_vit_b": ("mae", "mae_vit_base_patch16", 256),
    "mae_vit_l": ("mae", "mae_vit_large_patch16", 256),
    # the official recipe's batch per GPU (facebookresearch/mae PRETRAIN.md: 64 a GPU x 64 GPUs = 4096): a quarter
    # of the GPU work per step for the same host work, so where a step becomes host-bound first
    "mae_vit_l_b64": ("mae", "mae_vit_large_patch16", 64),
    "aim_600m": ("aim", "aim_600m", 64),
    "simmim_vit_b": ("simmim", "simmim_vit_base_patch16", 256),
    "beit_vit_b": ("beit", "beit_vit_base_patch16", 256),
}
# model family -> the provider that runs its official code path (see ``providers``)
BASELINES = {"mae": "timm_sdpa", "aim": "ml_aim_dense_mask", "simmim": "conv_blend", "beit": "conv_index"}
# (shape, ours, baseline, speedup goal)
TARGETS = (("mae_vit_l", "mimkernels", "timm_sdpa", 1.3),
           ("mae_vit_l", "mimkernels_compiled", "timm_sdpa_compiled", 1.1),
           ("aim_600m", "mimkernels", "ml_aim_dense_mask", 1.25),
           ("aim_600m", "mimkernels_compiled", "ml_aim_dense_mask_compiled", 1.05))
SUMMARY_FIELDS = ("shape", "provider", "images_per_s", "peak_gib", "speedup", "mfu", "device", "torch", "commit")

# kernel-name patterns -> category, first match wins (CUDA kernel names of cuBLAS, cuDNN, ATen, Triton)
CATEGORIES = (
    ("attn_ours", r"_prefix_causal|_bwd_row_dot"),
    ("attn_sdpa", r"flash|fmha|sdpa|efficient_attention|attention"),
    ("mim_ops_ours", r"_gather_rows|_restore_rows|_patch_embed|_masked_patch_loss"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|wgmma|addmm|\bmm\b|matmul"),
    ("layernorm", r"layer_norm|LayerNorm|GammaBeta|layernorm"),
    ("optimizer", r"multi_tensor_apply|FusedOpti|adam"),
    ("copy_index", r"copy|Cat|cat|index|gather|scatter|transpose"),
    ("inductor_fused", r"^triton_"),
    ("reduce", r"reduce|Reduce|sum"),
    ("elementwise", r"elementwise|gelu|Gelu|add|mul"),
)


def step_times(step, *, warmup: int, iters: int, device: str) -> tuple[float, float, float]:
    """p50, p20, p80 of ``iters`` training steps in ms, after ``warmup`` (one step is long: CUDA events)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            step()
            times.append((time.perf_counter() - start_s) * 1e3)
    quantiles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), quantiles[1], quantiles[7]


def train_step(loss_fn, optimizer, dtype, device: str) -> None:
    """``loss_fn()`` under autocast (off for fp32), its backward and ``optimizer.step()``."""
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_train_step(loss_fn, optimizer, dtype, quick: bool, device: str) -> tuple[tuple, float]:
    """Step times (p50, p20, p80 ms) and peak memory (GiB; NaN off CUDA) of ``train_step``."""
    def step():
        train_step(loss_fn, optimizer, dtype, device)

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = step_times(step, warmup=1 if quick else 3, iters=3 if quick else 10, device=device)
    return times, torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def model_flops(family: str, config: str, batch: int) -> float:
    """FLOPs of one training step (forward + backward) of the official computation at ``batch``, counted by
    torch's FlopCounterMode on one image on the meta device (nothing computed or allocated); BEiT's on the CPU
    (its boolean indexing has no meta kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("cpu" if family == "beit" else "meta"):
        model = models.CONFIGS[family][config](**model_kwargs(family, config))
        imgs = torch.randn(1, 3, *model.patch_embed.img_size)
        with FlopCounterMode(display=False) as counter:
            if family == "mae":
                loss = official.mae_forward(model, imgs, 0.75, torch.rand(1, model.patch_embed.num_patches))[0]
            elif family == "aim":
                loss = official.aim_forward(model, imgs, torch.tensor([model.num_patches // 2]))[0]
            else:
                mask = torch.zeros(1, model.patch_embed.num_patches)
                mask[:, ::2] = 1
                forward = official.simmim_forward if family == "simmim" else official.beit_forward
                loss = forward(model, imgs, mask)[0]
            loss.backward()
    return counter.get_total_flops() * batch


def kernel_category(name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other"


def profile_step(loss_fn, optimizer, dtype, device: str) -> tuple[dict, list]:
    """One training step under torch.profiler: (ms by kernel category, the 12 slowest kernels as (ms, name)).
    Device kernels on a GPU; on a CPU (tests) the aten ops stand in for them."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        train_step(loss_fn, optimizer, dtype, device)
        if device == "cuda":
            torch.cuda.synchronize()
    per_kernel = collections.Counter()
    for event in prof.events():
        if device == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / 1e3
        elif device != "cuda" and event.name.startswith("aten::"):
            per_kernel[event.name] += event.self_cpu_time_total / 1e3
    by_category = collections.Counter()
    for name, ms in per_kernel.items():
        by_category[kernel_category(name)] += ms
    return dict(by_category.most_common()), [(ms, name) for name, ms in per_kernel.most_common(12)]


def profile_text(title: str, by_category: dict, slowest: list, step_ms: float) -> str:
    """The profile of one step as text; ``step_ms``, the timed step (un-profiled), gives the kernels' share of it."""
    total = sum(by_category.values()) or 1.0
    lines = [f"## {title}: {total:.2f} ms of kernel time, {100 * total / step_ms:.0f}% of the {step_ms:.2f} ms step"]
    lines += [f"   {category:22s} {ms:9.2f} ms {100 * ms / total:5.1f}%" for category, ms in by_category.items()]
    lines += [f"     {ms:9.2f} ms  {name[:110]}" for ms, name in slowest]
    return "\n".join(lines) + "\n"


def model_kwargs(family: str, config: str) -> dict:
    """Per-patch normalised targets where the paper trains so (MAE, AIM); BEiT gets a tokenizer with random
    centres (its speed does not depend on what the codes mean)."""
    if family != "beit":
        return {"norm_pix_loss": family != "simmim"}
    patch, vocab = (16, 8192) if "patch16" in config else (8, 64)
    return {"tokenizer": models.KMeansTokenizer(patch, torch.randn(vocab, patch * patch * 3)), "vocab_size": vocab}


def providers(family, model, imgs, device, compile_backend=None):
    """name -> loss function of the model; MAE noise and AIM prefixes are fixed so losses compare. With
    ``compile_backend`` (e.g. "inductor") each also as ``<name>_compiled``, compiled with that backend."""
    batch = imgs.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    if family == "mae":
        noise = torch.rand(batch, model.patch_embed.num_patches, device=device, generator=gen)
        found = {"mimkernels": lambda imgs: model(imgs, 0.75, noise=noise)[0],
                 "timm_sdpa": lambda imgs: official.mae_forward(model, imgs, 0.75, noise)[0]}
    elif family == "beit":
        mask = model.random_mask(batch, generator=torch.Generator().manual_seed(0)).to(device)
        found = {"mimkernels": lambda imgs: model(imgs, mask=mask)[0],
                 "conv_index": lambda imgs: official.beit_forward(model, imgs, mask)[0]}
    elif family == "simmim":
        mask = model.random_mask(batch, device, generator=gen)
        found = {"mimkernels": lambda imgs: model(imgs, mask=mask)[0],
                 "conv_blend": lambda imgs: official.simmim_forward(model, imgs, mask)[0]}
    else:
        prefix = model.sample_prefix_len(batch, device, generator=gen)
        found = {"mimkernels": lambda imgs: model(imgs, prefix)[0],
                 "ml_aim_dense_mask": lambda imgs: official.aim_forward(model, imgs, prefix)[0]}
    if compile_backend:
        found |= {f"{name}_compiled": torch.compile(fn, backend=compile_backend) for name, fn in list(found.items())}
    found["mimkernels_views"] = with_switch(found["mimkernels"], mimkernels_nn, "PACKED_QKV", False)
    found["mimkernels_fused_norm"] = with_switch(found["mimkernels"], vit, "FUSED_ADD_NORM", True)
    found["mimkernels_fused_mlp"] = with_switch(found["mimkernels"], vit, "FUSED_GELU_MLP", True)
    if family == "beit":
        found["mimkernels_masked_head"] = with_switch(found["mimkernels"], model, "head_on", "masked")
    return {name: (lambda fn=fn: fn(imgs)) for name, fn in found.items()}


def with_switch(loss_fn, module, name: str, value: bool):
    """``loss_fn`` with the switch ``module.name`` (a module-level one, or a model's attribute) set to ``value``
    during its forward (the backward runs the graph that forward recorded)."""
    def run(imgs):
        with common.switched(module, name, value):
            return loss_fn(imgs)
    return run


def scalar_loss(loss_fn) -> float:
    return loss_fn().float().item()


def guarded(provider: str, required: str | None, call, *args):
    """``call(*args)``, or for any provider but ``required`` a line saying why it raised: one A/B provider (a new
    kernel, a compile) failing must not cost a GPU session the other providers' numbers."""
    try:
        return call(*args)
    except Exception as error:
        if provider == required:
            raise
        return f"{type(error).__name__}: {str(error)[:300]}"


def run(shapes, dtype, quick, peaks, csv_path=None, *, device="cuda", configs=None, batch=None,
        compile_backend=None, profile=False):
    """Rows in the common schema (mode ``train_step``); ``configs``/``batch`` override SHAPES (CPU tests);
    ``compile_backend`` adds the compiled providers; ``profile`` writes train_step_profile.txt beside the CSV."""
    rows, summary, profiles = [], [], []
    for name in shapes:
        family, config, shape_batch = (configs or SHAPES)[name]
        batch_size = batch or shape_batch
        torch.manual_seed(0)
        with torch.device(device):
            model = models.CONFIGS[family][config](**model_kwargs(family, config))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        imgs = torch.randn(batch_size, 3, *model.patch_embed.img_size, device=device)
        candidates = providers(family, model, imgs, device, compile_backend)
        flops = model_flops(family, config, batch_size)
        # eager providers first, the compiled ones (each a minute or more of compiling) last, so a run cut at its
        # time limit has answered the A/B questions; each loss is checked against ours just before it is timed, at
        # the parameters the steps timed so far have left (timing trains the model)
        for provider in sorted(candidates, key=lambda provider: provider.endswith("_compiled")):
            loss_fn = candidates[provider]
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                ours = scalar_loss(candidates["mimkernels"])
                loss = ours if provider == "mimkernels" else guarded(provider, None, scalar_loss, loss_fn)
            if isinstance(loss, str):
                print(f"  {name} {provider}: FAILED, not timed: {loss}", flush=True)
                continue
            if abs(loss - ours) > 2e-2 * abs(ours) + 1e-3:
                print(f"  {name} {provider}: loss {loss:.4f} != ours {ours:.4f}; not timed")
                continue
            timed = guarded(provider, "mimkernels", time_train_step, loss_fn, optimizer, dtype, quick, device)
            if isinstance(timed, str):
                print(f"  {name} {provider}: FAILED while timed: {timed}", flush=True)
                optimizer.zero_grad(set_to_none=True)
                continue
            times, peak_gib = timed
            shape = f"{name}:{config}:B{batch_size}"
            rows.append(common.result(f"{family}_train_step", provider, "train_step", shape, str(dtype)[6:], times,
                                      flops, 0, peaks))
            mfu = flops / (times[0] * 1e-3) / (peaks.tflops * 1e12)
            summary.append({"shape": shape, "provider": provider, "images_per_s": batch_size / times[0] * 1e3,
                            "peak_gib": peak_gib, "mfu": mfu})
            print(f"  {shape:40s} {provider:26s} {times[0]:9.2f} ms/step {summary[-1]['images_per_s']:9.1f} img/s "
                  f"MFU {100 * mfu:5.1f}%  peak {peak_gib:6.2f} GiB  loss {loss:.4f}", flush=True)
            if profile:
                profiles.append(profile_text(f"{shape} {provider}", *profile_step(loss_fn, optimizer, dtype, device),
                                             step_ms=times[0]))
            if csv_path:  # after every provider: a run cut at its time limit still leaves what it measured
                save_outputs(csv_path, rows, summary, profiles, device)
        del model, optimizer
    print("\n".join(target_lines(summary)))
    return rows


def save_outputs(csv_path: str, rows: list, summary: list, profiles: list, device: str) -> None:
    """The rows' CSV, models_summary.csv (each row's speedup: ours over it) and train_step_profile.txt, rewritten
    whole from what has been measured so far."""
    for row in summary:
        ours = next(r for r in summary if r["shape"] == row["shape"] and r["provider"] == "mimkernels")
        row["speedup"] = ours["images_per_s"] / row["images_per_s"]
    common.write_csv(csv_path, rows, device)
    write_summary(os.path.join(os.path.dirname(csv_path), "models_summary.csv"), summary, device)
    if profiles:
        with open(os.path.join(os.path.dirname(csv_path), "train_step_profile.txt"), "w") as f:
            f.write("\n".join(profiles))


def target_lines(summary) -> list[str]:
    lines = []
    for name, ours_name, baseline, goal in TARGETS:
        pair = {r["provider"]: r for r in summary if r["shape"].startswith(name + ":")}
        if ours_name in pair and baseline in pair:
            ours, theirs = pair[ours_name], pair[baseline]
            speed = ours["images_per_s"] / theirs["images_per_s"]
            memory_ok = not ours["peak_gib"] > theirs["peak_gib"]  # NaN (CPU) compares False
            verdict = "met" if speed >= goal else "missed"
            lines.append(f"target {name}: {ours_name} {speed:.2f}x {baseline} (goal >= {goal}x: {verdict}), peak "
                         f"{ours['peak_gib']:.2f} vs {theirs['peak_gib']:.2f} GiB ({'met' if memory_ok else 'missed'})")
    return lines


def write_summary(path, summary, device) -> None:
    provenance = {"device": common.device_name(device), "torch": torch.__version__, "commit": common.commit()}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in summary:
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()} | provenance)


def take_mlp_tile(argv: list) -> None:
    """``--mlp-tile T`` (e.g. bench_mlp --sweep's best, ``128x128x64g8w8s3+tma``): removed from ``argv``, and T put
    in gelu_mlp's 2-byte slot for this process, so the fused-MLP provider runs that tile."""
    if "--mlp-tile" not in argv:
        return
    from mimkernels.triton import mlp as mlp_kernels

    at = argv.index("--mlp-tile")
    if at + 1 >= len(argv):
        raise SystemExit("--mlp-tile needs a tile, e.g. --mlp-tile 128x128x64g8w8s3+tma")
    mlp_kernels.CONFIGS[2] = mlp_kernels.GemmTile.parse(argv.pop(at + 1))
    argv.pop(at)
    print(f"gelu_mlp 2-byte tile for this run: {mlp_kernels.CONFIGS[2]}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_kwargs = {}
    if "--compile" in argv:
        argv.remove("--compile")
        run_kwargs["compile_backend"] = "inductor"
    if "--profile" in argv:
        argv.remove("--profile")
        run_kwargs["profile"] = True
    take_mlp_tile(argv)
    return common.family_main(argv, "MAE / AIM training-step benchmark (--compile: also under torch.compile; "
                              "--profile: GPU time by kernel category; --mlp-tile T: gelu_mlp's tile)", SHAPES, run,
                              "models.csv",
                              run_kwargs=run_kwargs)


if __name__ == "__main__":
    sys.exit(main())
