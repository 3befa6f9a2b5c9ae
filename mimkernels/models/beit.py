"""BEiT-style pre-training (Bao et al., ICLR'22): masked image modelling over visual tokens, on mimkernels' ops.

A ViT encoder sees every patch, the masked ones replaced by a learnable mask token (inside the
patch-embedding GEMM on the fused path); a linear head over the visual vocabulary predicts each masked
patch's token, and the loss is the cross-entropy on masked positions only. Masks are BEiT's block-wise ones
(``beit_block_mask``: blocks of at least 16 patches, aspect ratio 0.3 to 1/0.3, about 40% of the patches).

The visual tokens come from a tokenizer passed in: any module mapping images ``[B, 3, H, W]`` to integer codes
``[B, L]``, one per patch. BEiT's own tokenizers (DALL-E's dVAE, BEiT v2's VQ-KD) are the real thing and
need downloaded weights; ``KMeansTokenizer`` is a small stand-in that needs none: k-means codes of
per-patch-normalised pixels, fitted on whatever images it is given (the CLI fits it on the training data's
first crops). Positions are fixed 2-D sin-cos embeddings (BEiT uses relative position biases, which our
attention kernels do not take). The head runs with no host sync (the official code indexes ``x[bool_masked_pos]``,
whose size the host must read): by default over every patch, the unmasked ones weighted 0 in the loss; with
``head_on="masked"`` over a static ``masked_count()`` patches per sample, the masked ones first, which is
BEiT's own work (about 40% of the patches) at a shape the compiler knows.
"""
from __future__ import annotations

import math
import numbers
import random
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mimkernels

from .._custom_ops import custom_op_when_compiling
from ..ops._checks import CHECK_CUDA_INDICES, is_int
from ..reference import mask_denominator
from .vit import MaskTokenViT


def beit_block_mask(batch: int, grid: int, count: int, *, min_block: int = 16, min_aspect: float = 0.3,
                    generator=None) -> torch.Tensor:
    """BEiT's block-wise masking: ``[batch, grid * grid]`` float, 1 = masked, about ``count`` patches per sample.

    Rectangles of ``min_block`` to ``count - masked so far`` patches, aspect ratio log-uniform in
    ``[min_aspect, 1 / min_aspect]``, are placed at random until ``count`` patches are masked or ten tries in a
    row add nothing (BEiT's ``MaskingGenerator``; a sample can end a few patches short, never over). The draws
    come from ``generator`` or torch's default CPU generator; the mask is made on the host, on the CPU. Under
    torch.compile (without ``generator``) it is one opaque op in the graph, so a forward that draws its own masks
    compiles with ``fullgraph=True``.
    """
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count < grid * grid:
        raise ValueError(f"count must be an int in (0, {grid * grid}), got {count!r}")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must lie in (0, 1], got {min_aspect}")
    if generator is None:
        return _block_masks_from_torch_seed(batch, grid, count, min_block, float(min_aspect))
    return _block_masks(batch, grid, count, min_block, min_aspect, _seed(generator))


def _seed(generator) -> int:
    """A seed for Python's generator, drawn from torch's CPU generator (or the one given) whatever
    torch.set_default_device says: no GPU sync."""
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def _no_masks_yet(batch, grid, count, min_block, min_aspect):
    return torch.empty(batch, grid * grid, dtype=torch.float32, device="cpu")


# Dynamo cannot trace the draws below (Python's and NumPy's generators, a data-dependent seed); as a custom op the
# draw is one node of the graph, tagged random so that no compiler merges two draws or replays one
@custom_op_when_compiling("beit_block_mask", "(SymInt batch, int grid, int count, int min_block, float min_aspect) -> "
                          "Tensor", _no_masks_yet, tags=(torch.Tag.nondeterministic_seeded,))
def _block_masks_from_torch_seed(batch: int, grid: int, count: int, min_block: int, min_aspect: float) -> torch.Tensor:
    return _block_masks(batch, grid, count, min_block, min_aspect, _seed(None))


