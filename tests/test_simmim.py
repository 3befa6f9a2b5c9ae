"""SimMIM: the block-wise mask generator, the model against an unfused reading of the paper, fused vs torch."""
import math

import pytest
import torch
import torch.nn.functional as F

import mimkernels
from mimkernels import reference
from mimkernels.models import SimMIM, block_mask, simmim_vit_base_patch16, simmim_vit_tiny_patch8


def test_block_mask_masks_whole_blocks_at_the_ratio():
    gen = torch.Generator().manual_seed(0)
    mask = block_mask(64, 14, 2, 0.6, generator=gen)  # ViT-B/16 at 224 px with 32 px mask patches
    assert mask.shape == (64, 196) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    squares = (14 // 2) ** 2
    assert (mask.sum(1) == math.ceil(0.6 * squares) * 4).all()  # 30 of 49 squares, 4 patches each
    blocks = mask.view(64, 7, 2, 7, 2)
    assert (blocks.amax((2, 4)) == blocks.amin((2, 4))).all()  # each 2x2 block all masked or all kept
    frequency = mask.mean(0)  # every position masked about 60% of the time
    assert frequency.min() > 0.3 and frequency.max() < 0.9
    assert not torch.equal(mask[0], mask[1])
    again = block_mask(64, 14, 2, 0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


@pytest.mark.parametrize("block, ratio, match", [(3, 0.6, "block must be a positive int dividing"),
                                                 (0, 0.6, "block must"), (2, 0.0, "mask ratio"),
                                                 (2, 1.0, "mask ratio"), (2, True, "mask ratio")])
def test_block_mask_bad_arguments(block, ratio, match):
    with pytest.raises(ValueError, match=match):
        block_mask(2, 8, block, ratio)


def _unfused_simmim_loss(model, imgs, mask):
    """The paper's forward, unfused: Conv2d patches, mask token blended in, positions, cls,
    the model's own blocks, the linear head, and the official L1 (masked pixel sum / (count + 1e-5) / C)."""
    p = model.patch_embed.patch_size
    x = F.conv2d(imgs, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    w = mask.unsqueeze(-1)
    x = x * (1 - w) + model.mask_token * w
    x = x + model.pos_embed[:, 1:]
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    with mimkernels.use_backend("torch"):
        for block in model.blocks:
            x = block(x)
    pred = model.decoder_pred(model.norm(x))[:, 1:]
    target = reference.patchify(imgs, p)
    pixel_mask = mask.unsqueeze(-1).expand_as(target)
    loss = ((pred - target).abs() * pixel_mask).sum() / (pixel_mask.sum() / 3 + 1e-5) / 3
    return loss, pred


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("soft", [False, True], ids=["drawn_mask", "soft_mask"])
def test_simmim_is_the_paper_forward(backend, soft):
    """Also with mask values between 0 and 1: the official code blends patch and token by the value and weights
    the loss by it, and so does the model."""
    torch.manual_seed(0)
    model = simmim_vit_tiny_patch8()
    imgs = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(2)
    if soft:
        mask = mask * torch.rand(mask.shape)
    with mimkernels.use_backend(backend):
        loss, pred, got_mask = model(imgs, mask=mask)
    want_loss, want_pred = _unfused_simmim_loss(model, imgs, mask)
    assert torch.equal(got_mask, mask.float())
    torch.testing.assert_close(pred, want_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)  # the official 1e-5 is far below this


def test_fused_matches_torch_backend_forward_and_every_gradient(device):
    torch.manual_seed(0)
    model = simmim_vit_tiny_patch8().to(device)
    imgs = torch.randn(2, 3, 64, 64, device=device)
    mask = model.random_mask(2, device=device)
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with mimkernels.use_backend(backend):
            loss, pred, _ = model(imgs, mask=mask)
        loss.backward()
        results.append((loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}))
    (want_loss, want_pred, want_grads), (loss, pred, grads) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, want_pred, rtol=1e-4, atol=1e-5)
    assert grads.keys() == want_grads.keys() and "mask_token" in grads and "patch_embed.proj.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_simmim_draws_its_mask_and_checks_its_input():
    torch.manual_seed(0)
    model = simmim_vit_tiny_patch8()
    imgs = torch.randn(3, 3, 64, 64)
    with mimkernels.use_backend("torch"):
        loss, pred, mask = model(imgs)
        assert pred.shape == (3, 64, 8 * 8 * 3) and mask.shape == (3, 64) and torch.isfinite(loss)
        assert (mask.sum(1) == math.ceil(0.6 * 16) * 4).all()
        assert (model(imgs, mask_ratio=0.3)[2].sum(1) == math.ceil(0.3 * 16) * 4).all()
        with pytest.raises(ValueError, match=r"mask must be a \[3, 64\] tensor"):
            model(imgs, mask=torch.zeros(3, 63))
        with pytest.raises(TypeError, match="mask must be bool, integer or real"):
            model(imgs, mask=torch.zeros(3, 64, dtype=torch.complex64))
        with pytest.raises(ValueError, match="imgs must be"):
            model(torch.randn(3, 3, 32, 32))
    for size in (20, 0):  # 0 was a ZeroDivisionError
        with pytest.raises(ValueError, match=f"mask_patch_size must be a positive multiple of patch_size 8, got "
                                             f"{size}"):
            simmim_vit_tiny_patch8(mask_patch_size=size)
    with pytest.raises(ValueError, match="not square in mask patches"):
        simmim_vit_tiny_patch8(mask_patch_size=24)
    for ratio in (0.0, 1.5, float("nan")):  # at construction (the first forward's error before)
        with pytest.raises(ValueError, match=r"mask ratio must lie in \(0, 1\)"):
            simmim_vit_tiny_patch8(mask_ratio=ratio)
    assert isinstance(model, SimMIM)


def test_simmim_base_shapes():
    with torch.device("meta"):
        model = simmim_vit_base_patch16()
    assert model.patch_embed.num_patches == 196 and model.mask_block == 2 and model.mask_ratio == 0.6
    assert model.decoder_pred.out_features == 16 * 16 * 3
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 85e6
