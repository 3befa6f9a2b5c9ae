"""mimkernels.nn and mimkernels.integrations against the real timm (pinned in the test environment), on tiny models
built here (nothing downloaded). Patched and unpatched models must agree in outputs and every gradient."""
import copy
import inspect
import io
import pickle
import re
import warnings

import pytest
import torch

import mimkernels
import mimkernels.integrations as integrations
from mimkernels import nn as mnn

timm = pytest.importorskip("timm", reason="timm is pinned in requirements-dev.txt / requirements-floor.txt")
from timm.layers import PatchEmbed as TimmPatchEmbed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from mimkernels.integrations._timm import Attention as TimmAttention  # noqa: E402 (where this timm defines it)


def _vit(**kwargs):
    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    return VisionTransformer(**{**config, **kwargs})


def _outputs_and_grads(model, images, device):
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    out = model(images.to(device))
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(grads: dict, want_grads: dict, rtol=1e-4, atol=1e-5) -> None:
    """Each gradient element-wise, with ``atol`` scaled by the gradient's largest element where that is above 1: an
    element summed from terms of that size carries their fp32 rounding however small it comes out (ViTMAE's
    cls_token and mask_token gradients reach 1e2-1e3 on random images without norm_pix_loss)."""
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(grads[name], want, rtol=rtol, atol=atol * scale, msg=name)


def _assert_same_model_numbers(make, images, device, rtol=1e-4, atol=1e-5, **apply_kwargs):
    original = make()
    patched = integrations.apply(make(), **apply_kwargs)
    assert integrations.patched_modules(patched), "nothing was patched"
    with mimkernels.use_backend("triton"):
        out, grads = _outputs_and_grads(patched, images, device)
    want_out, want_grads = _outputs_and_grads(original, images, device)
    torch.testing.assert_close(out, want_out, rtol=rtol, atol=atol)
    assert len(grads) > 10
    _assert_grads_close(grads, want_grads, rtol, atol)
    return patched


@pytest.mark.parametrize("variant", [
    {},
    {"class_token": False, "reg_tokens": 2, "global_pool": "avg"},
    {"qk_norm": True, "qkv_bias": False},
    {"dynamic_img_size": True},
])
def test_patched_timm_vit_matches_the_original(variant, device, monkeypatch):
    calls = []

    def counted(name, op):
        def run(*args, **kwargs):
            calls.append(name)
            return op(*args, **kwargs)
        return run

    for name in ("attention", "qkv_attention", "patch_embed"):  # count that the kernels really run
        monkeypatch.setattr(mimkernels, name, counted(name, getattr(mimkernels, name)))
    images = torch.randn(2, 3, 32, 32)
    patched = _assert_same_model_numbers(lambda: _vit(**variant), images, device)
    names = integrations.patched_modules(patched)
    assert names == ["patch_embed", "blocks.0.attn", "blocks.1.attn"]
    # the packed projection goes to qkv_attention whole, unless a q / k norm sits between
    attention = "attention" if variant.get("qk_norm") else "qkv_attention"
    assert calls == ["patch_embed", attention, attention]


def _timm_attention_takes(argument: str) -> bool:
    """Whether this timm's Attention.forward takes ``argument`` (attn_mask since 1.0.17, is_causal later)."""
    return argument in inspect.signature(TimmAttention.forward).parameters


# timm's fp32 LayerNorm (a LayerNorm subclass that computes otherwise) where this timm has it, else an RMSNorm
NOT_A_PLAIN_LAYER_NORM = getattr(timm.layers, "LayerNormFp32", timm.layers.RmsNorm)


