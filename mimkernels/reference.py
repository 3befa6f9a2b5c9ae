"""PyTorch reference of every mimkernels op: the specification.

Readable and unfused on purpose. The fast kernels are tested against these
functions evaluated in float64, and the ``torch`` backend runs them as they are.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops._checks import patch_side


def prefix_causal_mask(seq_len: int, prefix_len, *, device=None) -> torch.Tensor:
    """Boolean mask ``[B or 1, 1, N, N]``, True where query i may attend to key j.

    Key j is visible to query i iff ``j <= i or j < prefix_len[b]``. An int
    ``prefix_len`` gives one mask for the whole batch (leading dim 1); an integer
    tensor ``[B]`` gives one mask per sample, its values clamped to ``[0, N]``.
    """
    if isinstance(prefix_len, torch.Tensor):
        device = prefix_len.device if device is None else device
        prefix = prefix_len.to(device=device, dtype=torch.long).clamp(0, seq_len)
    else:
        prefix = torch.tensor([min(prefix_len, seq_len)], device=device, dtype=torch.long)
    query = torch.arange(seq_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None, :]
    visible = (key <= query) | (key < prefix[:, None, None])
    return visible[:, None]


def prefix_causal_attention(q, k, v, prefix_len, *, scale=None):
    """Softmax attention over ``[B, H, N, D]`` tensors with the prefix-causal mask."""
    mask = prefix_causal_mask(q.shape[-2], prefix_len, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention(q, k, v, *, causal=False, prefix_len=None, scale=None):
    """Full (``causal=False``), causal, or prefix-causal (``prefix_len`` given) attention.

    On the CPU, SDPA without a mask returns zeros, not NaN, for a query row that holds a NaN when the sequence has
    at most 15 tokens (full and ``is_causal`` attention, in each of fp16, bf16, fp32 and fp64; NaN from 16 tokens on;
    pytorch/pytorch#141128; seen on torch 2.11 and 2.15), and so does the ``torch`` backend's full attention, which
    calls this. With a mask (the prefix-causal path, which the ``torch`` backend also takes for causal attention)
    that row is NaN, as it is from the Triton kernels at every length. A NaN in K or V gives NaN everywhere.
    """
    if prefix_len is not None:
        return prefix_causal_attention(q, k, v, prefix_len, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


class Masking(NamedTuple):
    """What :func:`random_masking` returns (official MAE names and meanings)."""

    x_kept: torch.Tensor  # [B, P + K, D]: the prefix tokens, then the kept patch tokens in ids_keep order
    mask: torch.Tensor  # [B, L] float32: 1 where the patch was removed, 0 where kept
    ids_restore: torch.Tensor  # [B, L] int64: the position of each patch in the shuffled order
    ids_keep: torch.Tensor  # [B, K] int64: the kept patches, by original position


def _row_index(ids, dim):
    return ids.long().unsqueeze(-1).expand(-1, -1, dim)


def random_masking(x, mask_ratio, *, noise=None, num_prefix_tokens=0, pos_embed=None):
    """Official MAE random masking of x [B, P + L, D]: keep the ``int(L * (1 - mask_ratio))`` patches of
    smallest noise; the P leading prefix tokens (cls) are kept in front, unmasked. ``pos_embed``
    [1, P + L, D], if given, is added to every token first, as MAE does."""
    if pos_embed is not None:
        x = x + pos_embed.to(x.dtype)
    batch, tokens, dim = x.shape
    num_patches = tokens - num_prefix_tokens
    num_kept = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_kept]
    patches = torch.gather(x[:, num_prefix_tokens:], 1, _row_index(ids_keep, dim))
    mask = torch.ones(batch, num_patches, dtype=torch.float32, device=x.device)  # float32 whatever the default dtype
    mask[:, :num_kept] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(torch.cat([x[:, :num_prefix_tokens], patches], 1), mask, ids_restore, ids_keep)


def gather_tokens(x, ids_keep, *, pos_embed=None):
    """``x[b, ids_keep[b]] (+ pos_embed[0, ids_keep[b]])``; x [B, L, D], ids_keep [B, K], pos_embed [1, L, D]."""
    index = _row_index(ids_keep, x.shape[-1])
    out = torch.gather(x, 1, index)
    if pos_embed is not None:
        out = out + torch.gather(pos_embed.expand(x.shape[0], -1, -1), 1, index).to(out.dtype)
    return out


def restore_tokens(x_kept, ids_restore, mask_token, *, pos_embed=None, num_prefix_tokens=0):
    """Official MAE decoder input: append mask tokens to the kept patches, unshuffle with ids_restore,
    keep the P prefix rows in front, add pos_embed [1, P + L, D]. x_kept [B, P + K, D] -> [B, P + L, D]."""
    batch, rows, dim = x_kept.shape
    num_patches = ids_restore.shape[1]
    num_masked = num_patches + num_prefix_tokens - rows
    mask_tokens = mask_token.reshape(1, 1, dim).to(x_kept.dtype).expand(batch, num_masked, dim)
    shuffled = torch.cat([x_kept[:, num_prefix_tokens:], mask_tokens], 1)
    patches = torch.gather(shuffled, 1, _row_index(ids_restore, dim))
    out = torch.cat([x_kept[:, :num_prefix_tokens], patches], 1)
    if pos_embed is not None:
        out = out + pos_embed.to(out.dtype)
    return out


def patch_embed(images, weight, bias=None, *, pos_embed=None, ids_keep=None, mask=None, mask_token=None):
    """``conv2d(images, weight, bias, stride=p).flatten(2).transpose(1, 2)``: [B, L, E] in weight's dtype;
    with mask [B, L] each patch becomes ``x * (1 - w) + mask_token * w`` (w = its mask value, SimMIM's and BEiT's
    formula: 1 = the token, 0 = the patch), then pos_embed [1, L, E] is added, then only the ``ids_keep`` [B, K]
    rows are kept."""
    bias = None if bias is None else bias.to(weight.dtype)
    x = F.conv2d(images.to(weight.dtype), weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if mask is not None:
        x = blend_mask_token(x, mask, mask_token.reshape(1, 1, -1).to(x.dtype))
    if pos_embed is not None:
        x = x + pos_embed.to(x.dtype)
    if ids_keep is not None:
        x = torch.gather(x, 1, _row_index(ids_keep, x.shape[-1]))
    return x


def blend_mask_token(x, mask, token):
    """``x * (1 - w) + token * w`` with w = ``mask`` [B, L] per row of x [B, L, E]; rows with w = 0 keep x and rows
    with w = 1 take the token as they are (no product), so a non-finite value on one side stays out of the other."""
    w = mask.unsqueeze(-1).to(x.dtype)
    blended = x * (1 - w) + token * w
    return torch.where(w == 0, x, torch.where(w == 1, token, blended))


def patchify(images, patch_size):
    """MAE patchify: images [B, C, H, W] -> [B, (H/p) * (W/p), p * p * C], (p, q, c) order inside a patch."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(x, patch_size, height, width):
    """Inverse of :func:`patchify` for an image of ``height x width`` patches: -> [B, C, height * p, width * p]."""
    p = patch_size
    channels = x.shape[-1] // (p * p)
    x = x.reshape(x.shape[0], height, width, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, height * p, width * p)


def masked_patch_loss(pred, images, mask, *, norm_pix=True, loss="l2"):
    """Official MAE ``forward_loss``: per-patch mean error against the (normalised) patchified images,
    averaged over the patches where mask is 1 (weighted by mask). ``loss="l1"``: SimMIM's masked L1.

    The total is divided by the sum of the weights, whatever their sign, as the official code does; where they sum
    to 0 it is divided by 1 instead, so a mask of all zeros gives 0 (the official code divides 0 by 0). Patches of
    weight 0 are not read: a NaN or inf in their predictions or pixels changes neither the loss nor any gradient
    (the official code's ``0 * nan`` would make both NaN); the kernels never load them.
    """
    target = patchify(images, patch_side(pred.shape[-1], images.shape[1]))  # pred rows hold p * p * C values
    scored = (mask != 0)[..., None]  # where(), not a product: 0 * nan would reach the loss and the gradient
    pred, target = torch.where(scored, pred, 0), torch.where(scored, target, 0)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    error = (pred - target).abs() if loss == "l1" else (pred - target) ** 2
    per_patch = error.mean(dim=-1)
    return (per_patch * mask).sum() / mask_denominator(mask)


def mask_denominator(mask):
    """What a masked mean divides by: the sum of the mask's weights, whatever its sign (as the official MAE code),
    or 1 where they sum to 0 (an all-zero mask then gives 0, not 0 / 0)."""
    weight = mask.sum()
    return torch.where(weight != 0, weight, torch.ones_like(weight))


def add_layer_norm(x, branch, weight, bias=None, *, eps=1e-5, out_dtype=None):
    """A pre-norm transformer's residual step: ``total = x + branch`` (PyTorch's type promotion), then
    ``LayerNorm(total)`` over the last dim, computed in fp32 (as autocast runs LayerNorm) and returned in
    ``out_dtype`` (default total's dtype). Returns ``(total, normed)``."""
    total = x + branch
    normed = F.layer_norm(total.float(), total.shape[-1:], None if weight is None else weight.float(),
                          None if bias is None else bias.float(), eps)
    return total, normed.to(out_dtype or total.dtype)


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """A transformer's MLP with exact (erf) GELU: ``fc2(gelu(fc1(x)))``, the Linear layers as ``F.linear``."""
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
