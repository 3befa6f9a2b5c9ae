"""mimkernels: fused kernels for masked and autoregressive image pre-training (MAE, BEiT, SimMIM, AIM)."""
import importlib

from ._backend import available_backends, use_backend
from .ops.attention import attention, prefix_causal_attention, prefix_causal_mask, qkv_attention
from .ops.losses import masked_patch_loss
from .ops.mlp import gelu_mlp
from .ops.norms import add_layer_norm
from .ops.patch_embed import patch_embed, patchify, unpatchify
from .ops.tokens import gather_tokens, masking_indices, random_masking, restore_tokens

__version__ = "0.1.0"

# submodules imported on first use (``mimkernels.models.aim_600m()`` after a bare ``import mimkernels``), so that
# importing the ops does not import the models, the integrations or the CLI
SUBMODULES = ("integrations", "models", "nn", "parallel", "reference", "timing", "train")


def __getattr__(name):
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
