"""mimkernels: fused kernels for masked and autoregressive image pre-training (MAE, BEiT, SimMIM, AIM)."""
from ._backend import available_backends, use_backend
from .ops.attention import attention, prefix_causal_attention, prefix_causal_mask

__version__ = "0.1.0"

__all__ = [
    "attention",
    "available_backends",
    "prefix_causal_attention",
    "prefix_causal_mask",
    "use_backend",
]
