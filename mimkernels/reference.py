"""PyTorch reference of every mimkernels op: the specification.

Readable and unfused on purpose. The fast kernels are tested against these
functions evaluated in float64, and the ``torch`` backend runs them as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Full (``causal=False``), causal, or prefix-causal (``prefix_len`` given) attention."""
    if prefix_len is not None:
        return prefix_causal_attention(q, k, v, prefix_len, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