def _count_calls(monkeypatch, name: str) -> list:
    """Every later call of ``mimkernels.<name>`` appends 1 to the returned list (and still runs the op)."""
    calls, original = [], getattr(mimkernels, name)
    monkeypatch.setattr(mimkernels, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


@pytest.mark.parametrize("variant", [
    {},
    {"init_values": 0.1, "class_token": False, "reg_tokens": 2, "global_pool": "avg"},  # layer scale on the branch
    {"qk_norm": True, "mlp_layer": timm.layers.SwiGLU},
])
def test_timm_blocks_fuse_the_add_after_attention_with_norm2(variant, device, monkeypatch):
    """add_norm=True: each Block's first residual add shares a pass with norm2 (one add_layer_norm per block), with
    the original's outputs and gradients."""
    calls = _count_calls(monkeypatch, "add_layer_norm")
    images = torch.randn(2, 3, 32, 32)
    patched = _assert_same_model_numbers(lambda: _vit(**variant), images, device, add_norm=True)
    assert integrations.patched_modules(patched) == ["patch_embed", "blocks.0", "blocks.0.attn", "blocks.1",
                                                     "blocks.1.attn"]
    assert len(calls) == 2
    integrations.unapply(patched)
    assert type(patched.blocks[0]) is timm.models.vision_transformer.Block


@pytest.mark.parametrize("fused", [{}, {"add_norm": True, "gelu_mlp": True}], ids=["plain", "fused"])
def test_patched_timm_vit_under_activation_checkpointing(fused, device, monkeypatch):
    """timm's set_grad_checkpointing on a patched model: each block's kernels run again in the backward (so the
    checkpointing is on), and outputs and gradients are those of the unpatched model without checkpointing."""
    calls = _count_calls(monkeypatch, "qkv_attention")
    images = torch.randn(2, 3, 32, 32)

    def checkpointed():
        model = _vit()
        model.set_grad_checkpointing(True)
        return model

    original = _vit()
    patched = integrations.apply(checkpointed(), **fused)
    with mimkernels.use_backend("triton"):
        out, grads = _outputs_and_grads(patched, images, device)
    want_out, want_grads = _outputs_and_grads(original, images, device)
    assert len(calls) == 4  # two blocks, each run in the forward and again in the backward
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    _assert_grads_close(grads, want_grads)


def test_timm_blocks_fused_under_autocast_train_as_the_unfused(device, monkeypatch):
    """fp16 autocast (bf16 on a GPU: the interpreter's bf16 dots are wrong): the fused norm hands the MLP its input
    in the autocast dtype, as the Linear's own cast would; loss and gradients as without the fusion, to rounding."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    calls = _count_calls(monkeypatch, "add_layer_norm")
    images = torch.randn(2, 3, 32, 32, device=device)
    results = []
    for add_norm in (False, True):
        model = integrations.apply(_vit(), add_norm=add_norm).to(device)
        with mimkernels.use_backend("triton"), torch.autocast(device, dtype=dtype):
            loss = model(images).float().square().mean()
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    assert len(calls) == 2
    (loss, grads), (want_loss, want_grads) = results[1], results[0]
    torch.testing.assert_close(loss, want_loss, rtol=2e-3, atol=2e-4)
    _assert_grads_close(grads, want_grads, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("switch, option, module", [("FUSED_ADD_NORM", "add_norm", "blocks.0"),
                                                    ("FUSED_GELU_MLP", "gelu_mlp", "blocks.0.mlp")])
def test_fusions_follow_the_models_switches_by_default(switch, option, module, monkeypatch):
    from mimkernels.models import vit

    assert module not in integrations.patched_modules(integrations.apply(_vit()))  # off until a GPU measures it
    monkeypatch.setattr(vit, switch, True)
    assert module in integrations.patched_modules(integrations.apply(_vit()))
    assert module not in integrations.patched_modules(integrations.apply(_vit(), **{option: False}))


def _apply_warnings(model, **options) -> list[str]:
    """The warnings of ``apply(model, **options)`` with attention and patch embedding left alone, sorted."""
    with pytest.warns(UserWarning) as caught:
        integrations.apply(model, attention=False, patch_embed=False, **options)
    return sorted(str(warning.message) for warning in caught)


def test_blocks_whose_norm_or_mlp_differs_keep_the_original_code(device, monkeypatch):
    """A norm2 that is not a plain LayerNorm (timm's fp32 LayerNorm or an RMSNorm, its 16-bit "fast norm") or an MLP
    that does not start with a Linear: that block is not fused, with one warning per reason; the others are."""
    model = _vit(depth=4)
    model.blocks[0].norm2 = NOT_A_PLAIN_LAYER_NORM(64)
    model.blocks[1].norm2._fast_norm = True
    model.blocks[2].mlp = timm.layers.Mlp(64, 128, use_conv=True)  # 1x1 convolutions (a [B, N, C] input fails)
    messages = _apply_warnings(model, add_norm=True)
    assert len(messages) == 2, messages
    assert "does not start with a Linear (blocks.2)" in messages[0]
    assert "2 module(s) keep their original code because its norm2 is not a plain LayerNorm" in messages[1]
    assert integrations.patched_modules(model) == ["blocks.3"]
    original = _vit(depth=4)
    original.blocks[0].norm2 = NOT_A_PLAIN_LAYER_NORM(64)
    x = torch.randn(2, 5, 64, device=device)
    with mimkernels.use_backend("triton"):
        for block, want in zip(model.blocks[::3], original.blocks[::3]):
            torch.testing.assert_close(block.to(device)(x), want.to(device)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, add_norm", [
    ({}, False),
    ({"init_values": 0.1, "class_token": False, "reg_tokens": 2, "global_pool": "avg", "qkv_bias": False}, False),
    ({}, True),  # the fused norm hands the MLP its input
])
def test_timm_mlps_run_gelu_inside_the_gemms(variant, add_norm, device, monkeypatch):
    """gelu_mlp=True: each Mlp is one mimkernels.gelu_mlp call, with the original's outputs and gradients."""
    calls = _count_calls(monkeypatch, "gelu_mlp")
    images = torch.randn(2, 3, 32, 32)
    patched = _assert_same_model_numbers(lambda: _vit(**variant), images, device, add_norm=add_norm, gelu_mlp=True)
    assert {"blocks.0.mlp", "blocks.1.mlp"} <= set(integrations.patched_modules(patched))
    assert len(calls) == 2
    integrations.unapply(patched)
    assert type(patched.blocks[0].mlp) is timm.layers.Mlp


def test_mlps_that_are_not_exact_gelu_linears_keep_the_original_code(device, monkeypatch):
    """The tanh GELU, 1x1 convolutions, a norm between the layers: those MLPs keep their code, one warning per
    reason; an MLP with dropout is patched but runs the original code while training (one warning)."""
    model = _vit(depth=5)
    model.blocks[0].mlp = timm.layers.Mlp(64, 256, act_layer=timm.layers.GELUTanh)
    model.blocks[1].mlp = timm.layers.Mlp(64, 256, use_conv=True)
    model.blocks[2].mlp = timm.layers.Mlp(64, 256, norm_layer=torch.nn.LayerNorm)
    model.blocks[3].mlp = timm.layers.Mlp(64, 256, drop=0.1)
    messages = _apply_warnings(model, gelu_mlp=True)
    assert len(messages) == 4, messages
    assert "1 MLP(s) have dropout" in messages[0]
    assert "because it normalises between its layers (blocks.2.mlp)" in messages[1]
    assert "because its activation (GELUTanh) is not the exact GELU (blocks.0.mlp)" in messages[2]
    assert "because its layers are not Linear (use_conv) (blocks.1.mlp)" in messages[3]
    assert integrations.patched_modules(model) == ["blocks.3.mlp", "blocks.4.mlp"]
    calls = _count_calls(monkeypatch, "gelu_mlp")
    x = torch.randn(2, 5, 64, device=device)
    mlp = model.blocks[3].mlp.to(device)
    with mimkernels.use_backend("triton"):
        mlp.train()(x)
        assert not calls  # dropout while training: the original code
        mlp.eval()(x)
        assert len(calls) == 1


def test_dynamic_img_size_takes_other_sizes(device):
    images = torch.randn(2, 3, 48, 40)  # not the model's 32 x 32
    _assert_same_model_numbers(lambda: _vit(dynamic_img_size=True), images, device)


def test_image_sides_past_whole_patches_are_left_out_as_the_convolution_does(device):
    """A model whose image side is no multiple of the patch (timm's SigLIP so400m/14 at 384 px) runs as the
    original: its Conv2d reads whole patches only, so the last rows and columns get no gradient, patched or not."""
    images = torch.randn(2, 3, 36, 35)  # 4 x 4 patches of 8, and 4 rows / 3 columns past them
    make = lambda: _vit(img_size=(36, 35))  # noqa: E731
    _assert_same_model_numbers(make, images, device)
    pixels = images.to(device).requires_grad_()
    with mimkernels.use_backend("triton"):
        integrations.apply(make().to(device))(pixels).square().sum().backward()
    assert pixels.grad[:, :, :32, :32].abs().amin() > 0 and not pixels.grad[:, :, 32:].any()
    assert not pixels.grad[:, :, :, 32:].any()


def _timm_vit_architectures() -> list[str]:
    """Every architecture this timm registers in the modules whose models are VisionTransformers (one that builds
    another class is skipped by the test; none in 0.9.16 or 1.0.31)."""
    modules = ("vision_transformer", "deit", "vision_transformer_hybrid")
    return [name for module in modules for name in timm.list_models(module=module)]


def _timm_model_without_weights(name, **kwargs):
    """timm's ``name`` on the meta device (its sizes without the time its weights take), or with weights where
    this timm cannot build it there (0.9 reads values while it builds, .item(), which meta tensors have not)."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError:
        return timm.create_model(name, pretrained=False, **kwargs)


def _configuration(model: torch.nn.Module) -> tuple:
    """What a model computes, but for its weights' values: its module tree (repr), parameter and buffer shapes, and
    each module's plain attributes (flags such as a class token's or a pooling's, numbers such as a scale's)."""
    def plain(value):
        return isinstance(value, (bool, int, float, str, type(None))) or (
            isinstance(value, tuple) and all(isinstance(item, (bool, int, float, str)) for item in value))

    shapes = tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())
    attributes = tuple((path, tuple(sorted((key, value) for key, value in vars(module).items()
                                           if not key.startswith("_") and plain(value))))
                       for path, module in model.named_modules())
    return repr(model), shapes, attributes


# configuration -> the first architecture tested with it, in this process (many differ only in their default image
# size, which the test cuts to at most 4 x 4 patches: vit_base_patch16_224 and _384 and deit_base_patch16_224)
_TIMM_CONFIGURATIONS_TESTED: dict = {}


@pytest.mark.parametrize("name", _timm_vit_architectures())
def test_every_timm_vit_architecture_runs_patched_as_the_original(name):
    """Each of timm's ViT architectures at depth 1, every fusion on, patched vs unpatched: the same outputs and
    gradients, or modules kept with a warning, never an error the original does not raise (SigLIP so400m/14 at
    384 px raised one until 2026-12-06). The image is cut to at most 4 x 4 patches with the default size's
    remainder (384 px at patch 14: 62 px), which keeps the test to seconds; an architecture whose cut model has the
    modules, shapes and options of one tested before is skipped (133 of 193 in timm 1.0.31 differ). The torch
    backend: this checks what apply swaps and what the patched modules pass on, with the real models' widths, heads
    and options; the kernels have their own tests."""
    try:
        default = _timm_model_without_weights(name, depth=1)
    except TypeError:  # an architecture whose constructor takes no depth: not a VisionTransformer
        pytest.skip(f"{name} takes no depth")
    if not isinstance(default, VisionTransformer):
        pytest.skip(f"{name} is a {type(default).__name__}")
    channels, height, width = default.pretrained_cfg["input_size"]
    stride = height // default.patch_embed.grid_size[0]  # the patch, or a hybrid's backbone stride
    side = height % stride + stride * min(4, default.patch_embed.grid_size[0])
    torch.manual_seed(0)
    original = _timm_model_without_weights(name, depth=1, img_size=side)
    configuration = (channels, side, _configuration(original))
    if configuration in _TIMM_CONFIGURATIONS_TESTED:
        pytest.skip(f"{name} cut to {side} px is {_TIMM_CONFIGURATIONS_TESTED[configuration]} cut to {side} px")
    _TIMM_CONFIGURATIONS_TESTED[configuration] = name
    if next(original.parameters()).is_meta:
        torch.manual_seed(0)
        original = timm.create_model(name, pretrained=False, depth=1, img_size=side)
    original.eval()
    patched = copy.deepcopy(original)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        integrations.apply(patched, add_norm=True, gelu_mlp=True)
    assert integrations.patched_modules(patched)
    images = torch.randn(1, channels, side, side)
    with mimkernels.use_backend("torch"):
        out, grads = _outputs_and_grads(patched, images, "cpu")
    want_out, want_grads = _outputs_and_grads(original, images, "cpu")
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5 * max(1.0, want_out.abs().max().item()))
    _assert_grads_close(grads, want_grads)


def test_state_dict_module_tree_and_checkpoints_unchanged():
    original, patched = _vit(), integrations.apply(_vit())
    assert [name for name, _ in original.named_modules()] == [name for name, _ in patched.named_modules()]
    state, patched_state = original.state_dict(), patched.state_dict()
    assert state.keys() == patched_state.keys()
    assert all(torch.equal(state[key], patched_state[key]) for key in state)
    other = _vit(depth=2)
    torch.nn.init.normal_(other.head.weight)
    patched.load_state_dict(other.state_dict())  # a checkpoint from an unpatched model loads, and back
    other.load_state_dict(patched.state_dict())
    assert isinstance(patched.blocks[0].attn, TimmAttention) and isinstance(patched.patch_embed, TimmPatchEmbed)


def test_patched_model_copies_pickles_and_unapplies():
    patched = integrations.apply(_vit())
    clone = copy.deepcopy(patched)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    assert integrations.patched_modules(clone) == integrations.patched_modules(patched)
    assert integrations.patched_modules(pickle.loads(pickle.dumps(patched)))
    integrations.unapply(patched)
    assert integrations.patched_modules(patched) == []
    assert type(patched.blocks[0].attn) is TimmAttention and type(patched.patch_embed) is TimmPatchEmbed


def test_causal_and_masked_calls(device):
    """Causal calls on the kernels, masked calls through the original code, as this timm's Attention takes them."""
    causal, masked = _timm_attention_takes("is_causal"), _timm_attention_takes("attn_mask")
    if not (causal or masked):
        pytest.skip(f"timm {timm.__version__}'s Attention takes no attn_mask or is_causal to compare with")
    torch.manual_seed(0)
    module = TimmAttention(64, num_heads=4, qkv_bias=True).to(device)
    x = torch.randn(2, 9, 64, device=device)
    mask = torch.rand(2, 1, 9, 9, device=device) > 0.3
    mask[..., 0] = True
    want_causal = module(x, is_causal=True) if causal else None
    want_masked = module(x, attn_mask=mask) if masked else None
    module.__class__ = integrations._timm.MimkernelsAttention  # what apply() does to each Attention
    with mimkernels.use_backend("triton"):
        if causal:
            torch.testing.assert_close(module(x, is_causal=True), want_causal, rtol=1e-4, atol=1e-5)
        if masked:
            torch.testing.assert_close(module(x, attn_mask=mask), want_masked)  # the original code path


def test_unsupported_modules_keep_the_original_code_with_one_warning(device):
    images = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="2 module.s. keep their original code because .*head dim") as caught:
        patched = integrations.apply(_vit(embed_dim=60, num_heads=5))  # head dim 12: no kernel
    assert len(caught) == 1 and integrations.patched_modules(patched) == ["patch_embed"]
    with pytest.warns(UserWarning, match="attention dropout"):
        dropping = integrations.apply(_vit(attn_drop_rate=0.1))
    dropping.eval()  # no dropout in eval: the kernels run, and agree
    with mimkernels.use_backend("triton"):
        got = dropping.to(device)(images.to(device))
    want_model = _vit(attn_drop_rate=0.1).eval().to(device)
    torch.testing.assert_close(got, want_model(images.to(device)), rtol=1e-4, atol=1e-5)
    dropping.train(), want_model.train()  # dropout while training: the original code, which draws the same masks
    with mimkernels.use_backend("triton"):
        torch.manual_seed(1)
        got = dropping(images.to(device))
    torch.manual_seed(1)
    torch.testing.assert_close(got, want_model(images.to(device)), rtol=1e-4, atol=1e-5)