def _block_masks(batch: int, grid: int, count: int, min_block: int, min_aspect: float, seed: int) -> torch.Tensor:
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    # Python's generator and a NumPy mask: this loop makes thousands of scalar draws and window sums per batch:
    # 171 ms -> 25 ms for 256 ViT-B masks on the 2-core test machine (tensor ops before)
    rng = random.Random(seed)

    masks = np.zeros((batch, grid, grid), dtype=np.float32)  # filled on the host, a window at a time
    for mask in masks:
        masked = 0
        while masked < count:
            budget = count - masked
            added = 0
            for _ in range(10):
                area = rng.uniform(min_block, budget)  # between the two, whichever is larger (as BEiT's)
                aspect = math.exp(rng.uniform(*log_aspect))
                height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if not (0 < height < grid and 0 < width < grid):
                    continue
                top, left = rng.randint(0, grid - height), rng.randint(0, grid - width)
                window = mask[top:top + height, left:left + width]
                new = height * width - int(window.sum())
                if 0 < new <= budget:
                    window[...] = 1
                    added = new
                    break
            if added == 0:
                break
            masked += added
    return torch.from_numpy(masks.reshape(batch, grid * grid))


class KMeansTokenizer(nn.Module):
    """Images to visual tokens without downloads: the nearest of ``centroids`` (k-means centres of per-patch
    normalised pixels, in MAE's patch order) for each patch. A stand-in for BEiT's dVAE / VQ-KD tokenizers."""

    def __init__(self, patch_size: int, centroids: torch.Tensor):
        super().__init__()
        if centroids.dim() != 2 or centroids.shape[1] % (patch_size * patch_size):
            raise ValueError(f"centroids must be [vocab, p * p * C] for patch size {patch_size}, got "
                             f"{tuple(centroids.shape)}")
        self.patch_size = patch_size
        self.register_buffer("centroids", centroids.float())

    @property
    def vocab_size(self) -> int:
        """The number of visual tokens (centroids) the tokenizer assigns."""
        return self.centroids.shape[0]

    @staticmethod
    def _normalised_patches(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
        patches = mimkernels.patchify(imgs.float(), patch_size)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()

    @staticmethod
    def _nearest(patches: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Index of the nearest centre for each row of ``patches [N, P]``, in row chunks: the [rows, vocab]
        distances of a whole ViT-B batch against 8192 centres would take gigabytes at once."""
        return torch.cat([torch.cdist(rows, centroids).argmin(1) for rows in patches.split(chunk)])

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` int64 codes."""
        channels = self.centroids.shape[1] // self.patch_size**2
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or imgs.shape[1] != channels:
            raise ValueError(f"imgs must be [batch, {channels}, height, width] (the tokenizer was fitted on "
                             f"{channels}-channel images), got {tuple(getattr(imgs, 'shape', ()))}")
        patches = self._normalised_patches(imgs, self.patch_size)
        codes = self._nearest(patches.flatten(0, 1), self.centroids.to(patches.device))
        return codes.view(patches.shape[:2])

    @classmethod
    @torch.no_grad()
    def fit(cls, imgs: torch.Tensor, patch_size: int, vocab_size: int, *, iters: int = 10,
            generator=None) -> KMeansTokenizer:
        """k-means (Lloyd's, ``iters`` rounds, centres started at random patches) on the patches of ``imgs``."""
        patches = cls._normalised_patches(imgs, patch_size).reshape(-1, imgs.shape[1] * patch_size * patch_size)
        if patches.shape[0] < vocab_size:
            raise ValueError(f"{patches.shape[0]} patches cannot fit {vocab_size} centres: give more images")
        pick = torch.randperm(patches.shape[0], generator=generator)[:vocab_size]
        centroids = patches[pick].clone()
        for _ in range(iters):
            codes = cls._nearest(patches, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, codes, patches)
            counts = torch.bincount(codes, minlength=vocab_size).unsqueeze(1)
            centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty centres stay
        return cls(patch_size, centroids)


HEAD_ON = ("all", "masked")


def _checked_head_on(head_on):
    if head_on not in HEAD_ON:
        raise ValueError(f"head_on must be one of {HEAD_ON}, got {head_on!r}")
    return head_on


class BEiT(MaskTokenViT):
    """ViT encoder + linear head over the visual vocabulary; ``tokenizer`` gives the targets.

    ``head_on`` says which patches the head (and the cross-entropy) runs on: ``"all"`` (default) every patch, the
    unmasked ones weighted 0; ``"masked"`` the ``masked_count(mask_ratio)`` patches of ``head_rows(mask)`` per
    sample, which hold all the masked ones (a drawn mask never masks more; a given one is checked). Both give the
    same loss and gradients; ``"masked"`` skips the head's work on the unmasked patches (at ViT-B/16, 8192 codes:
    7.4 -> 2.8 GFLOP per image, fwd + bwd) and stays selectable until a GPU measures it faster.
    """

    def __init__(self, tokenizer: nn.Module, vocab_size: int, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, norm_layer=nn.LayerNorm, mask_ratio=0.4,
                 norm_pix_loss=False, head_on="all"):
        _checked_head_on(head_on)
        if not is_int(vocab_size) or vocab_size < 2:
            # 0 built a head with no outputs (cross_entropy failed at the first forward); 1, a loss of 0 always
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        if norm_pix_loss:
            raise ValueError("BEiT predicts visual tokens, not pixels: norm_pix_loss does not apply")
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_layer)
        grid_h, grid_w = self.patch_embed.grid_size
        if grid_h != grid_w:
            raise ValueError(f"BEiT's masking needs a square patch grid, got {grid_h}x{grid_w}")
        codes = getattr(tokenizer, "vocab_size", None)  # KMeansTokenizer's; other tokenizers may not say
        if isinstance(codes, int) and codes > vocab_size:  # a code past the head: cross_entropy's device assert
            raise ValueError(f"the tokenizer assigns {codes} visual tokens, more than vocab_size = {vocab_size}")
        self.tokenizer, self.vocab_size, self.mask_ratio, self.head_on = tokenizer, vocab_size, mask_ratio, head_on
        self.masked_count()  # the ratio checked here, not at the first forward
        self.norm_pix_loss = False
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.init_weights()

    def masked_count(self, mask_ratio: float | None = None) -> int:
        """Patches a mask of ``mask_ratio`` (default: the model's) covers; ValueError unless some but not all."""
        patches = self.patch_embed.num_patches
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        in_range = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0 < ratio < 1  # NaN too
        count = round(ratio * patches) if in_range else 0
        if not 0 < count < patches:
            raise ValueError(f"mask_ratio must mask some but not all of the {patches} patches (a ratio in "
                             f"(0, 1)), got {ratio!r}")
        return count

    def random_mask(self, batch: int, mask_ratio: float | None = None, generator=None) -> torch.Tensor:
        """A BEiT block-wise mask ``[batch, L]`` (on the CPU) of about ``mask_ratio`` of the patches."""
        return beit_block_mask(batch, self.patch_embed.grid_size[0], self.masked_count(mask_ratio),
                               generator=generator)

    def head_rows(self, mask: torch.Tensor, mask_ratio: float | None = None) -> torch.Tensor:
        """``[B, masked_count(mask_ratio)]`` int64: the patches ``head_on="masked"`` runs the head on. Each sample's
        patches of nonzero ``mask`` weight in patch order, then its others in patch order, as many as fit."""
        count = self.masked_count(mask_ratio)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != self.patch_embed.num_patches:
            raise ValueError(f"mask must be a [batch, {self.patch_embed.num_patches}] tensor, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        return torch.sort((mask == 0).to(torch.uint8), dim=1, stable=True).indices[:, :count]

    def patch_predictions(self, logits: torch.Tensor, mask: torch.Tensor, mask_ratio: float | None = None):
        """``[B, L]`` int64: the code the head predicts for each patch (the argmax of ``logits`` as ``forward``
        returned them, with the same ``mask`` and ``mask_ratio``), -1 where the head did not run."""
        codes = logits.argmax(-1)
        if codes.shape == mask.shape:  # head_on="all"
            return codes
        unpredicted = torch.full(mask.shape, -1, dtype=codes.dtype, device=codes.device)
        return unpredicted.scatter(1, self.head_rows(mask, mask_ratio).to(codes.device), codes)

    def forward(self, imgs, mask_ratio=None, mask=None):
        """``(loss, logits, mask [B, L])``: cross-entropy of the masked patches' tokens. ``logits`` are ``[B, L,
        vocab]`` with ``head_on="all"``, ``[B, masked_count(mask_ratio), vocab]`` for the patches of
        ``head_rows(mask, mask_ratio)`` with ``head_on="masked"`` (``patch_predictions`` maps either to patches).
        The tokenizer's codes must lie in ``[0, vocab_size)`` (checked where it says its ``vocab_size``: reading the
        codes back on the host each step would stall the GPU)."""
        self.patch_embed.check(imgs)
        head_on = _checked_head_on(self.head_on)
        batch, num_patches = imgs.shape[0], self.patch_embed.num_patches
        given = mask  # as passed: on the CPU, checking it costs no GPU sync
        mask = self.checked_mask(imgs, self.random_mask(batch, mask_ratio) if given is None else given)
        # a drawn mask never masks more than masked_count(); a given one might
        uncovered = self._uncovered_rows(given, mask, mask_ratio) if head_on == "masked" and given is not None \
            else None
        targets = self.tokenizer(imgs)
        if tuple(targets.shape) != (batch, num_patches) or targets.is_floating_point():
            raise ValueError(f"the tokenizer must give integer codes [{batch}, {num_patches}], got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        encoded = self.forward_encoder(imgs, mask)[:, 1:]
        weights = mask
        if head_on == "masked":
            rows = self.head_rows(mask, mask_ratio)
            encoded, targets, weights = (mimkernels.gather_tokens(encoded, rows), targets.gather(1, rows),
                                         mask.gather(1, rows))
        logits = self.lm_head(encoded)
        per_patch = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        loss = (per_patch * weights.flatten()).sum() / mask_denominator(mask)
        if uncovered is not None:  # a NaN loss, not a loss that misses some masked patches
            loss = torch.where(uncovered, torch.full_like(loss, math.nan), loss)
        return loss, logits, mask

    def _uncovered_rows(self, given, mask, mask_ratio):
        """Whether the given mask masks more patches in a sample than ``head_on="masked"`` runs the head on. Read
        where that costs no GPU sync (a mask given on the CPU, or with ``MIMKERNELS_CHECK_INDICES=1``; not while
        torch.compile traces): a ValueError, and None. Elsewhere a device flag for the loss to turn NaN on."""
        count = self.masked_count(mask_ratio)
        if (given.device.type == "cpu" or CHECK_CUDA_INDICES) and not torch.compiler.is_compiling():
            most = int((given != 0).sum(1).max())
            if most > count:
                ratio = self.mask_ratio if mask_ratio is None else mask_ratio
                raise ValueError(f"mask masks up to {most} patches of a sample, more than the {count} that "
                                 f"head_on='masked' runs the head on at mask_ratio {ratio}: pass a larger "
                                 "mask_ratio or use head_on='all'")
            return None
        return (mask != 0).sum(1).max() > count


_LN = partial(nn.LayerNorm, eps=1e-6)


def beit_vit_base_patch16(tokenizer=None, vocab_size=8192, **kwargs) -> BEiT:
    """ViT-B/16 at 224 px over a vocabulary of ``vocab_size`` (BEiT's is 8192); ``tokenizer`` is required."""
    if tokenizer is None:
        raise ValueError("beit_vit_base_patch16 needs a tokenizer (e.g. KMeansTokenizer.fit(...))")
    return BEiT(tokenizer, vocab_size, patch_size=16, embed_dim=768, depth=12, num_heads=12, norm_layer=_LN,
                **kwargs)


def beit_vit_tiny_patch8(tokenizer=None, vocab_size=64, **kwargs) -> BEiT:
    """A small BEiT for tests and CPU demos: 64 px images, 8 px patches, 4 blocks, a vocabulary of 64."""
    kwargs = {"img_size": 64, **kwargs}
    if tokenizer is None:
        raise ValueError("beit_vit_tiny_patch8 needs a tokenizer (e.g. KMeansTokenizer.fit(...))")
    return BEiT(tokenizer, vocab_size, patch_size=8, embed_dim=128, depth=4, num_heads=4, norm_layer=_LN,
                **kwargs)
