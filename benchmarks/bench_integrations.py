"""Training steps of models users already run, as they are and after ``mimkernels.integrations.apply`` (GPU).

One training step = forward + loss + backward under bf16 autocast + a fused AdamW step. Two copies of each model
from one seed, timed in this process:
  unpatched    the model as its library builds it (timm's SDPA attention, HF's default attention)
  mimkernels   the same model after mimkernels.integrations.apply(model)
  mimkernels_fused_norm  ... apply(model, add_norm=True): each block's add after attention fused with its norm
               (off by default until this A/B and bench_models' measure it faster)
  mimkernels_fused_mlp   ... apply(model, gelu_mlp=True): each MLP's GELU inside its two GEMMs (likewise off)
With --compile each is also timed under torch.compile (Inductor) as ``<provider>_compiled``. Before timing,
the two losses are checked against each other on the same images (and the same noise for ViTMAE).

Models (built from their configs, nothing downloaded):
  timm_vit_b16     timm vit_base_patch16_224, cross-entropy on random labels, batch 256
  hf_vit_mae_base  transformers ViTMAEForPreTraining (the base config: ViT-B/16 encoder, 8-layer decoder), 256
  official_mae_b16 facebookresearch/mae's MaskedAutoencoderViT (mae_vit_base_patch16: the same sizes) as its
                   models_mae.py builds it from timm's PatchEmbed and Block (benchmarks/official.TimmMAE), 256

Target (issue 12): the patched model is never slower than the unpatched one, eager or compiled; printed as
met / missed, never asserted.

    python -m benchmarks.bench_integrations [--quick] [--compile] [--shapes ...] [--out DIR]
"""
from __future__ import annotations

import os
import sys

import torch

import mimkernels.integrations
from benchmarks import bench_models, common

SHAPES = {"timm_vit_b16": 256, "hf_vit_mae_base": 256, "official_mae_b16": 256}  # name -> batch
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)  # timm's arguments, for a harness test


def build(name: str, tiny: bool = False) -> torch.nn.Module:
    """The model ``name`` from its library's config; ``tiny`` shrinks it for a harness test on the CPU."""
    torch.manual_seed(0)
    if name == "timm_vit_b16":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**(TINY if tiny else {}))
    if name == "official_mae_b16":
        from benchmarks.official import TimmMAE

        return TimmMAE(**(dict(TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2) if tiny else {}))
    import transformers

    size = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2, decoder_intermediate_size=64) if tiny else {}
    return transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(norm_pix_loss=True, **size))


def loss_fn(name: str, model, images, labels, noise):
    if name == "timm_vit_b16":
        return lambda: torch.nn.functional.cross_entropy(model(images), labels)
    return lambda: model(images, noise=noise)[0]  # ViTMAE's .loss, the official model's (loss, pred, mask)[0]


def run(shapes, dtype, quick, peaks, csv_path, device="cuda", compile_backend=None, tiny=False):
    rows, summary = [], []
    for name in shapes:
        batch = 2 if tiny else SHAPES[name]
        models = {"unpatched": build(name, tiny).to(device),
                  "mimkernels": mimkernels.integrations.apply(build(name, tiny).to(device), add_norm=False,
                                                              gelu_mlp=False),
                  "mimkernels_fused_norm": mimkernels.integrations.apply(build(name, tiny).to(device), add_norm=True,
                                                                         gelu_mlp=False),
                  "mimkernels_fused_mlp": mimkernels.integrations.apply(build(name, tiny).to(device), add_norm=False,
                                                                        gelu_mlp=True)}
        size = 32 if tiny else 224
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.rand(batch, (size // (8 if tiny else 16)) ** 2, device=device)
        candidates = {}
        for provider, model in models.items():
            candidates[provider] = (model, loss_fn(name, model, images, labels, noise))
            if compile_backend:
                compiled = torch.compile(model, backend=compile_backend)
                candidates[provider + "_compiled"] = (model, loss_fn(name, compiled, images, labels, noise))
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            losses = {provider: bench_models.guarded(provider, "unpatched", bench_models.scalar_loss, fn)
                      for provider, (_, fn) in candidates.items()}
        for provider, (model, fn) in candidates.items():
            if isinstance(losses[provider], str):
                print(f"  {name} {provider}: FAILED, not timed: {losses[provider]}", flush=True)
                continue
            if abs(losses[provider] - losses["unpatched"]) > 2e-2 * abs(losses["unpatched"]) + 1e-3:
                print(f"  {name} {provider}: loss {losses[provider]:.4f} != unpatched {losses['unpatched']:.4f}; "
                      "not timed")
                continue
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
            timed = bench_models.guarded(provider, "unpatched", bench_models.time_train_step, fn, optimizer, dtype,
                                         quick, device)
            if isinstance(timed, str):
                print(f"  {name} {provider}: FAILED while timed: {timed}", flush=True)
                continue
            times, peak_gib = timed
            shape = f"{name}:B{batch}"
            rows.append(common.result(f"{name}_train_step", provider, "train_step", shape, str(dtype)[6:], times,
                                      0, 0, peaks))
            summary.append({"shape": shape, "provider": provider, "images_per_s": batch / times[0] * 1e3,
                            "peak_gib": peak_gib})
            print(f"  {shape:24s} {provider:22s} {times[0]:9.2f} ms/step {summary[-1]['images_per_s']:9.1f} img/s "
                  f"peak {peak_gib:6.2f} GiB  loss {losses[provider]:.4f}", flush=True)
        del models, candidates
    for row in summary:
        baseline = "unpatched" + ("_compiled" if row["provider"].endswith("_compiled") else "")
        theirs = next((r for r in summary if r["shape"] == row["shape"] and r["provider"] == baseline), None)
        row["speedup"] = row["images_per_s"] / theirs["images_per_s"] if theirs else float("nan")
    if csv_path:
        common.write_csv(csv_path, rows, device)
        bench_models.write_summary(os.path.join(os.path.dirname(csv_path), "integrations_summary.csv"), summary,
                                   device)
    print("\n".join(target_lines(summary)))
    return rows


def target_lines(summary) -> list[str]:
    """The patched model never slower than the unpatched one (>= 1.0x), per model and eager / compiled."""
    return [f"target {row['shape']} {row['provider']}: {row['speedup']:.2f}x the unpatched model "
            f"({'met' if row['speedup'] >= 1.0 else 'missed'})"
            for row in summary if row["provider"].startswith("mimkernels")]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    compiled = "--compile" in argv
    if compiled:
        argv.remove("--compile")
    return common.family_main(argv, "training steps of timm / Hugging Face models, patched vs unpatched", SHAPES,
                              run, "integrations.csv",
                              run_kwargs={"compile_backend": "inductor"} if compiled else None)


if __name__ == "__main__":
    sys.exit(main())