def test_blocks_whose_attention_is_not_timms_attention_are_named_in_one_warning(device):
    """timm's ParallelScalingBlock (vit_base_patch16_xp_224) computes attention itself: nothing to patch there, and
    apply says so instead of leaving only the patch embedding patched without a word."""
    from timm.models.vision_transformer import ParallelScalingBlock

    images = torch.randn(2, 3, 32, 32)
    make = lambda: _vit(block_fn=ParallelScalingBlock)  # noqa: E731
    with pytest.warns(UserWarning, match=r"2 module.s. keep their original code because their attention "
                                         r"\(ParallelScalingBlock\) is not timm's Attention \(blocks.0, blocks.1\)"):
        patched = integrations.apply(make())
    assert integrations.patched_modules(patched) == ["patch_embed"]
    with pytest.warns(UserWarning, match="their attention"):
        _assert_same_model_numbers(make, images, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        integrations.apply(_vit())  # a model whose blocks hold timm's Attention: no warning
        integrations.apply(_vit(), attention=False, patch_embed=True)


@pytest.mark.parametrize("version, refused", [("0.6.13", True), ("0.9.12", True), ("0.9.16", False),
                                               ("1.0.32.dev0", False)])
@pytest.mark.parametrize("make", [_vit, lambda: torch.nn.Sequential(_vit())], ids=["vit", "holder"])
def test_timm_older_than_the_oldest_tested_is_refused(version, refused, make, monkeypatch):
    """timm before 0.9.16 is untested (0.6 has no timm.layers at all): apply says which release it needs, for a
    timm ViT and for a model holding one."""
    monkeypatch.setattr(timm, "__version__", version)
    model = make()
    if refused:
        with pytest.raises(RuntimeError, match=rf"apply needs timm >= 0.9.16; this is timm {version}"):
            integrations.apply(model)
        assert integrations.patched_modules(model) == []
    else:
        assert integrations.patched_modules(integrations.apply(model))


def test_only_supported_models():
    with pytest.raises(TypeError, match="supports timm.models.vision_transformer.VisionTransformer"):
        integrations.apply(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        integrations.apply("vit_base_patch16_224")
    models = mimkernels.models
    for ours in (models.mae_vit_tiny_patch8(), models.aim_tiny(), models.simmim_vit_tiny_patch8(),
                 models.beit_vit_tiny_patch8(torch.nn.Identity())):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert integrations.apply(ours) is ours  # SimMIM and BEiT were refused as unsupported
    wrapped = torch.compile(_vit(), backend="eager")
    with pytest.raises(TypeError, match="torch.compile wrapper .* apply to the model before wrapping it"):
        integrations.apply(wrapped)
    with pytest.raises(TypeError, match="DataParallel wrapper"):
        integrations.apply(torch.nn.DataParallel(_vit()))


@pytest.mark.parametrize("fused", [{}, {"add_norm": True, "gelu_mlp": True}], ids=["plain", "fused"])
def test_official_mae_of_timm_modules_trains_patched_as_the_original(fused, device, monkeypatch):
    """facebookresearch/mae's MaskedAutoencoderViT is built from timm's PatchEmbed and Blocks but is no timm ViT:
    before 2026-12-06 apply refused it as an unsupported class. Now those modules run on the kernels (counted),
    with the original's loss and every gradient; the model's own masking, unshuffle and loss keep their code, and
    the module names and the state_dict stay as they were."""
    attention_calls, embed_calls = _count_calls(monkeypatch, "qkv_attention"), _count_calls(monkeypatch, "patch_embed")
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _official_mae().to(device)
    patched = integrations.apply(_official_mae(), **fused).to(device)
    fused_parts = bool(fused)
    assert integrations.patched_modules(patched) == ["patch_embed"] + [
        name for block in ("blocks.0", "blocks.1", "decoder_blocks.0")
        for name in ([block] * fused_parts + [f"{block}.attn"] + [f"{block}.mlp"] * fused_parts)]
    assert [name for name, _ in patched.named_modules()] == [name for name, _ in original.named_modules()]
    state, patched_state = original.state_dict(), patched.state_dict()
    assert state.keys() == patched_state.keys() and all(torch.equal(state[key], patched_state[key]) for key in state)
    with mimkernels.use_backend("triton"):
        loss, grads = _training_step(patched, images, noise)
    want_loss, want_grads = _training_step(original, images, noise)
    assert len(attention_calls) == 3 and len(embed_calls) == 1  # three blocks' attention, one patch embedding
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-6)
    assert len(grads) > 10
    _assert_grads_close(grads, want_grads)
    names = integrations.patched_modules(patched)
    assert integrations.patched_modules(integrations.apply(patched, **fused)) == names  # a second apply: no change
    integrations.unapply(patched)
    assert integrations.patched_modules(patched) == [] and type(patched.blocks[0].attn) is TimmAttention


class _Holder(torch.nn.Module):
    """A training script's own module around a model of a library (a task head, a LightningModule)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(10, 3)

    def forward(self, images, noise=None):
        if noise is not None:  # ViTMAE: its loss
            return (self.backbone(images, noise=noise).loss,)
        return self.head(self.backbone(images))


@pytest.mark.parametrize("family", ["timm", "vit_mae"])
def test_models_holding_a_supported_model_get_it_patched(family, device):
    """apply to a module that holds a timm ViT or a ViTMAE: the held model is patched as if given alone (the same
    modules, under the holder's name), and the holder trains with the unpatched one's loss and gradients."""
    make, patches = PATCHED_FAMILIES[family]
    images = torch.randn(2, 3, 32, 32, device=device)
    noise = None if patches is None else torch.rand(2, patches, device=device)
    torch.manual_seed(1)
    original = _Holder(make()).to(device)
    patched = integrations.apply(copy.deepcopy(original))
    alone = integrations.patched_modules(integrations.apply(make()))
    assert integrations.patched_modules(patched) == [f"backbone.{name}" if name else "backbone" for name in alone]
    with mimkernels.use_backend("triton"):
        loss, grads = _training_step(patched, images, noise)
    want_loss, want_grads = _training_step(original, images, noise)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-6)
    assert len(grads) > 10
    _assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("compiled", ["held backbone", "wrapped blocks", "blocks compiled in place", "model in place"])
def test_models_with_a_compiled_part_are_refused(compiled):
    """A part compiled and run before apply: torch 2.11 keeps running its compiled graph, with the original modules'
    code (torch 2.15 retraces it), so apply refuses, naming the part, and patches nothing. Before 2026-12-06 it
    patched a timm ViT's compiled blocks without a word, and on torch 2.11 they kept their original code."""
    vit = _vit()
    if compiled == "held backbone":
        model, name = _Holder(torch.compile(vit, backend="eager")), "backbone"
    elif compiled == "wrapped blocks":
        vit.blocks = torch.nn.Sequential(*(torch.compile(block, backend="eager") for block in vit.blocks))
        model, name = vit, "blocks.0"
    else:
        for module in vit.blocks if compiled == "blocks compiled in place" else [vit]:
            module.compile(backend="eager")
        model, name = vit, "blocks.0" if compiled == "blocks compiled in place" else "the model"
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match=rf"apply: {re.escape(name)} was compiled by torch.compile; apply to the "
                                        r"model before compiling it or any part of it"):
        integrations.apply(model)
    assert integrations.patched_modules(model) == []


def test_models_holding_nothing_supported_are_refused():
    """A model holding no supported model and no timm ViT module: refused as before. One that holds a mimkernels
    model comes back as it is, as that model would."""
    with pytest.raises(TypeError, match=r"holds none"):
        integrations.apply(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm(8)))
    ours = _Holder(mimkernels.models.mae_vit_tiny_patch8())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert integrations.apply(ours) is ours and integrations.patched_modules(ours) == []


