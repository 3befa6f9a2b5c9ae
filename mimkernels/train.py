"""``python -m mimkernels.train {mae,aim,simmim,beit} --config NAME --data builtin|PATH --steps N``: pre-train.

One process, or many through ``torchrun --nproc-per-node K -m mimkernels.train ...`` (DistributedDataParallel:
NCCL on GPUs, gloo on CPUs; a DistributedSampler splits the data; only rank 0 writes files), or with ``--fsdp``
FSDP2 (parameters, gradients and optimizer state sharded over the ranks: models that do not fit one GPU;
``mimkernels.parallel``). ``--activation-checkpointing`` recomputes each block's activations in the backward;
``--accumulate K`` sums the gradients of K micro-batches of ``--batch-size`` per optimizer step (MAE's
``accum_iter``): a larger batch than memory holds.
AdamW with linear warmup and cosine decay (both papers' schedule), bf16 autocast on a GPU. Writes
``checkpoint.pt`` (atomically: a crash never leaves a half-written file; under ``--fsdp`` the folder
``checkpoint/``, each rank writing its shards) every ``--save-every`` steps and at the end, a reconstruction PNG
and ``loss.png`` beside it, and ``metrics.jsonl`` at every logging step; ``--resume`` continues from the
checkpoint exactly as an uninterrupted run would (data order, crops, masks and optimizer), and warns where this
run's settings differ from the checkpoint's.

``--data builtin`` trains on the photos that ship inside scikit-image (offline); a folder PATH is searched
recursively for images (flat folders and ImageNet's ``train/<class>/*.JPEG`` alike), read with Pillow. Either
way each sample goes through torchvision's RandomResizedCrop + flip + normalisation, as MAE's and AIM's.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib.util
import itertools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import mimkernels

from . import parallel
from .models import AIM, CONFIGS, BEiT, KMeansTokenizer
from .models.beit import HEAD_ON
from .ops.tokens import kept_count

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# photographs in scikit-image's skimage/data (the synthetic test patterns are left out)
BUILTIN_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
                  "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                  "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as both papers normalise
HEADER_CHECK_LIMIT = 10_000  # folders up to this size have every file's header checked before training

# per model: AdamW peak lr per `lr_batch` images (linear scaling), weight decay, betas, crop scale, mask ratio,
# per-patch normalised targets. SimMIM's from microsoft/SimMIM's ViT-B pre-training config.
DEFAULTS = {
    "mae": dict(base_lr=1.5e-4, lr_batch=256, weight_decay=0.05, betas=(0.9, 0.95), crop_scale=(0.2, 1.0),
                mask_ratio=0.75, norm_pix_loss=True),
    "aim": dict(base_lr=1e-3, lr_batch=4096, weight_decay=0.05, betas=(0.9, 0.95), crop_scale=(0.4, 1.0),
                mask_ratio=None, norm_pix_loss=True),
    "simmim": dict(base_lr=1e-4, lr_batch=512, weight_decay=0.05, betas=(0.9, 0.999), crop_scale=(0.67, 1.0),
                   mask_ratio=0.6, norm_pix_loss=False),
    "beit": dict(base_lr=1.5e-3, lr_batch=2048, weight_decay=0.05, betas=(0.9, 0.999), crop_scale=(0.08, 1.0),
                 mask_ratio=0.4, norm_pix_loss=False),
}
TOKENIZER_IMAGES = 64  # crops the BEiT CLI fits its k-means tokenizer on (keys 0..63 of the training data)


class UsageError(Exception):
    """Bad data (no images, an unreadable file) or a bad --resume: reported without a traceback."""


# ----------------------------------------------------------------------------- data


def builtin_photos() -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--data builtin reads the photos shipped with scikit-image: pip install scikit-image")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    files = [folder / name for name in BUILTIN_PHOTOS if (folder / name).is_file()]
    if not files:
        raise UsageError(f"no built-in photos found in {folder}")
    return files


def image_files(path: str) -> list[Path]:
    """Every image below ``path`` (a folder), sorted; raises UsageError when there is none."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--data {path}: no such folder (give a folder of images, or 'builtin')")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UsageError(f"--data {path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def open_rgb(path: Path):
    """The image as 8-bit RGB. 16-bit greyscale (PNG, TIFF) is scaled to 8 bits: Pillow's own conversion clips it
    (a 16-bit gradient came out 99.6% white)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            check_pixel_range(image, path)
            if image.mode.startswith("I;16") or image.mode == "I":  # "I": a 16-bit PNG in older Pillows
                pixels = (np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read image {path}: {error}") from None


def check_pixel_range(image, path: Path) -> None:
    """Raises UsageError for 32-bit integer or floating-point pixels, whose value range no header states (a PNG's
    "I" is 16-bit: older Pillows open 16-bit PNGs so)."""
    if image.mode == "F" or image.mode == "I" and image.format != "PNG":
        raise UsageError(f"image {path} has {'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels, "
                         "whose range is unknown: convert it to 8- or 16-bit")


def check_headers(files: list[Path]) -> None:
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as image:
                check_pixel_range(image, path)
                image.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UsageError(f"cannot read image {path}: {error}") from None


def augmentation(size: int, scale: tuple[float, float]):
    """MAE's and AIM's training transform in torchvision: RandomResizedCrop (bicubic, the given area scale),
    horizontal flip, ImageNet normalisation. Draws from torch's global generator."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one (seed, part, ...) tuple: randomness that depends on where a run is, not on how it
    got there (so that a resumed run draws what an uninterrupted one would)."""
    for part in parts:
        seed = (seed * 1_000_003 + part + 1) % (1 << 63)
    return seed


class CropDataset(torch.utils.data.Dataset):
    """Random resized crops of a list of images; ``length`` may exceed the number of files (each visit
    draws a new crop), so that a few photos still fill an epoch of several batches. Keys past ``length`` are
    later visits (``ResumableSampler`` hands out ``epoch * length + index``): the crop of a key depends only on
    (seed, key), the same in any worker (persistent ones too), on any rank, and after a resume."""

    def __init__(self, files: list[Path], size: int, scale: tuple[float, float], length: int, seed: int = 0):
        self.files, self.length, self.seed = files, length, seed
        self.transform = augmentation(size, scale)
        self.cache = {} if len(files) <= 256 else None  # small sets stay decoded in memory

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        path = self.files[key % self.length % len(self.files)]
        if self.cache is None:
            image = open_rgb(path)
        else:
            image = self.cache.get(path) or self.cache.setdefault(path, open_rgb(path))
        # the transform draws from the global generator of this process (a loader worker, or the main process,
        # which reseeds per step before drawing masks): seeding it here makes the crop a function of the sample
        torch.manual_seed(step_seed(self.seed, key))
        return self.transform(image)


class ResumableSampler(torch.utils.data.Sampler):
    """A DistributedSampler's indices as keys ``epoch * period + index`` (which visit of a sample this is), that
    starts its next epoch ``skip`` samples in: where a resumed run left off."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler, period: int, skip: int = 0):
        self.sampler, self.period, self.skip, self.epoch = sampler, period, skip, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self):
        skip, self.skip = self.skip, 0
        offset = self.epoch * self.period
        return (offset + index for index in itertools.islice(iter(self.sampler), skip, None))

    def __len__(self):
        return len(self.sampler)


