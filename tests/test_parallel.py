"""FSDP2 sharding, activation checkpointing, per-block compilation and sharded checkpoints (mimkernels.parallel),
in one process with a 1-rank gloo group; the CLI's 2-rank runs are in test_train.py."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mimkernels import models, parallel

# torch 2.15's FSDP2 warns when a sharded module returns a view: an in-place op on it would skip the all-gather.
# The models return tensors of their own, so that a user's FSDP run has no such warning to weigh.
pytestmark = pytest.mark.filterwarnings("error:FSDP2-wrapped module.*returned a view:UserWarning")


def tokenizer():
    return models.KMeansTokenizer(8, torch.randn(16, 8 * 8 * 3, generator=torch.Generator().manual_seed(3)))


MODELS = {"mae": models.mae_vit_tiny_patch8, "aim": models.aim_tiny, "simmim": models.simmim_vit_tiny_patch8,
          "beit": lambda: models.beit_vit_tiny_patch8(tokenizer=tokenizer(), vocab_size=16)}


def loss_and_grads(model, imgs):
    torch.manual_seed(1)  # the same masks and prefixes for every model
    loss = model(imgs)[0]
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return loss.detach(), grads


def twins(family):
    torch.manual_seed(0)
    plain = MODELS[family]()
    other = MODELS[family]()
    other.load_state_dict(plain.state_dict())
    return plain, other


def assert_trains_like(plain, other):
    """One step on the same images: ``other`` gives ``plain``'s loss and gradients, parameter by parameter."""
    imgs = torch.randn(2, 3, 64, 64)
    loss, grads = loss_and_grads(plain, imgs)
    loss_other, grads_other = loss_and_grads(other, imgs)
    torch.testing.assert_close(loss_other, loss, rtol=1e-6, atol=0)
    assert grads_other.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_other[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_transformer_blocks_are_every_trunk_decoder_and_head_block():
    mae, aim = models.mae_vit_tiny_patch8(), models.aim_tiny()
    assert len(parallel.transformer_blocks(mae)) == len(mae.blocks) + len(mae.decoder_blocks)
    assert len(parallel.transformer_blocks(aim)) == len(aim.blocks) + len(aim.head_blocks)
    with pytest.raises(TypeError, match="no mimkernels transformer blocks"):
        parallel.transformer_blocks(nn.Linear(2, 2))


def test_shard_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        parallel.shard(models.aim_tiny())


@pytest.mark.parametrize("family", sorted(MODELS))
def test_activation_checkpointing_keeps_gradients_and_saves_fewer_tensors(family):
    plain, checkpointed = twins(family)
    assert parallel.checkpoint_activations(checkpointed) == len(parallel.transformer_blocks(checkpointed))
    imgs = torch.randn(2, 3, 64, 64)
    saved = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            saved[name] = loss_and_grads(model, imgs)
        saved[name] += (count[0],)
    (loss, grads, kept), (loss_ac, grads_ac, kept_ac) = saved["plain"], saved["checkpointed"]
    assert kept_ac < kept / 2, (kept_ac, kept)  # the blocks hold most of the saved activations
    torch.testing.assert_close(loss_ac, loss, rtol=0, atol=0)
    assert grads_ac.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    parallel.checkpoint_activations(checkpointed, enabled=False)
    assert not any(block.checkpointed for block in parallel.transformer_blocks(checkpointed))
    with pytest.raises(TypeError, match="enabled must be a bool, got 'false'"):  # truthy: it turned checkpointing on
        parallel.checkpoint_activations(checkpointed, enabled="false")
    assert not any(block.checkpointed for block in parallel.transformer_blocks(checkpointed))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_sharded_model_matches_the_plain_one(one_rank_group, family):
    plain, sharded = twins(family)
    names = list(plain.state_dict())
    parallel.checkpoint_activations(sharded)
    parallel.shard(sharded)
    assert list(sharded.state_dict()) == names  # module tree and checkpoint keys unchanged
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    assert_trains_like(plain, sharded)


def test_compiled_blocks_under_fsdp_match_eager(one_rank_group):
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    plain, compiled = twins("aim")
    assert parallel.compile_blocks(compiled, counting_backend) == len(parallel.transformer_blocks(compiled))
    parallel.checkpoint_activations(compiled)
    parallel.shard(compiled)
    assert_trains_like(plain, compiled)
    assert 1 <= len(graphs) <= 4  # trunk and head blocks: one graph per block shape, not one per block
    parallel.compile_blocks(compiled, None)
    assert all(block._compiled_call_impl is None for block in parallel.transformer_blocks(compiled))


def test_norms_fused_across_blocks_under_fsdp_checkpointing_and_compile(one_rank_group, monkeypatch):
    """With FUSED_ADD_NORM, blocks pass their MLP branch to the next block un-added (keyword arguments through
    FSDP's hooks, the recomputed region and each compiled block): the same loss and gradients as the plain model."""
    from mimkernels.models import vit

    monkeypatch.setattr(vit, "FUSED_ADD_NORM", True)
    plain, wrapped = twins("aim")
    parallel.compile_blocks(wrapped, "aot_eager")
    parallel.checkpoint_activations(wrapped)
    parallel.shard(wrapped)
    assert_trains_like(plain, wrapped)


def sharded_and_trained(family, steps=2):
    torch.manual_seed(0)
    model = parallel.shard(MODELS[family]())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss_and_grads(model, torch.randn(2, 3, 64, 64))
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def test_sharded_checkpoint_round_trip(one_rank_group, tmp_path):
    model, optimizer = sharded_and_trained("aim")
    folder = tmp_path / "checkpoint"
    parallel.save_sharded(folder, model, optimizer, {"step": 2, "config": "aim_tiny"})
    parallel.save_sharded(folder, model, optimizer, {"step": 2, "config": "aim_tiny"})  # replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "store"]  # no staging folder left
    torch.manual_seed(5)
    fresh = parallel.shard(models.aim_tiny())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert parallel.load_sharded(folder, fresh, fresh_optimizer) == {"step": 2, "config": "aim_tiny"}
    (model_state, optimizer_state), (fresh_model, fresh_opt) = full_state(model, optimizer), \
        full_state(fresh, fresh_optimizer)
    assert model_state.keys() == fresh_model.keys()
    for name in model_state:
        torch.testing.assert_close(fresh_model[name], model_state[name], rtol=0, atol=0, msg=name)
    for name, moments in optimizer_state["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(fresh_opt["state"][name][key], value, rtol=0, atol=0, msg=f"{name} {key}")


@pytest.mark.parametrize("replaced", [False, True], ids=["first_save", "second_save"])
def test_a_save_stopped_once_complete_is_finished_by_the_load(one_rank_group, tmp_path, replaced):
    """A job killed inside save_sharded's swap, after the new checkpoint was complete in its staging folder (with
    or without the folder it replaces, and that one's earlier predecessor not yet deleted): the load finishes the
    swap and gets the new checkpoint; the next save works (a previous folder left behind made its rename fail)."""
    model, optimizer = sharded_and_trained("aim", steps=1)
    folder = tmp_path / "checkpoint"
    if replaced:
        parallel.save_sharded(folder, model, optimizer, {"step": 1})
    parallel.save_sharded(tmp_path / "newer", model, optimizer, {"step": 2})
    (tmp_path / "newer").rename(tmp_path / "checkpoint.tmp")
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / parallel.META_FILE).write_text("{}")
    assert parallel.load_sharded(folder, model, optimizer) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "store"]
    (tmp_path / "checkpoint.old").mkdir()
    parallel.save_sharded(folder, model, optimizer, {"step": 3})
    assert parallel.read_meta(folder) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "store"]