@pytest.mark.parametrize("option, value", [("attention", "false"), ("masking", 0), ("loss", None),
                                           ("patch_embed", "no"), ("add_norm", 1), ("gelu_mlp", "off")])
def test_options_that_are_not_bools_are_refused(option, value):
    """A truthy string switched a patch on that its caller meant to switch off; nothing is patched before the error."""
    model = _vit()
    with pytest.raises(TypeError, match=f"{option} must be a bool, got {value!r}"):
        integrations.apply(model, **{option: value})
    assert not integrations.patched_modules(model)


@pytest.mark.parametrize("fused", [{}, {"add_norm": True, "gelu_mlp": True}], ids=["plain", "fused"])
def test_patched_model_compiles_fullgraph(fused, device):
    if device != "cpu":
        pytest.skip("the CPU variant (aot_eager); tests/test_compile.py covers Inductor on a GPU")
    images = torch.randn(2, 3, 32, 32)
    patched = integrations.apply(_vit(), **fused)
    with mimkernels.use_backend("triton"):
        eager = patched(images)
        compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")(images)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- mimkernels.nn


def test_nn_attention_loads_timm_weights_and_matches(device):
    for qk_norm in (False, True):
        torch.manual_seed(0)
        theirs = TimmAttention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm,
                               norm_layer=torch.nn.LayerNorm).to(device)
        ours = mnn.Attention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm).to(device)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 11, 64, device=device)
        with mimkernels.use_backend("triton"):
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
            if _timm_attention_takes("is_causal"):  # else test_nn_attention_prefix_causal_is_the_dense_mask
                torch.testing.assert_close(ours(x, causal=True), theirs(x, is_causal=True), rtol=1e-4, atol=1e-5)


