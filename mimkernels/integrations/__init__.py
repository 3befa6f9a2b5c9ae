"""One call to run existing models on mimkernels' kernels: ``mimkernels.integrations.apply(model)``.

Patching swaps the class of each supported submodule for a subclass whose ``forward`` calls mimkernels' ops;
parameters, buffers, module names and the state_dict stay exactly as they were (checkpoints load both ways),
and ``unapply`` swaps the classes back. A submodule whose configuration our kernels cannot honour keeps its
original code, with one warning saying why; nothing is ever computed differently from the original beyond
rounding.

Supported models: timm's ``VisionTransformer`` (its ``Attention`` and ``PatchEmbed`` modules, with ``add_norm``
its ``Block``, with ``gelu_mlp`` its ``Mlp``), Hugging Face transformers' ``ViTMAEForPreTraining`` and
``ViTMAEModel`` (masking and unshuffling, kept-patch embedding, attention, the reconstruction loss, with
``add_norm`` each layer's residual add and LayerNorm, with ``gelu_mlp`` each layer's MLP), mimkernels' own
models (already on the kernels: returned unchanged), and any model that holds some of these or is built from
timm's ViT modules (facebookresearch/mae's ``MaskedAutoencoderViT``): those parts are patched, the rest keeps
its code.
``register_hf_attention()`` makes ``attn_implementation="mimkernels"`` available to any transformers model.
"""
from __future__ import annotations

import inspect
import re
import sys
import warnings

import torch

from ..ops._checks import check_bool

__all__ = ["apply", "patched_modules", "register_hf_attention", "unapply"]

SUPPORTED = ("timm.models.vision_transformer.VisionTransformer", "transformers.ViTMAEForPreTraining",
             "transformers.ViTMAEModel", "mimkernels.models.MAE", "mimkernels.models.AIM", "mimkernels.models.SimMIM",
             "mimkernels.models.BEiT")
# The oldest release of each patched library that CI tests (requirements-floor.txt): timm 0.9.16 is the last 0.9;
# before 4.57, transformers' ViTMAE picked its attention class per implementation and its decoder took other arguments.
TIMM_MODULES = ("Attention", "PatchEmbed", "Block", "Mlp")  # what _timm patches, in any model that holds them
OLDEST_RELEASES = {"timm": (0, 9, 16), "transformers": (4, 57, 0)}


def release_unsupported(library: str, original: type, method: str, signatures: tuple) -> str | None:
    """Why a patch cannot stand in for ``original.<method>`` of the installed ``library``, or None: ``signatures``
    are the parameter names of that method in the releases the patch reproduces; another signature means other
    code, which the patch would silently drop."""
    if tuple(inspect.signature(getattr(original, method)).parameters) not in signatures:
        return f"this {library} release's {original.__name__}.{method} is not one mimkernels reproduces"
    return None


def check_release(library: str, version: str, what: str) -> None:
    """Raise RuntimeError, saying ``what`` needs a newer ``library``, where ``version`` is older than the oldest
    release tested (a pre-release of that release passes)."""
    oldest = OLDEST_RELEASES[library]
    release = tuple(int(number) for number in re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version).groups("0"))
    if release < oldest:
        raise RuntimeError(f"{what} needs {library} >= {'.'.join(map(str, oldest))}; this is {library} {version}")


