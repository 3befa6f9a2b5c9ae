"""Reference MAE and AIM models: the fused backend against the official computation on the same weights.

Truth is the official code path (benchmarks/official.py: facebookresearch/mae's forward, ml-aim's dense
prefix mask + SDPA) run on the model's own parameters in float64. The fused backend (Triton kernels;
through the interpreter on CPU) and the torch backend run in fp32; each loss, prediction and parameter
gradient of the fused model may be off by at most 2x the error of the official code run in fp32, plus a
small floor (the budget of tests/test_attention.py).
"""
import copy
import re

import pytest
import torch

import mimkernels
from benchmarks import official
from mimkernels.models import (
    AIM,
    CONFIGS,
    MAE,
    SimMIM,
    aim_tiny,
    mae_vit_base_patch16,
    mae_vit_tiny_patch8,
    simmim_vit_tiny_patch8,
)
from mimkernels.models.vit import sincos_pos_embed

FUSED = "auto" if torch.cuda.is_available() else "triton"
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 5e-3}  # relative to the largest value compared


def small_mae(**kwargs):
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=48,
                  decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    return MAE(**{**config, **kwargs})


def small_aim(**kwargs):
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_depth=2, head_embed_dim=48)
    return AIM(**{**config, **kwargs})


def run(model, fn, backend="torch", autocast=None):
    """(outputs, {param name: grad}) of ``fn(model)``, whose first output is the loss."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device.type
    with mimkernels.use_backend(backend), torch.autocast(device, autocast or torch.float32, enabled=bool(autocast)):
        outputs = fn(model)
    outputs[0].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return [o.detach() for o in outputs], grads


def max_err(got, want):
    return (got.double() - want).abs().max().item()


def assert_fused_within_budget(model, make_inputs, official_fn, model_fn, autocast=None):
    """Fused (fp32, or under bf16 autocast) vs official float64, against the official code's error in the
    same precision."""
    inputs = make_inputs(torch.float32)
    model64 = copy.deepcopy(model).double()
    want, want_grads = run(model64, lambda m: official_fn(m, *make_inputs(torch.float64)))
    base, base_grads = run(model, lambda m: official_fn(m, *inputs), autocast=autocast)
    got, got_grads = run(model, lambda m: model_fn(m, *inputs), FUSED, autocast)
    torch_out, _ = run(model, lambda m: model_fn(m, *inputs), "torch", autocast)
    floor = FLOOR[autocast or torch.float32]
    pairs = [(f"output {i}", g, b, w) for i, (g, b, w) in enumerate(zip(got, base, want))]
    pairs += [(f"grad {n}", got_grads[n], base_grads[n], want_grads[n]) for n in want_grads]
    for name, g, b, w in pairs:
        budget = 2 * max_err(b, w) + floor * max(1.0, w.abs().max().item())
        assert max_err(g, w) <= budget, f"{name}: error {max_err(g, w):.3e} > budget {budget:.3e}"
    for i, (t, w) in enumerate(zip(torch_out, want)):  # the plain PyTorch backend is the same computation
        assert max_err(t, w) <= 2 * max_err(base[i], w) + floor * max(1.0, w.abs().max().item())
    assert len(want_grads) == len(list(p for p in model.parameters() if p.requires_grad))


# ----------------------------------------------------------------------------- MAE


def official_mae_keys(depth, decoder_depth):
    """The state_dict keys of facebookresearch/mae's MaskedAutoencoderViT (timm blocks)."""
    def block(prefix):
        return [f"{prefix}.{part}.{kind}" for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                       "mlp.fc2") for kind in ("weight", "bias")]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    for i in range(depth):
        keys += block(f"blocks.{i}")
    for i in range(decoder_depth):
        keys += block(f"decoder_blocks.{i}")
    return set(keys)