def test_nn_attention_prefix_causal_is_the_dense_mask(device):
    torch.manual_seed(0)
    module = mnn.Attention(64, num_heads=4).to(device)
    x = torch.randn(3, 10, 64, device=device)
    prefix = torch.tensor([0, 4, 10], device=device)
    with mimkernels.use_backend("triton"):
        got = module(x, prefix)
    q, k, v = module.qkv(x).unflatten(-1, (3, 4, 16)).permute(2, 0, 3, 1, 4)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mimkernels.prefix_causal_mask(10, prefix))
    want = module.proj(dense.transpose(1, 2).reshape(3, 10, 64))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_nn_modules_check_their_arguments():
    with pytest.raises(ValueError, match="attn_drop must be 0"):
        mnn.Attention(64, num_heads=4, attn_drop=0.1)
    with pytest.raises(ValueError, match="multiple of 8 in"):
        mnn.Attention(60, num_heads=5)
    attention = mnn.Attention(64, num_heads=4)
    for x in (torch.randn(7, 64), torch.randn(1, 7, 32)):  # were an unpacking error and a GEMM shape error
        with pytest.raises(ValueError, match=r"x must be a tensor \[batch, tokens, 64\]"):
            attention(x)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        mnn.PatchEmbed(30, 8, 3, 16)
    # sizes refused by name (were a ZeroDivisionError, a tensor of negative size, an operand-type error, or a model
    # of no patches and no channels); timm's way of writing a square patch, a pair, is taken
    for kwargs, message in (({"patch_size": 0}, "patch_size must be a positive int or a pair of them, got 0"),
                            ({"patch_size": -4}, "patch_size must be a positive int or a pair of them, got -4"),
                            ({"patch_size": 8.0}, "patch_size must be a positive int or a pair of them, got 8.0"),
                            ({"patch_size": (8, 4)}, r"patch_size must be square .*, got \(8, 4\)"),
                            ({"img_size": 0}, "img_size must be a positive int or a pair of them, got 0"),
                            ({"img_size": (32,)}, r"img_size must be a positive int or a pair of them, got \(32,\)"),
                            ({"in_chans": 0}, "in_chans must be a positive int, got 0"),
                            ({"embed_dim": 0}, "embed_dim must be a positive int, got 0")):
        with pytest.raises(ValueError, match=message):
            mnn.PatchEmbed(**{"img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 16, **kwargs})
    assert mnn.PatchEmbed((32, 48), (8, 8), 3, 16).patch_size == 8
    embed = mnn.PatchEmbed(32, 8, 3, 16)
    with pytest.raises(ValueError, match="must be 32x32"):
        embed(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        embed(torch.randn(1, 1, 32, 32))
    assert mnn.PatchEmbed(None, 8, 3, 16)(torch.randn(1, 3, 40, 24)).shape == (1, 15, 16)
    with pytest.raises(ValueError, match="a height x width of 41x24 is not divisible by the patch size 8"):
        mnn.PatchEmbed(None, 8, 3, 16)(torch.randn(1, 3, 41, 24))


def test_nn_patch_embed_loads_timm_weights_and_matches(device):
    torch.manual_seed(0)
    theirs = TimmPatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16,
                            norm_layer=torch.nn.LayerNorm).to(device)
    ours = mnn.PatchEmbed(32, 8, 3, 16, norm_layer=torch.nn.LayerNorm).to(device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    images = torch.randn(2, 3, 32, 32, device=device)
    with mimkernels.use_backend("triton"):
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Hugging Face ViTMAE


def _hf_config(**kwargs):
    transformers = pytest.importorskip("transformers", reason="transformers is pinned in the requirements files")
    config = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                  decoder_num_attention_heads=2, decoder_intermediate_size=64, mask_ratio=0.75, norm_pix_loss=True,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers, transformers.ViTMAEConfig(**{**config, **kwargs})


def _vit_mae(model_class="ViTMAEForPreTraining", **kwargs):
    transformers, config = _hf_config(**kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config)


def _self_attention_modules() -> bool:
    """Whether the installed transformers has ViTMAE's older modules, a ViTMAESelfAttention in each layer (4.5x, the
    floor's pin, to 5.8), or those of 5.9 and later."""
    _hf_config()
    from mimkernels.integrations import _hf

    return _hf.SELF_ATTENTION_MODULES


def _vit_mae_attention_names() -> list[str]:
    """The attention modules mimkernels patches in _vit_mae(), as the installed transformers names them."""
    layers, attention = (("vit.encoder.layer", ".attention.attention") if _self_attention_modules()
                         else ("vit.layers", ".attention"))
    return [f"{layers}.0{attention}", f"{layers}.1{attention}", f"decoder.decoder_layers.0{attention}"]


def _vit_mae_layer_names() -> list[str]:
    """The ViTMAELayer modules of _vit_mae() (two encoder layers, one decoder layer), as the installed transformers
    names them."""
    layers = "vit.encoder.layer" if _self_attention_modules() else "vit.layers"
    return [f"{layers}.0", f"{layers}.1", "decoder.decoder_layers.0"]


def _vit_mae_mlp_names() -> list[str]:
    """Where each layer's MLP runs: the ViTMAEMLP modules of transformers 5.9 and later; 4.5x-5.8 have none
    (ViTMAEIntermediate and ViTMAEOutput), so their layers run the fused MLP themselves."""
    return [name if _self_attention_modules() else f"{name}.mlp" for name in _vit_mae_layer_names()]


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_patched_vit_mae_matches_the_original(norm_pix_loss, device, monkeypatch):
    calls = {name: _count_calls(monkeypatch, name) for name in ("masking_indices", "patch_embed", "attention",
                                                                 "restore_tokens", "masked_patch_loss")}
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae(norm_pix_loss=norm_pix_loss).to(device)
    patched = integrations.apply(_vit_mae(norm_pix_loss=norm_pix_loss).to(device))
    encoder_attention_0, encoder_attention_1, decoder_attention = _vit_mae_attention_names()
    assert integrations.patched_modules(patched) == [
        "", "vit.embeddings", encoder_attention_0, encoder_attention_1, "decoder", decoder_attention]
    pixels, want_pixels = images.clone().requires_grad_(), images.clone().requires_grad_()
    with mimkernels.use_backend("triton"):
        got = patched(pixels, noise=noise)
        got.loss.backward()
    want = original(want_pixels, noise=noise)
    want.loss.backward()
    # the pixels' gradient: through the patch embedding and, as transformers' loss does not detach it, the target
    torch.testing.assert_close(pixels.grad, want_pixels.grad, rtol=1e-4, atol=1e-4 * want_pixels.grad.abs().max())
    # each op ran on the kernels: one masking and embedding, three attentions, one unshuffle, one loss
    assert {name: len(made) for name, made in calls.items()} == {
        "masking_indices": 1, "patch_embed": 1, "attention": 3, "restore_tokens": 1, "masked_patch_loss": 1}
    assert torch.equal(got.mask, want.mask) and torch.equal(got.ids_restore, want.ids_restore)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    grads = {name: p.grad for name, p in patched.named_parameters() if p.grad is not None}
    want_grads = {name: p.grad for name, p in original.named_parameters() if p.grad is not None}
    assert len(grads) > 20
    _assert_grads_close(grads, want_grads)


def test_vit_mae_that_removes_no_patch_keeps_the_original_loss(device, monkeypatch):
    """mask_ratio 0 (transformers' way to see every patch): the original loss divides 0 by 0, a NaN loss and NaN
    gradients, where masked_patch_loss would give 0; the patched model runs the original loss code and agrees."""
    calls = _count_calls(monkeypatch, "masked_patch_loss")
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae(mask_ratio=0.0).to(device)
    patched = integrations.apply(_vit_mae(mask_ratio=0.0).to(device))
    with mimkernels.use_backend("triton"):
        got = patched(images, noise=noise)
        got.loss.backward()
    want = original(images, noise=noise)
    want.loss.backward()
    assert not calls and not want.mask.any() and torch.equal(got.mask, want.mask)
    assert got.loss.isnan() and want.loss.isnan()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    assert patched.decoder.decoder_pred.weight.grad.isnan().all()


@pytest.mark.parametrize("mask_ratio", [0.9, 1.0])
def test_vit_mae_whose_ratio_keeps_no_patch_runs_as_the_original(mask_ratio, device, monkeypatch):
    """A ratio that keeps none of the 4 patches of a 16 px image (int(4 * 0.1) = 0): the original runs its encoder on
    the [CLS] token alone and scores every patch; mimkernels' masking refuses such a ratio, so the patched model runs
    the original masking and loss (it raised ValueError before), and gives the original's numbers."""
    calls = {name: _count_calls(monkeypatch, name) for name in ("masking_indices", "masked_patch_loss")}
    images, noise = torch.randn(2, 3, 16, 16, device=device), torch.rand(2, 4, device=device)
    original = _vit_mae(mask_ratio=mask_ratio, image_size=16).to(device)
    patched = integrations.apply(_vit_mae(mask_ratio=mask_ratio, image_size=16).to(device))
    with mimkernels.use_backend("triton"):
        got = patched(images, noise=noise)
        got.loss.backward()
    want = original(images, noise=noise)
    want.loss.backward()
    assert not any(calls.values()) and want.mask.all() and torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    _assert_grads_close({name: p.grad for name, p in patched.named_parameters() if p.grad is not None},
                        {name: p.grad for name, p in original.named_parameters() if p.grad is not None})


def _assert_same_vit_mae_step(patched, original, images, noise):
    """One forward + backward of each on the same images and noise: loss, logits and every gradient agree."""
    with mimkernels.use_backend("triton"):
        got = patched(images, noise=noise)
        got.loss.backward()
    want = original(images, noise=noise)
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    _assert_grads_close({name: p.grad for name, p in patched.named_parameters() if p.grad is not None},
                        {name: p.grad for name, p in original.named_parameters() if p.grad is not None})


def test_vit_mae_layers_fuse_the_add_after_attention_with_the_norm(device, monkeypatch):
    """add_norm=True: each ViTMAELayer (encoder and decoder) adds the attention branch in one pass with
    layernorm_after; the loss and every gradient as the original's. Both generations of ViTMAE."""
    calls = _count_calls(monkeypatch, "add_layer_norm")
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae().to(device)
    patched = integrations.apply(_vit_mae().to(device), add_norm=True)
    assert set(_vit_mae_layer_names()) <= set(integrations.patched_modules(patched))
    _assert_same_vit_mae_step(patched, original, images, noise)
    assert len(calls) == 3
    layer = patched.get_submodule(_vit_mae_layer_names()[0])
    unsupported = "its layernorm_after is not a LayerNorm followed by a Linear"
    if _self_attention_modules():  # what a layer must look like to be fused is checked at apply()
        layer.intermediate.dense = torch.nn.Identity()
        assert integrations._hf._layer_fusions_unsupported(layer)["add_norm"] == unsupported
    else:
        layer.mlp.fc1 = torch.nn.Identity()
        assert integrations._hf._layer_unsupported(layer) == unsupported


def test_vit_mae_mlps_run_gelu_inside_the_gemms(device, monkeypatch):
    """gelu_mlp=True: each layer's MLP (transformers 5's ViTMAEMLP; transformers 4's ViTMAEIntermediate and
    ViTMAEOutput, run by the patched layer) is one gelu_mlp call; loss and gradients as the original's."""
    calls = _count_calls(monkeypatch, "gelu_mlp")
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae().to(device)
    patched = integrations.apply(_vit_mae().to(device), add_norm=True, gelu_mlp=True)
    assert set(_vit_mae_mlp_names()) <= set(integrations.patched_modules(patched))
    _assert_same_vit_mae_step(patched, original, images, noise)
    assert len(calls) == 3
    patched = integrations.apply(_vit_mae().to(device), add_norm=False, gelu_mlp=True)  # the MLP fused alone
    original.zero_grad()
    _assert_same_vit_mae_step(patched, original, images, noise)
    assert len(calls) == 6


def test_vit_mae_mlps_of_an_approximate_gelu_keep_their_code(device, monkeypatch):
    """An approximate GELU (``gelu_new``, tanh) is not what gelu_mlp computes: those MLPs keep the original code, with
    one warning naming them, and the add + norm fusion asked beside still runs (on transformers 4 in the same patched
    layer); the numbers are the original's."""
    calls = {name: _count_calls(monkeypatch, name) for name in ("gelu_mlp", "add_layer_norm")}
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae(hidden_act="gelu_new").to(device)
    kept = r"3 module\(s\) keep .* \(NewGELUActivation\) is not the exact GELU \(" + re.escape(
        f"{_vit_mae_layer_names()[0]}.{'intermediate' if _self_attention_modules() else 'mlp'}")
    with pytest.warns(UserWarning, match=kept):
        tanh = integrations.apply(_vit_mae(hidden_act="gelu_new").to(device), gelu_mlp=True, add_norm=True)
    assert set(_vit_mae_layer_names()) <= set(integrations.patched_modules(tanh))
    assert not any(name.endswith("mlp") for name in integrations.patched_modules(tanh))
    _assert_same_vit_mae_step(tanh, original, images, noise)
    assert (len(calls["gelu_mlp"]), len(calls["add_layer_norm"])) == (0, 3)
    with pytest.warns(UserWarning, match=r"3 module\(s\) keep .* is not the exact GELU"):
        alone = integrations.apply(_vit_mae(hidden_act="gelu_new"), gelu_mlp=True)
    assert not set(_vit_mae_mlp_names()) & set(integrations.patched_modules(alone))


def test_vit_mae_of_transformers_4_head_mask_runs_the_original_attention(device):
    """transformers 4.5x (the floor's pin): with every fusion on, the patched model trains as the original, and a
    head mask, passed through the patched layers, runs the original attention (which applies it under eager
    attention)."""
    from transformers.models.vit_mae import modeling_vit_mae as vit_mae

    if not _self_attention_modules() or \
            "head_mask" not in inspect.signature(vit_mae.ViTMAESelfAttention.forward).parameters:
        pytest.skip("transformers 5 installed: its ViTMAE takes no head mask")
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every fusion runs: nothing to warn about
        patched = integrations.apply(_vit_mae().to(device), add_norm=True, gelu_mlp=True)
    encoder_attention_0, encoder_attention_1, decoder_attention = _vit_mae_attention_names()
    layer_0, layer_1, decoder_layer = _vit_mae_layer_names()
    assert integrations.patched_modules(patched) == [
        "", "vit.embeddings", layer_0, encoder_attention_0, layer_1, encoder_attention_1, "decoder", decoder_layer,
        decoder_attention]
    _assert_same_vit_mae_step(patched, original, images, noise)
    head_mask = torch.tensor([1.0, 0.0, 1.0, 0.5], device=device)
    for model in (patched, original):  # sdpa ignores head masks (with a warning); eager applies them
        model.set_attn_implementation("eager")
    with mimkernels.use_backend("triton"):
        got = patched(images, noise=noise, head_mask=head_mask)
    want = original(images, noise=noise, head_mask=head_mask)
    assert not torch.allclose(want.loss, original(images, noise=noise).loss)  # the head mask changes the loss
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-6)


def test_vit_mae_code_of_another_release_keeps_the_original(monkeypatch):
    """A transformers release whose ViTMAE method takes other arguments than the one mimkernels reproduces (here the
    decoder's forward, as transformers 4.4x had it): that module keeps its code, with one warning; the rest is
    patched and the model trains as the original."""
    from transformers.models.vit_mae import modeling_vit_mae as vit_mae

    decoder_forward = vit_mae.ViTMAEDecoder.forward

    def older_forward(self, hidden_states, ids_restore, output_attentions=False, interpolate_pos_encoding=False):
        return decoder_forward(self, hidden_states, ids_restore, interpolate_pos_encoding=interpolate_pos_encoding)

    monkeypatch.setattr(vit_mae.ViTMAEDecoder, "forward", older_forward)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    original = _vit_mae()
    with pytest.warns(UserWarning, match=r"1 module\(s\) keep .* because this transformers release's "
                                         r"ViTMAEDecoder.forward is not one mimkernels reproduces \(decoder\)"):
        patched = integrations.apply(_vit_mae())
    assert "decoder" not in integrations.patched_modules(patched)
    assert "vit.embeddings" in integrations.patched_modules(patched)
    _assert_same_vit_mae_step(patched, original, images, noise)


def test_vit_mae_model_of_an_image_size_past_whole_patches(device, monkeypatch):
    """ViTMAEModel configured for 36 px with patches of 8 embeds 4 x 4 patches, as its convolution does (the
    pre-training model's loss refuses such sizes itself)."""
    calls = _count_calls(monkeypatch, "patch_embed")
    images, noise = torch.randn(2, 3, 36, 36, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae("ViTMAEModel", image_size=36).to(device)
    patched = integrations.apply(_vit_mae("ViTMAEModel", image_size=36).to(device))
    with mimkernels.use_backend("triton"):
        got = patched(images, noise=noise).last_hidden_state
    want = original(images, noise=noise).last_hidden_state
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masking, patch_embed", [(False, True), (True, False)])
def test_vit_mae_masking_and_patch_embedding_each_off(masking, patch_embed, monkeypatch):
    """masking=False keeps the embeddings' and the decoder's code (and so HF's patch embedding, with a warning: ours
    embeds only the kept patches); patch_embed=False runs HF's convolution, then mimkernels' masking."""
    calls = {name: _count_calls(monkeypatch, name) for name in ("masking_indices", "random_masking", "patch_embed",
                                                                 "restore_tokens")}
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    original = _vit_mae()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched = integrations.apply(_vit_mae(), masking=masking, patch_embed=patch_embed)
    assert [str(w.message) for w in caught] == ([] if masking else [
        "mimkernels.integrations: patch_embed=True without masking=True keeps HF's patch embedding (ours embeds only "
        "the kept patches)"])
    assert ("vit.embeddings" in integrations.patched_modules(patched)) is masking
    assert ("decoder" in integrations.patched_modules(patched)) is masking
    _assert_same_vit_mae_step(patched, original, images, noise)
    assert {name: len(made) for name, made in calls.items()} == {
        "masking_indices": 0, "random_masking": int(masking), "patch_embed": 0, "restore_tokens": int(masking)}


@pytest.mark.parametrize("fused", [{}, {"add_norm": True, "gelu_mlp": True}], ids=["plain", "fused"])
def test_patched_vit_mae_under_gradient_checkpointing(fused, device, monkeypatch):
    """Hugging Face's gradient checkpointing on a patched ViTMAE: the encoder and decoder layers' attention (and MLP,
    when fused) runs again in the backward, and loss, logits and every gradient are those of the unpatched model
    without checkpointing."""
    calls, mlp_calls = _count_calls(monkeypatch, "attention"), _count_calls(monkeypatch, "gelu_mlp")
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    original = _vit_mae().to(device)
    patched = integrations.apply(_vit_mae().to(device), **fused)
    # transformers 5 renamed the switch (the old name warns there); 4.57 has only the old one
    enable = getattr(patched, "activation_checkpointing_enable", None) or patched.gradient_checkpointing_enable
    enable()
    _assert_same_vit_mae_step(patched, original, images, noise)
    assert len(calls) == 6  # three layers, each run in the forward and again in the backward
    assert len(mlp_calls) == (6 if fused else 0)


@pytest.mark.parametrize("fused", [{}, {"add_norm": True, "gelu_mlp": True}], ids=["plain", "fused"])
def test_patched_vit_mae_compiles_fullgraph(fused, device):
    """A patched ViTMAEForPreTraining under torch.compile(fullgraph=True) (aot_eager on the CPU): with the noise given,
    and drawn inside the forward from the same seed, the loss and every gradient as in eager."""
    if device != "cpu":
        pytest.skip("the CPU variant (aot_eager); tests/test_compile.py covers Inductor on a GPU")
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    patched = integrations.apply(_vit_mae(), **fused)

    def step(model, **noise_if_given):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = model(images, **noise_if_given).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in patched.named_parameters() if p.grad is not None}

    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    with mimkernels.use_backend("triton"):
        for given in ({"noise": noise}, {}):
            want_loss, want_grads = step(patched, **given)
            loss, grads = step(compiled, **given)
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
            _assert_grads_close(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_patched_vit_mae_draws_the_same_masks_without_noise():
    images = torch.randn(2, 3, 32, 32)
    original, patched = _vit_mae(), integrations.apply(_vit_mae())
    torch.manual_seed(7)
    want = original(images)
    torch.manual_seed(7)
    with mimkernels.use_backend("triton"):
        got = patched(images)
    assert torch.equal(got.ids_restore, want.ids_restore)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-6)


def test_patched_vit_mae_saves_the_checkpoint_of_the_original(tmp_path):
    """save_pretrained writes what the unpatched model writes (config.architectures names transformers' class, not
    ours), and the checkpoint loads into an unpatched model with the same weights."""
    import json

    original, patched = _vit_mae(), _vit_mae()
    integrations.apply(patched)
    original.save_pretrained(tmp_path / "original")
    patched.save_pretrained(tmp_path / "patched")
    assert type(patched).__name__ == "MimkernelsViTMAEForPreTraining"  # back after saving
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("original", "patched")]
    assert configs[0] == configs[1] and configs[1]["architectures"] == ["ViTMAEForPreTraining"]
    transformers = pytest.importorskip("transformers")
    loaded = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "patched")
    assert type(loaded) is transformers.ViTMAEForPreTraining
    for (name, want), got in zip(patched.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got, want), name