def denormalize(imgs: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v, device=imgs.device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (imgs.float() * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------- files


def save_atomically(write, path: Path) -> None:
    """``write(file)`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``. Temporary
    files of earlier saves that were killed (no ``finally`` runs on SIGKILL or a preempted node) are deleted first:
    hidden, and as large as the checkpoint, they would fill the disk one preemption at a time."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def reconstruction_image(model, imgs: torch.Tensor, mask_ratio: float) -> np.ndarray:
    """MAE: original | masked | reconstruction (visible patches pasted back); AIM: original | prediction
    (the first quarter of the patches is the prefix and shown as is). uint8 [rows*H, panels*W, 3]."""
    patch = model.patch_embed.patch_size
    target = mimkernels.patchify(imgs.float(), patch)
    grid_h, grid_w = model.patch_embed.grid_size
    with torch.no_grad():
        if isinstance(model, BEiT):  # original | masked | masked patches tinted green (right code) or red
            _, logits, masked = model(imgs, mask_ratio)
            right = (model.patch_predictions(logits, masked, mask_ratio) == model.tokenizer(imgs)).float()
            tint = torch.stack([1 - right, right, torch.zeros_like(right)], -1).repeat(1, 1, patch * patch)
            tint = (tint - torch.tensor(MEAN, device=imgs.device).repeat(patch * patch)) \
                / torch.tensor(STD, device=imgs.device).repeat(patch * patch)
            masked = masked.unsqueeze(-1).expand_as(target)
            panels = [imgs.float(), mimkernels.unpatchify(target * (1 - masked) - 10 * masked, patch, grid_h, grid_w),
                      mimkernels.unpatchify(target * (1 - masked) + (0.5 * target + 0.5 * tint) * masked, patch,
                                            grid_h, grid_w)]
            return image_grid(panels, imgs.shape)
        if isinstance(model, AIM):
            prefix = model.num_patches // 4
            pred = model(imgs, prefix)[1].float()
            shown = (torch.arange(model.num_patches, device=imgs.device) >= prefix).float().expand(imgs.shape[0], -1)
        else:
            _, pred, shown = model(imgs, mask_ratio)
            pred = pred.float()
    if model.norm_pix_loss:  # predictions are in per-patch normalised pixels: use the target's statistics
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    shown = shown.unsqueeze(-1).expand_as(target)
    pasted = mimkernels.unpatchify(target * (1 - shown) + pred * shown, patch, grid_h, grid_w)
    panels = [imgs.float(), pasted]
    if not isinstance(model, AIM):  # removed patches drawn black
        panels.insert(1, mimkernels.unpatchify(target * (1 - shown) - 10 * shown, patch, grid_h, grid_w))
    return image_grid(panels, imgs.shape)


def image_grid(panels: list[torch.Tensor], shape) -> np.ndarray:
    """Normalised image batches side by side, one row per image, as uint8 [rows*H, panels*W, 3]."""
    grid = torch.cat([torch.cat([denormalize(p)[i] for p in panels], dim=2) for i in range(shape[0])], dim=1)
    scale = max(1, 256 // shape[-1])  # small demo images are shown enlarged
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    save_atomically(lambda file: Image.fromarray(pixels).save(file, format="PNG"), path)


# ----------------------------------------------------------------------------- training


@dataclass
class Summary:
    """What a run did: losses at the first and last logging points, throughput, files written."""

    model: str
    config: str
    steps: int
    first_loss: float
    last_loss: float
    images_per_s: float
    checkpoint: Path | None
    reconstruction: Path | None
    metrics: Path | None = None
    loss_plot: Path | None = None

    def lines(self) -> list[str]:
        lines = [f"{self.model} {self.config}: {self.steps} steps, loss {self.first_loss:.4f} -> "
                 f"{self.last_loss:.4f}, {self.images_per_s:,.1f} images/s",
                 f"  checkpoint      {self.checkpoint}", f"  reconstruction  {self.reconstruction}"]
        lines += [f"  metrics         {self.metrics}"] if self.metrics else []
        return lines + ([f"  loss curve      {self.loss_plot}"] if self.loss_plot else [])


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then half-cosine decay to ``min_lr``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay: float):
    """No weight decay for biases, norms and tokens (1-D parameters and the [1, 1, D] tokens), as MAE."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith("token") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Progress:
    """tqdm's bar on rank 0 (loss, images/s, lr as its postfix), updated at each logging step; nothing elsewhere."""

    def __init__(self, label: str, total: int, start: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc=label, unit="step", disable=not enabled,
                        dynamic_ncols=True, file=sys.stdout)
        self.step = start

    def update(self, step: int, loss: float, images_per_s: float, lr: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, {images_per_s:,.1f} img/s, lr {lr:.2e}", refresh=False)
        self.bar.update(step - self.step)
        self.step = step

    def close(self) -> None:
        self.bar.close()


def replicas_in_sync(model) -> bool:
    """True when every rank holds the same parameters (compares per-tensor float64 sums across ranks)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default, or there is none."""

    def _get_help_string(self, action):
        unsaid = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in (action.help or "") or unsaid:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mimkernels.train", description=__doc__.split("\n")[0],
                                     formatter_class=_HelpWithDefaults)
    parser.add_argument("model", choices=sorted(CONFIGS))
    parser.add_argument("--config", help="model config, default the tiny one; " + "; ".join(
        f"{family}: {', '.join(configs)}" for family, configs in CONFIGS.items()))
    parser.add_argument("--data", default="builtin", help="'builtin' (scikit-image's photos) or a folder of images")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all (resumed runs included)")
    parser.add_argument("--stop-at", type=int, help="end this run at this step (with a checkpoint), the schedule "
                        "still planned for --steps: continue later with --resume (e.g. under a job time limit)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process and forward pass")
    parser.add_argument("--accumulate", type=int, default=1, metavar="K",
                        help="micro-batches of --batch-size per optimizer step, their gradients summed (each loss "
                        "divided by K, as MAE's accum_iter): K times the batch in the memory of one; the global "
                        "batch is batch-size x K x ranks")
    parser.add_argument("--lr", type=float, help="peak lr; default (global batch, linear scaling): " + ", ".join(
        f"{family} {d['base_lr']:g} x batch/{d['lr_batch']}" for family, d in DEFAULTS.items()))
    parser.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine decay")
    parser.add_argument("--warmup-steps", type=int, help="at most --steps; default 5%% of --steps")
    parser.add_argument("--weight-decay", type=float, help="AdamW's, on weights (not biases, norms, tokens); default: "
                        + ", ".join(f"{family} {d['weight_decay']:g}" for family, d in DEFAULTS.items()))
    parser.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (default: no clipping)")
    parser.add_argument("--mask-ratio", type=float, help="MAE (default 0.75), SimMIM (0.6), BEiT (0.4)")
    parser.add_argument("--vocab-size", type=int, default=None, help="BEiT: visual tokens of the k-means "
                        "tokenizer fitted at the start (default 64 for the tiny config, 8192 for ViT-B)")
    parser.add_argument("--beit-head", choices=HEAD_ON, help="BEiT: the patches its head runs on "
                        "(masked: only as many as a mask covers, BEiT's own work; all: every patch, the default "
                        "until a GPU measures masked faster)")
    parser.add_argument("--norm-pix-loss", dest="norm_pix_loss", action="store_true", default=None,
                        help="predict per-patch normalised pixels (default for MAE and AIM)")
    parser.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                        help="predict the (ImageNet-normalised) pixels themselves (default for SimMIM)")
    parser.add_argument("--img-size", type=int, help="default: the config's")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 autocast on a GPU, fp32 on a CPU")
    parser.add_argument("--compile", nargs="?", const="inductor", default="auto", metavar="BACKEND",
                        help="run the model's forward under torch.compile(fullgraph=True) with BACKEND (inductor if "
                             "none is named). Default: inductor on a GPU, where a compile error falls back to "
                             "eager with a warning; off on a CPU. A backend named here never falls back")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=None,
                        help="run eagerly")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over "
                        "the ranks (FSDP2, one unit per block; under torchrun); checkpoints become sharded folders "
                        "(OUT/checkpoint/) and --compile compiles each block")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block's "
                        "activations in the backward instead of keeping them (about one more forward)")
    parser.add_argument("--backend", choices=mimkernels._backend.BACKENDS + tuple(mimkernels._backend.RENAMED),
                        help="mimkernels backend (default: MIMKERNELS_BACKEND or auto); extension runs only the token "
                        "ops, so the models need one of the others")
    parser.add_argument("--out", default="runs/train", help="folder for checkpoint.pt and the PNGs")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", nargs="?", const="auto", help="continue from a checkpoint (default "
                        "OUT/checkpoint.pt)")
    parser.add_argument("--log-every", type=int, default=10,
                        help="steps between logged metrics (metrics.jsonl, the progress bar)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes per rank")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and the masks")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--tensorboard", action="store_true", help="also write metrics.jsonl's scalars as "
                        "TensorBoard events in --out (needs the tensorboard package)")
    args = parser.parse_args(argv)
    args.config = args.config or next(iter(CONFIGS[args.model]))
    if args.config not in CONFIGS[args.model]:
        parser.error(f"--config {args.config} is not a {args.model} config; choose from "
                     f"{', '.join(CONFIGS[args.model])}")
    for name in ("steps", "batch_size", "log_every", "accumulate"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        parser.error(f"--stop-at must lie in [1, --steps = {args.steps}], got {args.stop_at}")
    # options of other families: refused, not ignored (a run would not be what its command line says)
    for name, families in (("mask_ratio", ("mae", "simmim", "beit")), ("vocab_size", ("beit",)),
                           ("beit_head", ("beit",))):
        if getattr(args, name) is not None and args.model not in families:
            parser.error(f"--{name.replace('_', '-')} does not apply to {args.model} (only to {', '.join(families)})")
    if args.img_size is not None and args.img_size < 1:
        parser.error(f"--img-size must be >= 1, got {args.img_size}")
    args.beit_head = args.beit_head or "all"
    if args.vocab_size is None:
        args.vocab_size = 8192 if args.config == "beit_vit_base_patch16" else 64
    if args.vocab_size < 2:
        parser.error("--vocab-size must be >= 2")
    for name in ("mask_ratio", "norm_pix_loss"):
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[args.model][name])
    # every family's loss covers only the masked patches: a ratio of 0 trained on a loss of 0 (MAE's op returns 0
    # for an empty mask), AdamW's weight decay alone moving the weights
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        parser.error(f"--mask-ratio must lie in (0, 1): the loss covers only masked patches, got {args.mask_ratio}")
    try:  # the environment read as the ops read it (normalised, old names mapped)
        backend = mimkernels._backend.current_backend() if args.backend is None else args.backend
    except ValueError as error:  # a MIMKERNELS_BACKEND that names no backend
        parser.error(str(error))
    if mimkernels._backend.RENAMED.get(backend, backend) == "extension":  # else a traceback at the first forward
        parser.error("the extension backend (--backend or MIMKERNELS_BACKEND) has only the token ops, and every "
                     "model also needs patch embedding and attention: use auto (the extension's token ops on a GPU "
                     "it has code for, Triton for the rest), triton or torch")
    # a name torch.compile does not know was its InvalidBackend, a traceback after the model was built
    if args.compile not in (None, "auto"):
        import torch._dynamo

        if args.compile not in torch._dynamo.list_backends(exclude_tags=()):
            parser.error(f"--compile {args.compile}: torch.compile has no such backend; choose one of "
                         f"{', '.join(torch._dynamo.list_backends())} or a debugging one such as aot_eager or eager")
    if args.fsdp and "RANK" not in os.environ:
        parser.error("--fsdp runs under torchrun (torchrun --nproc-per-node K -m mimkernels.train ... --fsdp)")
    if args.save_every < 0 or args.workers < 0 or (args.warmup_steps is not None and args.warmup_steps < 0):
        parser.error("--save-every, --workers and --warmup-steps must be >= 0")
    if args.warmup_steps is not None and args.warmup_steps > args.steps:  # the lr would never reach --lr
        parser.error(f"--warmup-steps {args.warmup_steps} is more than --steps {args.steps}: the learning rate would "
                     "never reach its peak")
    for name in ("lr", "min_lr", "weight_decay"):  # finite: nan < 0 is False
        value = getattr(args, name)
        if value is not None and not 0 <= value < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.clip_grad is not None and not 0 < args.clip_grad < math.inf:
        parser.error(f"--clip-grad must be a finite number > 0, got {args.clip_grad}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # found before a model is built, not after
        parser.error(f"--out {args.out} is a file; give a folder (it is created if missing)")
    return args


def fit_tokenizer(args, files: list[Path], device) -> KMeansTokenizer:
    """BEiT's visual tokens for the CLI: k-means (``--vocab-size`` centres) of the patches of the training data's
    first TOKENIZER_IMAGES crops, the same on every rank. A stand-in: BEiT's own tokenizers need downloads."""
    with torch.device("meta"):
        probe = build_model(args)
    dataset = CropDataset(files, probe.patch_embed.img_size[0], DEFAULTS["beit"]["crop_scale"],
                          length=TOKENIZER_IMAGES, seed=args.seed)
    imgs = torch.stack([dataset[key] for key in range(TOKENIZER_IMAGES)]).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        return KMeansTokenizer.fit(imgs, probe.patch_embed.patch_size, args.vocab_size, generator=generator)
    except ValueError as error:
        raise UsageError(f"--vocab-size: {error}") from None


def build_model(args, tokenizer=None) -> torch.nn.Module:
    kwargs = {"norm_pix_loss": args.norm_pix_loss}
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.model == "beit":
        kwargs.update(tokenizer=tokenizer or nn.Identity(), vocab_size=args.vocab_size, head_on=args.beit_head)
    try:
        model = CONFIGS[args.model][args.config](**kwargs)
    except ValueError as error:  # e.g. an --img-size the patch size does not divide
        raise UsageError(f"{args.config}: {error}") from None
    try:  # whether the ratio keeps (MAE) or masks (BEiT) some patches of this grid, before training
        if args.model == "beit":
            model.masked_count(args.mask_ratio)
        elif args.model == "mae":
            num_patches = model.patch_embed.num_patches
            if kept_count(args.mask_ratio, num_patches) == num_patches:  # a ratio so small it rounds to no patch
                raise ValueError(f"mask_ratio={args.mask_ratio} masks no patch out of {num_patches}")
    except ValueError as error:
        raise UsageError(f"--mask-ratio {args.mask_ratio}: {error}") from None
    return model


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logging step (step, loss, lr, images/s, grad norm, peak memory,
    seconds since this process started training). A resumed run keeps the lines up to its checkpoint's step.
    With ``tensorboard`` the same scalars also go to TensorBoard event files in the same folder."""

    def __init__(self, path: Path, start: int, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled, self.started = path, enabled, time.perf_counter()
        self.board = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.board = SummaryWriter(str(path.parent), purge_step=start + 1 if start else None)
        kept = [row for row in read_metrics(path) if row["step"] <= start] if start and path.is_file() else []
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def write(self, **values) -> None:
        if self.enabled:
            values["elapsed_s"] = round(time.perf_counter() - self.started, 3)
            with open(self.path, "a") as file:
                file.write(json.dumps(values) + "\n")
            if self.board is not None:
                for name, value in values.items():
                    if name != "step" and value is not None:
                        self.board.add_scalar(f"train/{name}", value, values["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``, skipping lines that are not a JSON row with a step: a run killed while
    appending one leaves a partial last line, which must not stop its ``--resume`` (nor the loss plot)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def plot_metrics(metrics_path: Path, png_path: Path) -> bool:
    """``loss.png``: the loss (log scale) and the learning rate over the steps; False where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return False
    steps = [row["step"] for row in rows]
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(steps, [row["loss"] for row in rows], color="tab:blue")
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [row["lr"] for row in rows], color="tab:orange", alpha=0.6)
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    figure.tight_layout()
    save_atomically(lambda file: figure.savefig(file, format="png", dpi=100), png_path)
    plt.close(figure)
    return True