def test_mae_state_dict_has_the_official_keys_and_shapes():
    model = mae_vit_base_patch16()
    state = model.state_dict()
    assert set(state) == official_mae_keys(12, 8)
    assert state["pos_embed"].shape == (1, 197, 768) and state["decoder_pos_embed"].shape == (1, 197, 512)
    assert state["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert state["blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert state["decoder_pred.weight"].shape == (16 * 16 * 3, 512)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert sum(p.numel() for p in model.parameters()) == 111_907_840


def test_mae_loads_a_foreign_state_dict_unchanged():
    model = small_mae()
    foreign = {name: torch.randn_like(t) for name, t in small_mae().state_dict().items()}
    model.load_state_dict(foreign, strict=True)
    assert all(torch.equal(model.state_dict()[name], t) for name, t in foreign.items())


def test_sincos_pos_embed_is_maes():
    for dim, grid in ((768, 14), (32, 4), (512, 16)):
        want = torch.from_numpy(official.get_2d_sincos_pos_embed(dim, grid, cls_token=True)).float()
        assert torch.allclose(sincos_pos_embed(dim, grid, grid, cls_token=True)[0], want, atol=1e-6)


def mae_inputs(batch, size, channels=3, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, channels, size, size, generator=gen).to(device)
    noise = torch.rand(batch, (size // 8) ** 2, generator=gen).to(device)
    return lambda dtype: (imgs.to(dtype), 0.75, noise)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_matches_the_official_forward(norm_pix_loss):
    torch.manual_seed(0)
    model = small_mae(norm_pix_loss=norm_pix_loss)
    assert_fused_within_budget(model, mae_inputs(3, 32), official.mae_forward,
                               lambda m, imgs, ratio, noise: m(imgs, ratio, noise=noise))


def test_mae_head_dim_40_and_odd_mask_ratio():
    torch.manual_seed(1)
    model = small_mae(embed_dim=80, decoder_embed_dim=80, num_heads=2, decoder_num_heads=2)
    make = mae_inputs(2, 32, seed=1)
    assert_fused_within_budget(model, lambda dtype: (*make(dtype)[:1], 0.6, make(dtype)[2]), official.mae_forward,
                               lambda m, imgs, ratio, noise: m(imgs, ratio, noise=noise))


def test_the_tiny_configs_fused_match_the_official_code():
    """The shipped tiny configs (64 px, 64 patches, head dims 32 and 16) end to end."""
    torch.manual_seed(7)
    mae = mae_vit_tiny_patch8(norm_pix_loss=True)
    assert_fused_within_budget(mae, mae_inputs(2, 64, seed=7), official.mae_forward,
                               lambda m, imgs, ratio, noise: m(imgs, ratio, noise=noise))
    aim = aim_tiny()
    assert_fused_within_budget(aim, aim_inputs(2, 64, [1, 40], seed=7), official.aim_forward,
                               lambda m, imgs, prefix_len: m(imgs, prefix_len))


def test_mae_same_noise_same_mask_on_every_backend():
    model = small_mae()
    imgs, _, noise = mae_inputs(2, 32)(torch.float32)
    masks = []
    for backend in ("torch", FUSED):
        with mimkernels.use_backend(backend):
            masks.append(model(imgs, noise=noise)[2])
    assert torch.equal(masks[0], masks[1]) and masks[0].sum().item() == 2 * 12
    assert torch.equal(masks[0], official.random_masking(torch.zeros(2, 16, 1), 0.75, noise)[1])


@pytest.mark.parametrize("build", [lambda flag: small_mae(norm_pix_loss=flag),
                                   lambda flag: mimkernels.models.aim_tiny(norm_pix_loss=flag),
                                   lambda flag: mimkernels.models.simmim_vit_tiny_patch8(norm_pix_loss=flag)],
                         ids=["mae", "aim", "simmim"])
def test_norm_pix_loss_must_be_a_bool(build):
    """A string such as "false" is truthy: it was taken as True until the loss op refused it at the first forward."""
    for flag in ("false", 1, None):
        with pytest.raises(TypeError, match=f"norm_pix_loss must be a bool, got {flag!r}"):
            build(flag)


def test_mae_rejects_bad_images():
    model = small_mae()
    with pytest.raises(ValueError, match="imgs must be"):
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="imgs must be"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=1.0)
    # noise ranks the model's patches: named by its shape (an error about pos_embed's shape before)
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 16\)"):
        model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 5))
    with pytest.raises(ValueError, match="head dim"):
        small_mae(embed_dim=36, num_heads=3)
    with pytest.raises(ValueError, match="patch_size must be a positive int or a pair of them, got 0"):
        small_mae(patch_size=0)