def _transformer_layers(model) -> list[torch.nn.Module]:
    """The blocks a training recipe shards one by one: timm's blocks (the official MAE's decoder blocks too),
    ViTMAE's encoder and decoder layers."""
    if hasattr(model, "blocks"):
        return [*model.blocks, *getattr(model, "decoder_blocks", [])]
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

    return [module for module in model.modules() if isinstance(module, ViTMAELayer)]


def _training_step(model, images, noise) -> tuple[torch.Tensor, dict]:
    """One training step's loss and gradients, by the unwrapped parameter names (DDP adds "module."), each whole
    (FSDP2's are sharded DTensors)."""
    model.zero_grad(set_to_none=True)
    loss = model(images).square().mean() if noise is None else model(images, noise=noise)[0]  # ViTMAE's: .loss
    loss.backward()
    return loss.detach(), {name.removeprefix("module."): getattr(p.grad, "full_tensor", lambda g=p.grad: g)()
                           for name, p in model.named_parameters() if p.grad is not None}


def _official_mae():
    """facebookresearch/mae's MaskedAutoencoderViT, tiny: timm's PatchEmbed and Blocks in a model of its own."""
    from benchmarks.official import TimmMAE

    torch.manual_seed(0)
    return TimmMAE(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                   decoder_depth=1, decoder_num_heads=2)


# model, patches to draw noise for
PATCHED_FAMILIES = {"timm": (_vit, None), "vit_mae": (_vit_mae, 16), "official_mae": (_official_mae, 16)}