class Meter:
    """Mean loss and images/s over the steps since the last report (reading the loss waits for the device,
    so it happens only at report time)."""

    def __init__(self, device, images_per_step: int):
        self.images_per_step = images_per_step
        self.loss_sum, self.steps, self.start = torch.zeros((), device=device), 0, time.perf_counter()
        self.losses, self.rates = [], []

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.steps += 1

    def report(self, final: bool) -> tuple[float, float]:
        loss = self.loss_sum.item() / self.steps
        rate = self.steps * self.images_per_step / (time.perf_counter() - self.start)
        self.losses.append(loss)
        if len(self.losses) > 1 or final:  # the first window holds the warm-up (allocations, autotuning)
            self.rates.append(rate)
        self.loss_sum.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return loss, rate


def resume(args, model, optimizer, checkpoint_path: Path, device) -> dict:
    """Load ``--resume``'s checkpoint into model and optimizer; returns what it was saved with (``step``, ``args``,
    ...). Under ``--fsdp`` the checkpoint is a sharded folder (every rank loads its shards), else one file."""
    path = checkpoint_path if args.resume == "auto" else Path(args.resume)
    if args.fsdp:
        parallel.finish_interrupted_save(path)  # a run killed while it swapped its new checkpoint in
        if not path.is_dir():
            raise UsageError(f"--resume: no sharded checkpoint folder at {path} (an --fsdp run resumes from the "
                             "checkpoint/ folder that an --fsdp run wrote)")
        try:
            check_resumable(parallel.read_meta(path), path, args)
        except FileNotFoundError as error:
            raise UsageError(f"--resume: {error}") from None
        return parallel.load_sharded(path, model, optimizer)
    if path.is_dir():
        raise UsageError(f"--resume: {path} is a sharded checkpoint of an --fsdp run: resume it with --fsdp, or "
                         "convert it to one file with torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location=device, weights_only=False)
    check_resumable(state, path, args)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return {name: value for name, value in state.items() if name not in ("model", "optimizer")}


def check_resumable(meta: dict, path: Path, args) -> None:
    """Raises UsageError unless the checkpoint (its model, config and step) can continue this run."""
    if (meta["model_name"], meta["config"]) != (args.model, args.config):
        raise UsageError(f"--resume: {path} holds {meta['model_name']} {meta['config']}, "
                         f"not {args.model} {args.config}")
    if meta["step"] >= min(args.steps, args.stop_at or args.steps):
        raise UsageError(f"--resume: {path} is at step {meta['step']} already; ask for more --steps")


# the options that change what a run computes (--steps too, but more steps is how a run is extended)
RUN_DEFINING_OPTIONS = ("data", "img_size", "batch_size", "accumulate", "seed", "lr", "min_lr", "warmup_steps",
                        "weight_decay", "clip_grad", "mask_ratio", "norm_pix_loss", "vocab_size", "precision")


def changed_settings(meta: dict, args, world: int) -> list[str]:
    """This run's options that differ from those its checkpoint was trained with, as ``--name new (checkpoint:
    old)``: a resumed run continues as the uninterrupted one would only where there are none."""
    saved = meta.get("args", {})
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (checkpoint: {saved[name]})"
               for name in RUN_DEFINING_OPTIONS if name in saved and not same_setting(name, getattr(args, name),
                                                                                     saved[name])]
    if meta.get("world", world) != world:  # checkpoints before 2026-12-02 did not record it
        changed.append(f"{world} rank{'s' * (world > 1)} (checkpoint: {meta['world']})")
    return changed


