"""mimkernels: fused kernels for masked and autoregressive image pre-training (MAE, BEiT, SimMIM, AIM)."""
from ._backend import available_backends, use_backend
from .ops.attention import attention, prefix_causal_attention, prefix_causal_mask, qkv_attention
from .ops.losses import masked_patch_loss
from .ops.mlp import gelu_mlp
from .ops.norms import add_layer_norm
from .ops.patch_embed import patch_embed, patchify, unpatchify
from .ops.tokens import gather_tokens, masking_indices, random_masking, restore_tokens

__version__ = "0.1.0"

__all__ = [
    "add_layer_norm",
    "attention",
    "available_backends",
    "gather_tokens",
    "gelu_mlp",
    "masked_patch_loss",
    "masking_indices",
    "patch_embed",
    "patchify",
    "prefix_causal_attention",
    "prefix_causal_mask",
    "qkv_attention",
    "random_masking",
    "restore_tokens",
    "unpatchify",
    "use_backend",
]