@pytest.mark.parametrize("build, argument, value, message", [
    (small_mae, "depth", -1, "depth must be a non-negative int, got -1"),  # built no block before, silently
    (small_mae, "decoder_depth", 2.0, "decoder_depth must be a non-negative int, got 2.0"),
    (small_aim, "head_depth", -3, "head_depth must be a non-negative int, got -3"),
    (lambda **kwargs: SimMIM(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, **kwargs}), "depth",
     True, "depth must be a non-negative int, got True"),
    (small_mae, "mlp_ratio", 0, "mlp_ratio must be a positive number"),  # empty MLPs before, silently
    (small_aim, "mlp_ratio", -1.0, "mlp_ratio must be a positive number"),  # torch's negative-size error before
    (small_mae, "mlp_ratio", 0.01, "giving a hidden width of at least 1 for width 32, got 0.01"),
    (small_aim, "head_embed_dim", 0, "head_embed_dim must be a positive multiple of 4, got 0"),  # ZeroDivisionError
    (small_aim, "head_embed_dim", 30, "head_embed_dim must be a positive multiple of 4, got 30"),
])
def test_block_counts_widths_and_mlp_ratios_are_checked(build, argument, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(**{argument: value})


def test_models_without_blocks_still_train():
    """Depth 0 (no encoder, decoder or head blocks) is a model, if a degenerate one: it builds and differentiates."""
    for model in (small_mae(depth=0, decoder_depth=0), small_aim(depth=0, head_depth=0)):
        loss = model(torch.randn(2, 3, 32, 32))[0]
        loss.backward()
        assert torch.isfinite(loss)


def test_models_take_timm_pair_patch_sizes():
    """A square patch written as timm writes it, ``(p, p)``: the same parameters as ``p`` (the pixel heads' width
    came from ``patch_size**2``, a TypeError for a pair)."""
    for build in (small_mae, small_aim):
        torch.manual_seed(0)
        want = build().state_dict()
        torch.manual_seed(0)
        got = build(patch_size=(8, 8)).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)


# ----------------------------------------------------------------------------- AIM


def aim_inputs(batch, size, prefix, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 3, size, size, generator=gen).to(device)
    return lambda dtype: (imgs.to(dtype), torch.tensor(prefix, device=device))


@pytest.mark.parametrize("prefix", [[1, 15, 7], [3, 3, 8]])
def test_aim_matches_the_ml_aim_forward(prefix):
    torch.manual_seed(2)
    model = small_aim()
    assert_fused_within_budget(model, aim_inputs(3, 32, prefix), official.aim_forward,
                               lambda m, imgs, prefix_len: m(imgs, prefix_len))


def test_aim_head_dim_40():
    torch.manual_seed(3)
    model = small_aim(embed_dim=80, num_heads=2, head_embed_dim=40)
    assert_fused_within_budget(model, aim_inputs(2, 32, [5, 2], seed=3), official.aim_forward,
                               lambda m, imgs, prefix_len: m(imgs, prefix_len))