def same_setting(name: str, value, saved) -> bool:
    if name == "data" and "builtin" not in (value, saved):  # one folder, however it was written
        return os.path.abspath(value) == os.path.abspath(saved)
    return value == saved


def train(args, rank: int = 0, world: int = 1, device: torch.device | None = None) -> Summary:
    """The training loop of one process (rank ``rank`` of ``world``, process group already set up)."""
    device = device or torch.device("cpu")
    files = builtin_photos() if args.data == "builtin" else image_files(args.data)
    if len(files) <= HEADER_CHECK_LIMIT:
        check_headers(files)
    tokenizer = fit_tokenizer(args, files, device) if args.model == "beit" else None
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    with torch.device(device):  # initialised where it trains: no host copy of billions of parameters
        model = build_model(args, tokenizer)
    compile_backend = default_compile_backend(device) if args.compile == "auto" else args.compile
    if args.activation_checkpointing:
        parallel.checkpoint_activations(model)
    if args.fsdp:  # blocks compiled one by one, FSDP's hooks around them (parallel.py says why)
        # MAE's pred and SimMIM's mask are views (as in the official code); this loop changes no output in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        if compile_backend:
            parallel.compile_blocks(model, compile_backend)
        parallel.shard(model)  # before the optimizer: it must hold the sharded parameters
    defaults = DEFAULTS[args.model]
    global_batch = args.batch_size * args.accumulate * world
    peak_lr = args.lr if args.lr is not None else defaults["base_lr"] * global_batch / defaults["lr_batch"]
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    weight_decay = args.weight_decay if args.weight_decay is not None else defaults["weight_decay"]
    # fused: one kernel per step for all parameters on a GPU (bench_models times the same); FSDP's sharded
    # parameters keep torch's default (foreach), the path FSDP2 is tested with
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=peak_lr, betas=defaults["betas"],
                                  fused=device.type == "cuda" and not args.fsdp or None)
    out = Path(args.out)
    checkpoint_path = out / ("checkpoint" if args.fsdp else "checkpoint.pt")
    meta = resume(args, model, optimizer, checkpoint_path, device) if args.resume else {"step": 0}
    start = meta["step"]
    changed = changed_settings(meta, args, world)
    if changed and rank == 0:
        print("warning: --resume: this run differs from the checkpoint's in " + ", ".join(changed)
              + "; it continues from the checkpoint, but not as the run that wrote it would have", file=sys.stderr)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    dataset = CropDataset(files, model.patch_embed.img_size[0], defaults["crop_scale"],
                          length=max(len(files), 8 * global_batch), seed=args.seed)
    order = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                seed=args.seed, drop_last=True)
    per_step = args.batch_size * args.accumulate  # samples per rank and optimizer step
    steps_per_epoch = len(order) // per_step
    sampler = ResumableSampler(order, len(dataset), skip=start % steps_per_epoch * per_step)  # exact resume
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    metrics = MetricsLog(out / "metrics.jsonl", start, enabled=rank == 0, tensorboard=args.tensorboard)
    compiled = bool(compile_backend)
    wrapped = model
    if compiled and not args.fsdp:
        # compiled before DDP wraps it: DDP's forward calls the compiled model, whose graph Dynamo's DDPOptimizer
        # splits at DDP's gradient buckets (their all-reduces overlap the backward). Compiling the DDP wrapper
        # instead fails with fullgraph: its forward calls a Python logger that Dynamo does not trace.
        wrapped = torch.compile(model, fullgraph=True, backend=compile_backend)
    if world > 1 and not args.fsdp:
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=None if device.index is None
                                                            else [device.index])
    no_sync = gradient_sync_off(wrapped, args.fsdp)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    progress = Progress(f"{args.model} {args.config}", args.steps, start, enabled=rank == 0 and not args.quiet)
    meter = Meter(device, global_batch)
    viz, step, epoch = None, start, start // steps_per_epoch
    with mimkernels.use_backend(args.backend) if args.backend else contextlib.nullcontext():
        model.train()
        stop = args.stop_at or args.steps  # the schedule is planned for --steps either way
        while step < stop:
            sampler.set_epoch(epoch)
            # K micro-batches per step; an epoch's last few that make no whole step are left out
            for micro_batches in itertools.islice(zip(*[iter(loader)] * args.accumulate), stop - step):
                # masks and prefixes: a function of the step (the micro-batches draw one after another, so K
                # micro-batches of B draw what one batch of K * B would)
                torch.manual_seed(step_seed(args.seed, rank, step))
                micro_batches = [imgs.to(device, non_blocking=True) for imgs in micro_batches]
                viz = micro_batches[0][:4].clone() if viz is None else viz
                lr = lr_at(step, args.steps, warmup, peak_lr, args.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                try:
                    loss = forward_backward(wrapped, micro_batches, args, optimizer, device, bf16, no_sync)
                except torch._dynamo.exc.TorchDynamoException as error:
                    if not compiled or args.compile != "auto" or step > start:
                        raise
                    print(f"warning: torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
                          "training eagerly (--no-compile skips compiling)", file=sys.stderr)
                    if args.fsdp:
                        parallel.compile_blocks(model, None)
                    elif isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                        wrapped.module = model  # the same parameters: DDP's hooks on them stay
                    else:
                        wrapped = model
                    compiled = False
                    loss = forward_backward(wrapped, micro_batches, args, optimizer, device, bf16, no_sync)
                logging = (step + 1) % args.log_every == 0 or step + 1 == stop
                grad_norm = None
                if args.clip_grad:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                elif logging:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                               if p.grad is not None])
                optimizer.step()
                step += 1
                meter.add(loss)
                if logging:
                    mean_loss, images_per_s = meter.report(final=step == stop)
                    progress.update(step, mean_loss, images_per_s, lr)
                    metrics.write(step=step, loss=mean_loss, lr=lr, images_per_s=images_per_s,
                                  grad_norm=full_float(grad_norm), peak_memory_gib=peak_memory_gib(device))
                if (args.save_every and step % args.save_every == 0) or step == stop:
                    save_checkpoint(model, optimizer, args, step, rank, world, checkpoint_path, viz)
                    if rank == 0:
                        plot_metrics(metrics.path, out / "loss.png")
            epoch += 1
    progress.close()
    metrics.close()
    if world > 1 and not args.fsdp and not replicas_in_sync(model):
        raise RuntimeError("parameters differ across ranks after training")
    loss_plot = out / "loss.png"
    return Summary(args.model, args.config, stop - start, meter.losses[0], meter.losses[-1],
                   float(np.median(meter.rates)), checkpoint_path if rank == 0 else None,
                   out / "reconstruction.png" if rank == 0 else None, metrics.path if rank == 0 else None,
                   loss_plot if rank == 0 and loss_plot.is_file() else None)


