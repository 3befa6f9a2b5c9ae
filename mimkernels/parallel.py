"""Training past one GPU: FSDP2 sharding, activation checkpointing, per-block compilation, sharded checkpoints.

AIM-7B with AdamW holds about 16 bytes a parameter (fp32 weights, gradients and two moments): 112 GB, more than
one 80 GB card, so data parallelism that replicates all of it (DDP) cannot train it. ``shard`` applies PyTorch's
FSDP2 (``torch.distributed.fsdp.fully_shard``): every transformer block, then the root, is a unit whose
parameters, gradients and optimizer state live 1/world on each rank and are all-gathered only while the unit
runs. ``checkpoint_activations`` trades about one extra forward for the activations of every block.

The order matters and is the one PyTorch's FSDP2 examples use: activation checkpointing and compilation are set
on the blocks first, then ``shard`` wraps them (its hooks run around a block, outside the recomputed and the
compiled region), then the optimizer is built over the sharded parameters.

Sharded checkpoints are folders written with ``torch.distributed.checkpoint`` (each rank writes its shards, in
parallel): ``save_sharded`` / ``load_sharded``. They load back into any world size. A save replaces the folder
only once the new checkpoint is complete; one stopped after that point is finished by the next load. A single
file of full tensors, for evaluation or export, comes from
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, "checkpoint.pt")``: its ``"model"`` entry is
the model's ordinary ``state_dict``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .models.aim import MlpBlock
from .models.vit import Block
from .ops._checks import check_bool

__all__ = ["checkpoint_activations", "compile_blocks", "finish_interrupted_save", "load_sharded", "save_sharded",
           "shard", "transformer_blocks"]

BLOCK_TYPES = (Block, MlpBlock)  # the repeated units of the shipped models
META_FILE = "meta.json"  # beside the shards; written last, so a folder with it holds a complete checkpoint


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a mimkernels model (encoder, decoder and head blocks) in module order: the units that
    ``shard``, ``checkpoint_activations`` and ``compile_blocks`` act on. Raises TypeError if there is none."""
    blocks = [module for module in model.modules() if isinstance(module, BLOCK_TYPES)]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no mimkernels transformer blocks (models/vit.Block, "
                        "models/aim.MlpBlock): shard, checkpoint and compile apply to the shipped models")
    return blocks


def checkpoint_activations(model: nn.Module, enabled: bool = True) -> int:
    """Turns activation checkpointing of every block on (or off); returns how many blocks it set. A block's
    activations are then recomputed in the backward instead of kept from the forward."""
    check_bool("enabled", enabled)  # the blocks test it for truth: "false" would turn checkpointing on
    blocks = transformer_blocks(model)
    for block in blocks:
        block.checkpointed = enabled
    return len(blocks)


def compile_blocks(model: nn.Module, backend: str | None, **options) -> int:
    """``torch.compile`` each block in place (``fullgraph=True``; ``backend=None`` undoes it); returns how many.
    Blocks of one shape share the compiled graph. Used instead of compiling the whole model under FSDP, whose
    hooks between the blocks are not traceable as one graph."""
    blocks = transformer_blocks(model)
    for block in blocks:
        if backend is None:
            block._compiled_call_impl = None  # what nn.Module.compile sets; None is the eager call
        else:
            block.compile(backend=backend, fullgraph=True, **options)
    return len(blocks)


def shard(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over the default process group (or ``mesh``): each block, then the root, becomes one
    ``fully_shard`` unit. The model is changed in place (its parameters become DTensors; module tree, names and
    ``state_dict`` keys stay) and returned. Build the optimizer after this call."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard needs an initialised process group (torch.distributed.init_process_group, "
                           "or run under torchrun)")
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Every rank writes its shards of model and optimizer into ``folder`` (a path all ranks see), replacing an
    earlier checkpoint there only once the new one is complete; ``meta`` (JSON-serialisable: step, config, ...) is
    written last, by rank 0. Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    staging, _ = _side_folders(folder)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staging))
    if rank == 0:
        (staging / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        _swap_in(folder)
    dist.barrier()


def _side_folders(folder: Path) -> tuple[Path, Path]:
    """Where ``save_sharded`` writes the next checkpoint (staging) and moves the one it replaces (previous)."""
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def _swap_in(folder: Path) -> None:
    """Rank 0, once the staging folder holds a complete checkpoint: it becomes ``folder``, and the checkpoint that
    was there is deleted. Each step can be repeated, so a save stopped anywhere in here is finished by running it
    again (``finish_interrupted_save``)."""
    staging, previous = _side_folders(folder)
    shutil.rmtree(previous, ignore_errors=True)  # left by a save stopped while deleting it: rename needs the name
    if folder.exists():
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def finish_interrupted_save(folder: Path) -> None:
    """Completes a ``save_sharded`` into ``folder`` that was stopped (the job killed or preempted) after its new
    checkpoint was complete: the new one takes ``folder``'s place, as the save would have done, and a replaced one
    still on disk is deleted. A save stopped earlier left ``folder`` as it was. Collective: every rank calls it."""
    folder = Path(folder)
    staging, previous = _side_folders(folder)
    if dist.get_rank() == 0:
        if (staging / META_FILE).is_file():
            _swap_in(folder)
        elif (folder / META_FILE).is_file():
            shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def read_meta(folder: Path) -> dict:
    """The ``meta`` a complete sharded checkpoint was saved with; FileNotFoundError if ``folder`` holds none."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no complete sharded checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Loads ``save_sharded``'s folder into the (sharded) model and optimizer; returns its ``meta``. A save into
    ``folder`` that was stopped once its checkpoint was complete is finished first (``finish_interrupted_save``).
    Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    finish_interrupted_save(folder)
    meta = read_meta(folder)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return meta
