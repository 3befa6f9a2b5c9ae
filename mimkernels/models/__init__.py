"""Reference MAE, AIM, SimMIM and BEiT models on mimkernels' public ops (mae.py, aim.py, simmim.py, beit.py)."""
from .aim import AIM, aim_1b, aim_3b, aim_7b, aim_600m, aim_tiny
from .beit import BEiT, KMeansTokenizer, beit_block_mask, beit_vit_base_patch16, beit_vit_tiny_patch8
from .mae import MAE, mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16, mae_vit_tiny_patch8
from .simmim import SimMIM, block_mask, simmim_vit_base_patch16, simmim_vit_tiny_patch8

# model family -> config name -> constructor (what ``python -m mimkernels.train`` offers)
CONFIGS = {
    "mae": {fn.__name__: fn for fn in (mae_vit_tiny_patch8, mae_vit_base_patch16, mae_vit_large_patch16,
                                       mae_vit_huge_patch14)},
    "aim": {fn.__name__: fn for fn in (aim_tiny, aim_600m, aim_1b, aim_3b, aim_7b)},
    "simmim": {fn.__name__: fn for fn in (simmim_vit_tiny_patch8, simmim_vit_base_patch16)},
    "beit": {fn.__name__: fn for fn in (beit_vit_tiny_patch8, beit_vit_base_patch16)},  # need a tokenizer
}

__all__ = ["AIM", "BEiT", "CONFIGS", "KMeansTokenizer", "MAE", "SimMIM", "aim_1b", "aim_3b", "aim_600m", "aim_7b",
           "aim_tiny", "beit_block_mask", "beit_vit_base_patch16", "beit_vit_tiny_patch8", "block_mask",
           "mae_vit_base_patch16", "mae_vit_huge_patch14", "mae_vit_large_patch16", "mae_vit_tiny_patch8",
           "simmim_vit_base_patch16", "simmim_vit_tiny_patch8"]