def default_compile_backend(device: torch.device) -> str | None:
    """What ``--compile`` defaults to: Inductor on a GPU; nothing on a CPU (the Triton kernels run interpreted there,
    and Inductor would need a C++ toolchain for the rest)."""
    return "inductor" if device.type == "cuda" else None


def forward_backward(model, micro_batches, args, optimizer, device, bf16: bool,
                     no_sync=contextlib.nullcontext) -> torch.Tensor:
    """The mean loss of one step's micro-batches, with the gradient of that mean in the parameters (cleared first).
    ``no_sync()``: a context in which a backward leaves the ranks' gradients unreduced (all but the last
    micro-batch's: the reduction runs once per step, over the summed gradients)."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index, imgs in enumerate(micro_batches):
        with no_sync() if index < len(micro_batches) - 1 else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = (model(imgs) if args.model == "aim" else model(imgs, args.mask_ratio))[0]
            (loss / len(micro_batches)).backward()  # exact for one micro-batch: x / 1 == x
        total = total + loss.detach()
    return total / len(micro_batches)


def gradient_sync_off(model, fsdp: bool):
    """A context factory under which backwards accumulate gradients without reducing them over the ranks: DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)`` (every unit), or nothing on one process."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync
    if not fsdp:
        return contextlib.nullcontext

    @contextlib.contextmanager
    def unsynced():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return unsynced