def covered_by_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``images [B, C, H, W]`` cut to the rows and columns that whole ``patch`` x ``patch`` patches cover (a view):
    what the Conv2d of stride ``patch`` that a patched module replaces reads. timm and Hugging Face models run
    images whose side is no multiple of the patch (timm's SigLIP so400m/14 at 384: 27 patches and 6 pixels a side),
    and :func:`mimkernels.patch_embed` refuses those; the pixels past the last patch get no gradient either way."""
    height, width = images.shape[-2:]
    if height % patch or width % patch:
        return images[..., :height - height % patch, :width - width % patch]
    return images


def warn_kept(skipped: dict) -> None:
    """One warning per reason: ``skipped`` maps a reason to the names of the modules that keep their original code
    for it (called from a library's ``patch``, itself called from :func:`apply`: the warning points at apply's
    caller)."""
    for reason, names in skipped.items():
        warnings.warn(f"mimkernels.integrations: {len(names)} module(s) keep their original code because {reason} "
                      f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})", stacklevel=4)


def _is_timm_vit(model) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


def _is_hf_vit_mae(model) -> bool:
    if not type(model).__module__.startswith("transformers."):
        return False
    from . import _hf

    return isinstance(model, _hf.SUPPORTED)


def _wrapper_name(module: torch.nn.Module) -> str | None:
    """Which wrapper ``module`` is (torch.compile's or DDP's / DataParallel's), or None."""
    if isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        return "torch.compile"
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return "DistributedDataParallel / DataParallel"
    return None


def _compiled_submodule(model: torch.nn.Module) -> str | None:
    """The name of the first submodule of ``model`` (or "" for ``model`` itself) that torch.compile has wrapped or
    compiled in place (``Module.compile``), or None."""
    for name, module in model.named_modules():
        if _wrapper_name(module) == "torch.compile" or getattr(module, "_compiled_call_impl", None) is not None:
            return name
    return None


def _outermost(model: torch.nn.Module, chosen) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each submodule of ``model`` (or ``model`` itself, named "") for which ``chosen(module)``
    holds and that no other chosen one holds."""
    found = []
    for name, module in model.named_modules():  # each holder comes before what it holds
        if chosen(module) and not any(name.startswith(f"{outer}.") or not outer for outer, _ in found):
            found.append((name, module))
    return found


def _sharded_submodule(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The first submodule (name, module) that FSDP has sharded (FSDP2's ``fully_shard`` or an FSDP1 wrapper),
    or None. ``fully_shard`` gives each module it shards a class of its own, made from the module's class; a
    class swapped after that would drop FSDP's, and one left alone would keep its code unsaid."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, (FSDPModule, FullyShardedDataParallel)):
            return name, module
    return None


def apply(model: torch.nn.Module, *, attention: bool = True, patch_embed: bool = True, masking: bool = True,
          loss: bool = True, add_norm: bool | None = None, gelu_mlp: bool | None = None) -> torch.nn.Module:
    """Patch ``model`` in place to run on mimkernels' kernels, and return it.

    Args:
        model: a timm ``VisionTransformer`` (any size, with or without cls / register tokens, with
            ``dynamic_img_size``), a transformers ``ViTMAEForPreTraining`` / ``ViTMAEModel``, a mimkernels
            model (returned as is), or any other model that holds some of these or timm's ``Attention``,
            ``PatchEmbed``, ``Block`` and ``Mlp`` modules (facebookresearch/mae's ``MaskedAutoencoderViT``, a
            model with a timm backbone): each held model is patched as if it were given alone, and each held timm
            module as in a timm ViT; the model's own code around them stays as it is.
        attention: run self-attention by :func:`mimkernels.attention` (full attention, or causal with timm's
            ``is_causal=True``; a call with an explicit attention mask, with attention dropout while training,
            or asking for attention weights runs the original code).
        patch_embed: run the patch embedding by :func:`mimkernels.patch_embed` (ViTMAE: only the kept patches,
            with their positions, which needs ``masking``).
        masking: ViTMAE: random masking and the decoder's unshuffle by mimkernels' token ops (the same masks
            and ids for the same noise, and the same random draws without).
        loss: ViTMAE: the reconstruction loss by :func:`mimkernels.masked_patch_loss`.
        add_norm: each block's residual add after attention in one pass with the LayerNorm after it
            (:func:`mimkernels.add_layer_norm`; timm's ``Block``, ViTMAE's layers). None: what mimkernels' own
            models do, ``mimkernels.models.vit.FUSED_ADD_NORM`` (off until a GPU measures the fusion faster).
        gelu_mlp: each MLP of exact GELU (fc1, GELU, fc2) by :func:`mimkernels.gelu_mlp`, GELU inside the GEMMs
            (timm's ``Mlp``, ViTMAE's ``ViTMAEMLP``, on transformers 4 its ``ViTMAELayer``; timm's with dropout while
            training, the original code). None:
            ``mimkernels.models.vit.FUSED_GELU_MLP`` (off until a GPU measures it faster).
        ``interpolate_pos_encoding=True`` calls of ViTMAE run the original code.

    Raises:
        TypeError: ``model`` is not one of the supported classes (listed in the message) and holds none of them
            and no timm ViT module; it is a ``torch.compile`` or DDP wrapper (apply to the model before wrapping
            it), or torch.compile has compiled a part of it (apply before compiling); FSDP has sharded it or a
            submodule (apply before ``fully_shard``); an option that is not a bool.
        RuntimeError: a model holding timm modules with timm older than 0.9.16, or a transformers model with
            transformers older than 4.57 (the oldest releases tested).
    """
    from ..models import AIM, MAE, BEiT, SimMIM, vit

    # before anything is patched: a string such as "false" is truthy, and switched on what its caller meant off
    for name, value in (("attention", attention), ("patch_embed", patch_embed), ("masking", masking), ("loss", loss),
                        ("add_norm", add_norm), ("gelu_mlp", gelu_mlp)):
        if value is not None or name not in ("add_norm", "gelu_mlp"):  # None: the models' switch
            check_bool(name, value)
    if add_norm is None:
        add_norm = vit.FUSED_ADD_NORM
    if gelu_mlp is None:
        gelu_mlp = vit.FUSED_GELU_MLP
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ours = (MAE, AIM, SimMIM, BEiT)
    if isinstance(model, ours):
        return model
    if wrapper := _wrapper_name(model):
        inner = type(getattr(model, "_orig_mod", getattr(model, "module", None))).__qualname__
        raise TypeError(f"mimkernels.integrations.apply got a {wrapper} wrapper ({type(model).__qualname__}) of a "
                        f"{inner}: apply to the model before wrapping it")
    if (compiled := _compiled_submodule(model)) is not None:
        raise TypeError(f"mimkernels.integrations.apply: {compiled or 'the model'} was compiled by torch.compile; "
                        f"apply to the model before compiling it or any part of it (torch 2.11 keeps running a graph "
                        f"compiled before the swap, with the original code)")
    if sharded := _sharded_submodule(model):
        name, module = sharded
        raise TypeError(f"mimkernels.integrations.apply got a model sharded by FSDP ({name or 'the model'} is a "
                        f"{type(module).__qualname__}): apply to the model before fully_shard or FSDP wraps it")
    if _is_timm_vit(model):
        import timm

        check_release("timm", timm.__version__, "mimkernels.integrations.apply")
        from . import _timm

        _timm.patch(model, attention=attention, patch_embed=patch_embed, add_norm=add_norm, gelu_mlp=gelu_mlp)
        return model
    if _is_hf_vit_mae(model):
        from . import _hf

        _hf.patch(model, attention=attention, patch_embed=patch_embed, masking=masking, loss=loss,
                  add_norm=add_norm, gelu_mlp=gelu_mlp)
        return model
    # Any other model: what it holds (official MAE code and much other research code builds its models from
    # timm's Block and PatchEmbed). Each swapped module computes what the original module did, wherever it sits.
    vit_maes = _outermost(model, _is_hf_vit_mae)
    holds_timm = False
    if "timm" in sys.modules and any(type(module).__module__.startswith("timm.") for module in model.modules()):
        import timm

        check_release("timm", timm.__version__, "mimkernels.integrations.apply")
        from . import _timm

        holds_timm = _timm.holds_patchable(model)
    held_ours = any(isinstance(module, ours) for module in model.modules())
    if not (vit_maes or holds_timm or held_ours or patched_modules(model)):  # patched before: nothing more to do
        raise TypeError(f"mimkernels.integrations.apply supports {', '.join(SUPPORTED)}, and models that hold one "
                        f"of these or timm's ViT modules ({', '.join(TIMM_MODULES)}); got "
                        f"{type(model).__module__}.{type(model).__qualname__}, which holds none")
    for _, vit_mae in vit_maes:
        from . import _hf

        _hf.patch(vit_mae, attention=attention, patch_embed=patch_embed, masking=masking, loss=loss,
                  add_norm=add_norm, gelu_mlp=gelu_mlp)
    if holds_timm:
        _timm.patch(model, attention=attention, patch_embed=patch_embed, add_norm=add_norm, gelu_mlp=gelu_mlp)
    return model


def register_hf_attention() -> str:
    """Register mimkernels as a transformers attention implementation and return its name, ``"mimkernels"``:
    ``from_pretrained(..., attn_implementation="mimkernels")`` or ``model.set_attn_implementation("mimkernels")``
    then runs full and causal self-attention on mimkernels' kernels, with the masks transformers builds for sdpa;
    calls with a mask, dropout, grouped kv heads, a kv cache, a position bias, softcap or sinks, or a dtype or head
    dim the kernels lack run transformers' sdpa implementation. Only models whose attention goes through
    transformers' ``AttentionInterface`` take it (transformers itself raises KeyError building one that picks its
    attention classes from its own table, such as Data2VecVision). Raises RuntimeError with transformers older than
    4.57."""
    from . import _hf

    return _hf.register_attention()


def patched_modules(model: torch.nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that run mimkernels' kernels after :func:`apply`."""
    return [name for name, module in model.named_modules() if getattr(type(module), "_mimkernels_patch", False)]


def unapply(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: every patched submodule gets its original class back. Returns ``model``.

    Raises:
        TypeError: a patched submodule was given a class of its own after :func:`apply` (FSDP's ``fully_shard``
            makes one from the module's class): its patched class sits under that one, which swapping back would
            drop. Nothing is changed then; unapply before sharding.
    """
    rebuilt = [f"{name} ({type(module).__qualname__})" for name, module in model.named_modules()
               if getattr(type(module), "_mimkernels_patch", False) and not _patched_class(type(module))]
    if rebuilt:
        raise TypeError(f"mimkernels.integrations.unapply: {', '.join(rebuilt)} got a class made from its patched "
                        f"class after apply (FSDP's fully_shard does): unapply before sharding")
    for module in model.modules():
        if _patched_class(type(module)):
            module.__class__ = type(module).__mro__[1]
    return model


def _patched_class(cls: type) -> bool:
    """Whether ``cls`` is one of the patched classes itself, not a class made from one."""
    return vars(cls).get("_mimkernels_patch", False)