@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_patched_models_moved_to_float64_run_the_original_code(family):
    """``model.double()`` after apply (a float64 check of a model's numbers): the kernels have no float64 tiles, and
    each patched module raised TypeError; now each runs its original code, so the loss and every gradient are the
    unpatched float64 model's, bit for bit (the decoder's unshuffle stays on the token ops, which move float64
    exactly)."""
    make, patches = PATCHED_FAMILIES[family]
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = None if patches is None else torch.rand(2, patches, dtype=torch.float64)
    patched = integrations.apply(make(), add_norm=True, gelu_mlp=True).double()
    with mimkernels.use_backend("triton"):
        loss, grads = _training_step(patched, images, noise)
    want_loss, want_grads = _training_step(make().double(), images, noise)
    assert loss.dtype == torch.float64 and torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    for name, want in want_grads.items():
        assert torch.equal(grads[name], want), name


# torch 2.15's FSDP2 warns that ViTMAE returns a view: its logits are a slice, in the original as in the patched model
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module.*returned a view:UserWarning")
@pytest.mark.parametrize("wrap", ["fully_shard", "ddp"])
@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_patched_models_train_under_fsdp2_and_ddp_as_the_original(family, wrap, one_rank_group, monkeypatch):
    """apply, then shard each block and the model with FSDP2's fully_shard (or wrap the model in DDP), as a training
    recipe does: the sharded blocks run their patched code (one fused add and norm each), and the loss and every
    gradient are the unwrapped original's."""
    from torch.distributed.fsdp import fully_shard

    make, patches = PATCHED_FAMILIES[family]
    calls = _count_calls(monkeypatch, "add_layer_norm")
    images = torch.randn(2, 3, 32, 32)
    noise = None if patches is None else torch.rand(2, patches)
    patched = integrations.apply(make(), add_norm=True, gelu_mlp=True)
    names = integrations.patched_modules(patched)
    layers = _transformer_layers(patched)
    if wrap == "fully_shard":
        for layer in layers:
            fully_shard(layer)
        fully_shard(patched)
    else:
        patched = torch.nn.parallel.DistributedDataParallel(patched)
    assert [re.sub(r"^module\.?", "", name) for name in integrations.patched_modules(patched)] == names
    with mimkernels.use_backend("triton"):
        loss, grads = _training_step(patched, images, noise)
    want_loss, want_grads = _training_step(make(), images, noise)
    assert len(calls) == len(layers) >= 2
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-6)
    assert len(grads) > 10
    _assert_grads_close(grads, want_grads)


class _LossOf(torch.nn.Module):
    """A masked-image model's loss for given noise, as a module of its own."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, noise):
        return self.model(images, noise=noise)[0]


@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_patched_models_trace_their_original_code(family):
    """torch.jit.trace (TorchScript, and torch.onnx.export(dynamo=False), which traces) records no Triton launch, and
    the ops refuse it; a patched model runs its original code while traced, so its traced graph gives the unpatched
    model's outputs on inputs it was not traced with. Before 2026-12-06 tracing a patched model failed inside the
    ops (on a GPU it would have recorded a graph without the kernels)."""
    make, patches = PATCHED_FAMILIES[family]
    patched, original = integrations.apply(make(), add_norm=True, gelu_mlp=True).eval(), make().eval()

    def output(model):  # a module (the tracer takes parameters only from one)
        return model if patches is None else _LossOf(model)

    def inputs(seed):
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(2, 3, 32, 32, generator=gen)
        return (images,) if patches is None else (images, torch.rand(2, patches, generator=gen))

    with mimkernels.use_backend("triton"), torch.no_grad():
        traced = torch.jit.trace(output(patched), inputs(0), check_trace=False)
        assert integrations.patched_modules(patched)
        for seed in (1, 2):
            torch.testing.assert_close(traced(*inputs(seed)), output(original)(*inputs(seed)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_patched_models_compile_with_symbolic_sizes(family):
    """``torch.compile(fullgraph=True, dynamic=True)`` (every size symbolic, and a module's float attributes too):
    timm's ``Attention.scale`` reached the attention op as a symbolic float, whose finiteness check Dynamo could not
    trace, so a patched model failed to compile where the unpatched one compiles. Two batch sizes: eager's loss and
    gradients. The official MAE code computes its kept-token count from its float mask ratio, which dynamic=True makes
    symbolic, and Dynamo cannot pass a size computed from a symbolic float into any autograd.Function
    (``test_compile.py``'s ``test_dynamo_cannot_pass_sizes_from_symbolic_floats_into_autograd_functions``):
    that model compiles with the floats specialised, the workaround the README gives."""
    make, patches = PATCHED_FAMILIES[family]
    patched = integrations.apply(make(), add_norm=True, gelu_mlp=True)

    def loss_of(images, noise):
        return patched(images).square().mean() if noise is None else patched(images, noise=noise)[0]

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager", dynamic=True)
    with mimkernels.use_backend("triton"), torch._dynamo.config.patch(specialize_float=family == "official_mae"):
        for batch in (2, 3):
            images = torch.randn(batch, 3, 32, 32)
            noise = None if patches is None else torch.rand(batch, patches)
            params = [p for p in patched.parameters() if p.requires_grad]
            want = loss_of(images, noise)
            want_grads = torch.autograd.grad(want, params, allow_unused=True)
            got = compiled(images, noise)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for g, w in zip(torch.autograd.grad(got, params, allow_unused=True), want_grads):
                assert (g is None) == (w is None)
                if w is not None:
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sharded", ["model and blocks", "one block"])
@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_models_sharded_before_apply_are_refused(family, sharded, one_rank_group):
    """apply after fully_shard: FSDP gave each module it sharded a class of its own, made from the module's, which
    a swap would drop and which apply used to skip without a word (a sharded ViTMAE was no supported class at all).
    apply refuses with the order to follow, naming the first sharded module, and patches nothing."""
    from torch.distributed.fsdp import fully_shard

    model = PATCHED_FAMILIES[family][0]()
    layers = _transformer_layers(model)
    for layer in layers if sharded == "model and blocks" else layers[1:2]:
        fully_shard(layer)
    if sharded == "model and blocks":
        fully_shard(model)
    first = "the model" if sharded == "model and blocks" else \
        next(name for name, module in model.named_modules() if module is layers[1])
    with pytest.raises(TypeError, match=rf"sharded by FSDP \({re.escape(first)} is a FSDP\w+\): apply to the model "
                                        r"before fully_shard"):
        integrations.apply(model)
    assert integrations.patched_modules(model) == []


def test_unapply_refuses_blocks_sharded_after_apply(one_rank_group):
    """unapply gave each patched module the class under its own, which for a block sharded after apply is FSDP's
    FSDPModule: the model lost its blocks' code. It now refuses, naming those blocks, and changes nothing."""
    from torch.distributed.fsdp import fully_shard

    model = integrations.apply(_vit(), add_norm=True)
    names = integrations.patched_modules(model)
    fully_shard(model.blocks[1])
    with pytest.raises(TypeError, match=r"unapply: blocks\.1 \(FSDP\w+\) got a class made from its patched class "
                                        r"after apply .* unapply before sharding"):
        integrations.unapply(model)
    assert integrations.patched_modules(model) == names
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_patched_vit_mae_model_state_dict_and_fallbacks():
    model = _vit_mae("ViTMAEModel")
    state = {key: value.clone() for key, value in model.state_dict().items()}
    integrations.apply(model)
    assert model.state_dict().keys() == state.keys()
    assert integrations.patched_modules(model)[0] == "embeddings"
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"doesn't match model \(32\*32\)"):
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 16\)"):  # an error about pos_embed before
        model(images, noise=torch.rand(2, 5))
    with mimkernels.use_backend("triton"):
        bigger = model(torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)  # the original code path
        assert bigger.last_hidden_state.shape == (1, 1 + 9, 64)
    # weights asked for: the original attention, which returns them under eager attention
    model.set_attn_implementation("eager")
    reference = _vit_mae("ViTMAEModel")
    reference.set_attn_implementation("eager")
    noise = torch.rand(2, 16)
    with mimkernels.use_backend("triton"):
        got = model(images, noise=noise, output_attentions=True).attentions
    want = reference(images, noise=noise, output_attentions=True).attentions
    assert len(want) == 2 and len(got) == 2
    for got_layer, want_layer in zip(got, want):
        torch.testing.assert_close(got_layer, want_layer)
    integrations.unapply(model)
    assert integrations.patched_modules(model) == []
    with pytest.warns(UserWarning, match="attention keeps its original code"):
        integrations.apply(_vit_mae("ViTMAEModel", hidden_size=60, num_attention_heads=5))


