"""Patch embedding and masked loss on a GPU: bf16, ViT sizes, every mode."""
import pytest
import torch

import mimkernels
from mimkernels import reference

pytestmark = pytest.mark.gpu


def _relative(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("patch, embed, size", [(16, 768, (224, 224)), (14, 1536, (224, 224)), (16, 1024, (224, 160))])
@pytest.mark.parametrize("mode", ["full", "mae", "simmim", "blend"])
def test_patch_embed_on_gpu(dtype, patch, embed, size, mode):
    batch = 8
    images = torch.randn(batch, 3, *size, device="cuda")
    weight = (torch.randn(embed, 3, patch, patch, device="cuda") / (3 * patch * patch) ** 0.5).to(dtype)
    weight.requires_grad_()
    bias = torch.randn(embed, device="cuda", requires_grad=True)
    patches = (size[0] // patch) * (size[1] // patch)
    pos = torch.randn(1, patches, embed, device="cuda", requires_grad=True)
    kwargs = {"pos_embed": pos}
    leaves = [weight, bias, pos]
    if mode == "mae":
        kwargs["ids_keep"] = torch.argsort(torch.rand(batch, patches, device="cuda"), 1)[:, :patches // 4]
    if mode in ("simmim", "blend"):  # blend: mask values between 0 and 1 mix patch and token
        kwargs["mask"] = torch.rand(batch, patches, device="cuda") < 0.6
        if mode == "blend":
            kwargs["mask"] = kwargs["mask"] * torch.rand(batch, patches, device="cuda")
        kwargs["mask_token"] = torch.randn(1, 1, embed, device="cuda", requires_grad=True)
        leaves.append(kwargs["mask_token"])
    out = mimkernels.patch_embed(images, weight, bias, **kwargs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    kwargs64 = dict(kwargs, pos_embed=leaves64[2])
    if mode in ("simmim", "blend"):
        kwargs64["mask_token"] = leaves64[3]
    want = reference.patch_embed(images.double(), leaves64[0], leaves64[1], **kwargs64)
    grads64 = torch.autograd.grad(want, leaves64, grad_out.double())
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    assert _relative(out, want) <= tolerance
    for g, w in zip(grads, grads64):
        assert _relative(g, w) <= tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("norm_pix, loss", [(True, "l2"), (False, "l1")])
@pytest.mark.parametrize("patch", [16, 14])
@pytest.mark.parametrize("per_program", [1, 8])  # patches per program of the loss kernels (selectable)
def test_masked_loss_on_gpu(dtype, norm_pix, loss, patch, per_program, monkeypatch):
    from mimkernels.triton import losses

    monkeypatch.setattr(losses, "PATCHES_PER_PROGRAM", per_program)
    patches = (224 // patch) ** 2
    images = torch.randn(16, 3, 224, 224, device="cuda")
    pred = torch.randn(16, patches, 3 * patch * patch, device="cuda", dtype=dtype, requires_grad=True)
    mask = (torch.rand(16, patches, device="cuda") < 0.75).float()
    got = mimkernels.masked_patch_loss(pred, images, mask, norm_pix=norm_pix, loss=loss)
    (grad,) = torch.autograd.grad(got, pred)
    pred64 = pred.detach().double().requires_grad_()
    want = reference.masked_patch_loss(pred64, images.double(), mask.double(), norm_pix=norm_pix, loss=loss)
    (grad64,) = torch.autograd.grad(want, pred64)
    assert abs(got.item() - want.item()) <= 1e-4 * abs(want.item())
    assert _relative(grad, grad64) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)