def test_a_save_stopped_before_complete_leaves_the_checkpoint(one_rank_group, tmp_path):
    """A staging folder without its meta file (the job killed while the shards were written) is no checkpoint: the
    load reads the one the folder holds, and the next save starts the staging folder over."""
    model, optimizer = sharded_and_trained("mae", steps=1)
    folder = tmp_path / "checkpoint"
    parallel.save_sharded(folder, model, optimizer, {"step": 1})
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "__0_0.distcp").write_bytes(b"half a shard")
    assert parallel.load_sharded(folder, model, optimizer) == {"step": 1}
    parallel.save_sharded(folder, model, optimizer, {"step": 2})
    assert parallel.read_meta(folder) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "store"]


def test_a_folder_without_meta_is_no_checkpoint(one_rank_group, tmp_path):
    (tmp_path / "half").mkdir()
    model, optimizer = sharded_and_trained("mae", steps=1)
    with pytest.raises(FileNotFoundError, match="no complete sharded checkpoint"):
        parallel.load_sharded(tmp_path / "half", model, optimizer)


def test_a_sharded_checkpoint_converts_to_one_file_for_a_plain_model(one_rank_group, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model, optimizer = sharded_and_trained("mae", steps=1)
    parallel.save_sharded(tmp_path / "checkpoint", model, optimizer, {"step": 1})
    dcp_to_torch_save(tmp_path / "checkpoint", tmp_path / "one.pt")
    plain = models.mae_vit_tiny_patch8()
    plain.load_state_dict(torch.load(tmp_path / "one.pt", weights_only=False)["model"])
    full = full_state(model, optimizer)[0]
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, full[name], rtol=0, atol=0, msg=name)