def test_aim_never_sees_the_patch_it_predicts():
    """With prefix S, changing patch j >= S may change only the predictions of patches after j."""
    torch.manual_seed(4)
    model, prefix, j = small_aim(), 5, 9
    imgs = torch.randn(1, 3, 32, 32)
    changed = imgs.clone()
    row, col = divmod(j, 4)
    changed[:, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 1.0
    with mimkernels.use_backend(FUSED), torch.no_grad():
        before, after = model(imgs, prefix)[1], model(changed, prefix)[1]
    assert torch.equal(before[:, : j + 1], after[:, : j + 1])  # rows <= j are made at positions < j
    assert not torch.allclose(before[:, j + 1:], after[:, j + 1:])


def test_aim_loss_counts_only_non_prefix_patches():
    model = small_aim()
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred = model(imgs, torch.tensor([4, 4]))
    target = mimkernels.patchify(imgs, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    want = ((pred - target) ** 2).mean(-1)[:, 4:].mean()
    assert torch.allclose(loss, want, rtol=1e-5) and torch.equal(pred[:, 0], torch.zeros_like(pred[:, 0]))


def test_aim_loss_never_scores_patch_zero():
    """Patch 0 has no prediction (row 0 of pred is zero): with a prefix of 0 (pure causal attention) the loss is
    the mean over patches 1 to L - 1, not one that also scores patch 0 against the zero row."""
    model = small_aim()
    imgs = torch.randn(2, 3, 32, 32)
    target = mimkernels.patchify(imgs, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    for prefix in (0, torch.tensor([0, 0]), torch.tensor([0, 3])):
        loss, pred = model(imgs, prefix)
        per_patch = ((pred - target) ** 2).mean(-1)
        first = torch.tensor([1, 1]) if isinstance(prefix, int) else prefix.clamp_min(1)
        want = sum(per_patch[b, first[b]:].sum() for b in range(2)) / sum(16 - first[b] for b in range(2))
        assert torch.allclose(loss, want, rtol=1e-5), prefix


def test_aim_prefix_lengths_cover_one_to_l_minus_one():
    model = small_aim()
    drawn = model.sample_prefix_len(4000, generator=torch.Generator().manual_seed(0))
    assert drawn.min().item() == 1 and drawn.max().item() == model.num_patches - 1
    assert set(drawn.tolist()) == set(range(1, model.num_patches))


def test_aim_downstream_features_use_full_attention():
    model = small_aim()
    imgs = torch.randn(2, 3, 32, 32)
    with mimkernels.use_backend(FUSED), torch.no_grad():
        full = model.forward_features(imgs)
        assert torch.allclose(full, model.forward_features(imgs, model.num_patches), atol=1e-6)
        assert not torch.allclose(full, model.forward_features(imgs, 1), atol=1e-3)


def test_aim_rejects_bad_input():
    model = small_aim()
    with pytest.raises(ValueError, match="imgs must be"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="prefix_len"):
        model(torch.randn(1, 3, 32, 32), 2.5)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        model(torch.randn(1, 3, 32, 32), -1)
    for everything in (model.num_patches, model.num_patches + 3):  # nothing left to score: a loss of 0 before
        with pytest.raises(ValueError, match=f"prefix_len must be below the {model.num_patches} patches"):
            model(torch.randn(1, 3, 32, 32), everything)
    with pytest.raises(ValueError, match="at least 2 patches"):
        small_aim(img_size=8)


@pytest.mark.gpu
def test_models_under_bf16_autocast_on_gpu():
    """bf16 autocast (the training CLI's GPU mode): head dims 64 and 128 at ViT-like lengths."""
    torch.manual_seed(6)
    mae = small_mae(img_size=112, patch_size=8, embed_dim=128, num_heads=2, decoder_embed_dim=128,
                    decoder_num_heads=2).cuda()  # 196 patches, head dim 64
    assert_fused_within_budget(mae, mae_inputs(4, 112, device="cuda"), official.mae_forward,
                               lambda m, imgs, ratio, noise: m(imgs, ratio, noise=noise), torch.bfloat16)
    aim = small_aim(img_size=112, patch_size=8, embed_dim=256, num_heads=2).cuda()  # head dim 128
    assert_fused_within_budget(aim, aim_inputs(4, 112, [1, 50, 195, 100], device="cuda"), official.aim_forward,
                               lambda m, imgs, prefix_len: m(imgs, prefix_len), torch.bfloat16)


# ----------------------------------------------------------------------------- configs


def test_configs_have_the_published_shapes():
    widths = {"aim_600m": 1536, "aim_1b": 2048, "aim_3b": 3072, "aim_7b": 4096}
    with torch.device("meta"):  # no memory for billions of parameters
        for name, width in widths.items():
            model = CONFIGS["aim"][name]()
            assert model.blocks[0].attn.head_dim == 128 and model.patch_embed.proj.weight.shape[0] == width
            assert model.patch_embed.patch_size == 14 and model.num_patches == 256
        large, huge = CONFIGS["mae"]["mae_vit_large_patch16"](), CONFIGS["mae"]["mae_vit_huge_patch14"]()
    assert (len(large.blocks), large.blocks[0].attn.head_dim) == (24, 64)
    assert (len(huge.blocks), huge.patch_embed.patch_size, huge.pos_embed.shape[1]) == (32, 14, 257)
    assert {name for name in CONFIGS["mae"]} >= {"mae_vit_tiny_patch8"} and "aim_tiny" in CONFIGS["aim"]


@pytest.mark.parametrize("build", [mae_vit_tiny_patch8, aim_tiny])
def test_tiny_configs_train_under_the_torch_backend(build):
    torch.manual_seed(5)
    model = build(norm_pix_loss=True)
    imgs = torch.randn(4, 3, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    with mimkernels.use_backend("torch"):
        for _ in range(8):
            loss = model(imgs, 16)[0] if isinstance(model, AIM) else model(imgs, noise=torch.rand(4, 64))[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_mae_patchify_methods_round_trip():
    model = small_mae(img_size=48)
    imgs = torch.randn(2, 3, 48, 48)
    patches = model.patchify(imgs)
    assert torch.equal(patches, official.patchify(imgs, 8)) and torch.equal(model.unpatchify(patches), imgs)


@pytest.mark.parametrize("build, layers", [(mae_vit_tiny_patch8, 4 + 2), (aim_tiny, 4)])
def test_attention_layers_hand_their_packed_projection_over_whole(build, layers, monkeypatch):
    """With mimkernels.nn.PACKED_QKV a training step runs no aten::stack and one aten::clone fewer per attention
    layer than with q, k, v views (whose gradients autograd stacks and then copies back into the projection's
    layout), and gives the same loss and gradients bit for bit."""
    from torch.profiler import ProfilerActivity, profile

    from mimkernels import nn as mnn

    def step(packed):
        monkeypatch.setattr(mnn, "PACKED_QKV", packed)
        torch.manual_seed(0)
        model = build()
        with mimkernels.use_backend("triton"), profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.manual_seed(1)
            loss = model(torch.randn(2, 3, 64, 64))[0]
            loss.backward()
        names = [event.name for event in prof.events()]
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        return loss, grads, names.count("aten::stack"), names.count("aten::clone")

    loss, grads, stacks, clones = step(True)
    loss_views, grads_views, stacks_views, clones_views = step(False)
    assert stacks == 0 and stacks_views == layers
    assert clones_views - clones == layers
    assert torch.equal(loss, loss_views)
    for grad, grad_views in zip(grads, grads_views):
        assert torch.equal(grad, grad_views)


def _train_both_ways(build, switch, op, autocast, monkeypatch):
    """The loss, gradients and number of ``mimkernels.<op>`` calls of one training step of ``build(img_size=32)``
    with ``models.vit.<switch>`` off, then on; asserts the two agree to rounding (fp32, or 16-bit autocast)."""
    from mimkernels.models import vit

    def step(fused):
        monkeypatch.setattr(vit, switch, fused)
        torch.manual_seed(0)
        model = build(img_size=32)  # 16 patches: the interpreter's attention is most of this test's time
        calls = []
        original = getattr(mimkernels, op)
        monkeypatch.setattr(mimkernels, op, lambda *a, **k: calls.append(1) or original(*a, **k))
        with mimkernels.use_backend("triton"), torch.autocast("cpu", dtype=autocast or torch.float32,
                                                              enabled=autocast is not None):
            torch.manual_seed(1)
            loss = model(torch.randn(2, 3, 32, 32))[0]
        loss.backward()
        return loss, [p.grad for p in model.parameters() if p.grad is not None], len(calls)

    (loss, grads, calls), (loss_fused, grads_fused, calls_fused) = step(False), step(True)
    assert calls == 0
    assert len(grads_fused) == len(grads)
    rtol, atol = (1e-4, 1e-5) if autocast is None else (2e-2, 2e-3)
    torch.testing.assert_close(loss_fused, loss, rtol=rtol / 10, atol=atol / 10)
    for g, w in zip(grads_fused, grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    return calls_fused


@pytest.mark.parametrize("autocast", [None, torch.float16], ids=["fp32", "autocast_fp16"])
@pytest.mark.parametrize("build", [mae_vit_tiny_patch8, aim_tiny])
def test_mlps_with_gelu_inside_the_gemms_train_the_same(build, autocast, monkeypatch):
    """models.vit.FUSED_GELU_MLP gives the loss and gradients of the unfused MLPs, to rounding: every Mlp (the
    blocks' and AIM's head blocks', with and without biases) is one gelu_mlp call."""
    from mimkernels.models import vit

    calls = _train_both_ways(build, "FUSED_GELU_MLP", "gelu_mlp", autocast, monkeypatch)
    assert calls == sum(isinstance(m, vit.Mlp) for m in build().modules()) > 2


@pytest.mark.parametrize("autocast", [None, torch.float16], ids=["fp32", "autocast_fp16"])
@pytest.mark.parametrize("build", [mae_vit_tiny_patch8, aim_tiny, simmim_vit_tiny_patch8])
def test_blocks_with_the_fused_add_norm_train_the_same(build, autocast, monkeypatch):
    """models.vit.FUSED_ADD_NORM gives the loss and gradients of the unfused blocks, to rounding (the norm's
    statistics are summed in another order): every residual add shares a pass with the LayerNorm after it, across
    blocks too (run_blocks), so a stack of k Blocks makes 2k fused calls (each block's norm2, the next norm1 or the
    final norm) and a stack of k AIM head blocks k. Under autocast the 16-bit branch gradients come from the kernel."""
    from mimkernels.models import aim, vit

    calls = _train_both_ways(build, "FUSED_ADD_NORM", "add_layer_norm", autocast, monkeypatch)
    assert calls == sum(2 if isinstance(m, vit.Block) else isinstance(m, aim.MlpBlock) for m in build().modules())


@pytest.mark.parametrize("build", [aim_tiny, simmim_vit_tiny_patch8])
def test_models_compile_for_a_second_batch_size(build):
    """The second batch size makes Dynamo trace the batch dimension as a symbol: drawing the prefixes (AIM) and
    block masks (SimMIM) inside the forward must still trace, in one graph."""
    torch._dynamo.reset()
    model = build()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for batch in (2, 3):
        assert torch.isfinite(compiled(torch.randn(batch, 3, 64, 64))[0])