def full_float(value) -> float:
    """A scalar tensor as a float; a DTensor's (FSDP's gradient norms) after reducing it over the ranks."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def save_checkpoint(model, optimizer, args, step, rank, world, path: Path, viz) -> None:
    """The checkpoint and the reconstruction PNG. Without FSDP rank 0 alone writes both (the model is the same on
    every rank); with FSDP every rank writes its shards and runs the PNG's forward (its all-gathers need every
    rank), and rank 0 writes the PNG."""
    meta = {"step": step, "model_name": args.model, "config": args.config, "args": vars(args), "world": world}
    if args.fsdp:
        parallel.save_sharded(path, model, optimizer, meta)
    elif rank == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}
        save_atomically(lambda file: torch.save(state, file), path)
    if rank == 0 or args.fsdp:
        model.eval()
        pixels = reconstruction_image(model, viz, args.mask_ratio)
        model.train()
        if rank == 0:
            save_png(pixels, path.with_name("reconstruction.png"))


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 or args.fsdp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        summary = train(args, rank, world, device)
        # A gloo worker thread that releases a finished collective's tensors while Python shuts down aborts the
        # process ("terminate called without an active exception"). So every rank's work is done first (the
        # barrier waits for all earlier collectives), and the group is torn down below while Python is alive.
        if dist.is_initialized():
            dist.barrier()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            # DDP's reference cycles would keep the group (and gloo's threads) alive past destroy_process_group
            # until interpreter exit; collected first, they don't. (Under FSDP torch's DTensor caches keep it.)
            gc.collect()
            dist.destroy_process_group()
    if rank == 0:
        print("\n".join(summary.lines()))
        if args.fsdp:
            print(f"  parameters, gradients and optimizer state sharded over {world} rank{'s' * (world > 1)} (FSDP2)")
        elif world > 1:
            print(f"  parameters identical on all {world} ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