@pytest.mark.parametrize("asked_in", ["call", "config"])
def test_patched_vit_mae_returns_the_attention_weights_asked_for(asked_in):
    """output_attentions, given to the forward or set in the config (which transformers 5 reads when the call does
    not say): the patched attention runs the original code, whose weights (eager attention) and outputs come back as
    the unpatched model's."""
    config = {"output_attentions": True} if asked_in == "config" else {}
    call = {"output_attentions": True} if asked_in == "call" else {}
    original, patched = _vit_mae("ViTMAEModel", **config), integrations.apply(_vit_mae("ViTMAEModel", **config))
    encoder_attention = {name.removeprefix("vit.") for name in _vit_mae_attention_names()[:2]}  # no decoder here
    assert encoder_attention <= set(integrations.patched_modules(patched))
    for model in (original, patched):
        model.set_attn_implementation("eager")
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with mimkernels.use_backend("triton"):
        got = patched(images, noise=noise, **call)
    want = original(images, noise=noise, **call)
    assert len(want.attentions) == 2 and len(got.attentions) == 2
    for got_layer, want_layer in zip(got.attentions, want.attentions):
        torch.testing.assert_close(got_layer, want_layer)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version, refused", [("4.46.3", True), ("4.56.2", True), ("4.57.0.dev0", False),
                                               ("5.0.0rc1", False)])
def test_transformers_older_than_the_oldest_tested_is_refused(version, refused, monkeypatch):
    """Before 4.57 ViTMAE chose its attention class per implementation and its decoder took other arguments: apply
    and register_hf_attention say which release they need instead of patching part of the model."""
    _hf_config()
    from mimkernels.integrations import _hf

    monkeypatch.setattr(_hf.transformers, "__version__", version)
    model = _vit_mae("ViTMAEModel")
    if refused:
        with pytest.raises(RuntimeError, match=rf"apply needs transformers >= 4.57.0; this is transformers {version}"):
            integrations.apply(model)
        assert integrations.patched_modules(model) == []
        with pytest.raises(RuntimeError, match=r"register_hf_attention needs transformers >= 4.57.0"):
            integrations.register_hf_attention()
    else:
        assert integrations.patched_modules(integrations.apply(model))


def test_mimkernels_as_a_transformers_attention_implementation(device):
    name = integrations.register_hf_attention()
    images, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    reference_model = _vit_mae("ViTMAEModel").to(device)
    model = _vit_mae("ViTMAEModel").to(device)
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == "mimkernels"
    calls = []
    with mimkernels.use_backend("triton"):
        original_attention = mimkernels.attention
        try:
            mimkernels.attention = lambda *args, **kwargs: calls.append(1) or original_attention(*args, **kwargs)
            got = model(images, noise=noise).last_hidden_state
        finally:
            mimkernels.attention = original_attention
    assert len(calls) == 2  # one per layer
    want = reference_model(images, noise=noise).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_mimkernels_attention_implementation_in_a_causal_lm(kv_heads, device):
    """A tiny Llama with attn_implementation="mimkernels" gives sdpa's logits: plain causal calls on our kernels;
    a padded batch (the mask: without a mask function of ours, transformers passed none and the padding was
    attended to), grouped kv heads and generation's kv cache (they raised) through transformers' sdpa code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    name = integrations.register_hf_attention()
    config = dict(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=64)
    models = []
    for implementation in ("sdpa", name):
        torch.manual_seed(0)
        models.append(LlamaForCausalLM(LlamaConfig(**config, attn_implementation=implementation)).to(device).eval())
    want_model, model = models
    tokens = torch.randint(0, 50, (2, 9), device=device)
    padding = torch.tensor([[0, 0] + [1] * 7, [1] * 9], device=device)  # left padding in the first sample
    calls = []
    original_attention = mimkernels.attention
    try:
        mimkernels.attention = lambda *args, **kwargs: calls.append(kwargs) or original_attention(*args, **kwargs)
        with mimkernels.use_backend("triton"), torch.no_grad():
            plain = model(tokens).logits
            padded = model(tokens, attention_mask=padding).logits
            generated = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=3,
                                       do_sample=False)
    finally:
        mimkernels.attention = original_attention
    with torch.no_grad():
        torch.testing.assert_close(plain, want_model(tokens).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded, want_model(tokens, attention_mask=padding).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(generated, want_model.generate(tokens, attention_mask=torch.ones_like(tokens),
                                                          max_new_tokens=3, do_sample=False))
    # our kernels ran, causal, for every layer of the plain call and of generation's prompt (without grouped heads)
    assert calls == ([{"causal": True, "scale": 0.25}] * 4 if kv_heads == 4 else [])


def _tiny_transformers_model(family: str, implementation: str):
    import transformers

    torch.manual_seed(0)
    if family == "vit":  # bidirectional self-attention on our kernels
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64)
        model = transformers.ViTModel(config, add_pooling_layer=False)
    elif family == "bert":  # bidirectional, and a padded batch through sdpa's code
        config = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64)
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:  # bart: causal self-attention on our kernels, cross-attention (other lengths) through sdpa's code
        config = transformers.BartConfig(vocab_size=50, d_model=64, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64, max_position_embeddings=32)
        model = transformers.BartModel(config)
    model.set_attn_implementation(implementation)
    return model.eval()


@pytest.mark.parametrize("family, kernel_calls", [("vit", 2), ("bert", 0), ("bart", 2)])
def test_mimkernels_attention_implementation_gives_sdpa_gradients(family, kernel_calls, device):
    """Outputs and every parameter gradient as with sdpa, for a vision encoder, a padded text encoder and an
    encoder-decoder; ``kernel_calls`` counts the calls that ran on our kernels (the rest went to sdpa's code)."""
    name = integrations.register_hf_attention()
    transformers = pytest.importorskip("transformers")
    if family == "bart" and int(transformers.__version__.split(".")[0]) < 5:
        kernel_calls = 1  # transformers 4's Bart hands its decoder a causal mask tensor, which goes to sdpa's code
    gen = torch.Generator().manual_seed(1)
    if family == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    else:
        inputs = {"input_ids": torch.randint(0, 50, (2, 9), generator=gen)}
        if family == "bert":
            inputs["attention_mask"] = torch.tensor([[1] * 7 + [0] * 2, [1] * 9])
        else:
            inputs["decoder_input_ids"] = torch.randint(0, 50, (2, 6), generator=gen)
    inputs = {key: value.to(device) for key, value in inputs.items()}
    results = []
    original_attention = mimkernels.attention
    for implementation in ("sdpa", name):
        model = _tiny_transformers_model(family, implementation).to(device)
        calls = []
        try:
            mimkernels.attention = lambda *args, _calls=calls, **kwargs: (_calls.append(kwargs)
                                                                          or original_attention(*args, **kwargs))
            with mimkernels.use_backend("triton"):
                hidden = model(**inputs).last_hidden_state
        finally:
            mimkernels.attention = original_attention
        if "attention_mask" in inputs:  # the padded positions' outputs are not compared (nor trained on)
            hidden = hidden * inputs["attention_mask"][..., None]
        weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2)).to(device)
        (hidden * weights).sum().backward()  # not a norm of the output: a final LayerNorm would make that constant
        results.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        len(calls)))
    (want, want_grads, _), (got, grads, calls) = results
    assert calls == kernel_calls
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    _assert_grads_close(grads, want_grads)


# ----------------------------------------------------------------------------- on a GPU, bf16, ViT-B sizes


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [{}, {"add_norm": True}, {"gelu_mlp": True}], ids=["plain", "add_norm", "gelu_mlp"])
@pytest.mark.parametrize("name", ["timm_vit_b16", "hf_vit_mae_base"])
def test_patched_models_match_on_gpu_in_bf16(name, fused):
    """The benchmark's models at full size: patched and unpatched losses and gradients agree under bf16 autocast."""
    from benchmarks import bench_integrations

    images = torch.randn(8, 3, 224, 224, device="cuda")
    labels, noise = torch.randint(0, 1000, (8,), device="cuda"), torch.rand(8, 196, device="cuda")
    results = []
    for patch in (False, True):
        model = bench_integrations.build(name).cuda()
        if patch:
            integrations.apply(model, **fused)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = bench_integrations.loss_fn(name, model, images, labels, noise)()
        loss.backward()
        results.append((loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (want_loss, want_grads) = results[1], results[0]
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=1e-3)
    # Gradients that are zero in exact arithmetic come out as rounding noise (~1e-8 per element) on both sides, with
    # no direction to compare: the key projection's bias (softmax ignores a shift shared by a row's scores).
    noise_floor = 1e-4 * torch.stack([g.norm() for g in want_grads.values()]).norm()
    for key in want_grads:  # bf16 end to end: compare each gradient's direction and size, not element-wise
        got, want = grads[key].flatten(), want_grads[key].flatten()
        if want.norm() <= noise_floor:
            assert got.norm() <= noise_floor, key
            continue
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.95, key
        assert abs(got.norm() / want.norm() - 1) < 0.1, key
