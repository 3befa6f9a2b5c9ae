"""patchify / unpatchify and the fused masked pixel loss against the official MAE code in float64."""
import pytest
import torch
from conftest import DEVICE

import mimkernels
from benchmarks.official import forward_loss as official_forward_loss
from benchmarks.official import patchify as official_patchify
from mimkernels import reference

BACKENDS = ["torch", "triton"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative


def inputs(batch, channels, height, width, patch, dtype, mask_kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, channels, height, width, generator=gen).to(DEVICE)
    patches = (height // patch) * (width // patch)
    pred = torch.randn(batch, patches, patch * patch * channels, generator=gen).to(DEVICE, dtype).requires_grad_()
    mask = {
        "mae": (torch.rand(batch, patches, generator=gen) < 0.75).float(),
        "zeros": torch.zeros(batch, patches),
        "ones": torch.ones(batch, patches),
        "weights": torch.rand(batch, patches, generator=gen),
    }[mask_kind].to(DEVICE)
    return images, pred, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_equals_official_mae_forward_loss(backend, norm_pix):
    images, pred, mask = inputs(2, 3, 64, 64, 16, torch.float32, "mae")
    with mimkernels.use_backend(backend):
        got = mimkernels.masked_patch_loss(pred, images, mask, norm_pix=norm_pix)
    want = official_forward_loss(images.double(), pred.detach().double(), mask.double(), 16, norm_pix)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 28, 42, 14), (2, 1, 32, 16, 16), (1, 3, 16, 16, 16), (3, 2, 12, 8, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm_pix, loss", [(True, "l2"), (False, "l2"), (False, "l1"), (True, "l1")])
@pytest.mark.parametrize("mask_kind", ["mae", "ones", "weights"])
def test_loss_and_gradient(backend, dtype, shape, norm_pix, loss, mask_kind):
    *image_shape, patch = shape
    images, pred, mask = inputs(*image_shape, patch, dtype, mask_kind)
    images.requires_grad_()
    with mimkernels.use_backend(backend):
        got = mimkernels.masked_patch_loss(pred, images, mask, norm_pix=norm_pix, loss=loss)
    grad, grad_images = torch.autograd.grad(got, (pred, images))
    pred64, images64 = (t.detach().double().requires_grad_() for t in (pred, images))
    want = reference.masked_patch_loss(pred64, images64, mask.double(), norm_pix=norm_pix, loss=loss)
    grad64, grad_images64 = torch.autograd.grad(want, (pred64, images64))
    assert got.dtype == torch.float32 and grad.dtype == dtype and grad_images.dtype == images.dtype
    assert abs(got.item() - want.item()) <= TOLERANCE[dtype] * max(1.0, abs(want.item()))
    for ours, theirs in ((grad, grad64), (grad_images, grad_images64)):
        assert (ours.double() - theirs).abs().max().item() <= TOLERANCE[dtype] * theirs.abs().max().item() + 1e-12


@pytest.mark.parametrize("group", [2, 8])
@pytest.mark.parametrize("shape", [(2, 3, 28, 42, 14), (3, 2, 12, 8, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm_pix, loss", [(True, "l2"), (False, "l1")])
def test_patch_groups_per_program(group, shape, norm_pix, loss, monkeypatch):
    """Several patches per program (selectable, losses.PATCHES_PER_PROGRAM): the same loss and gradient as one per
    program, within the float64 budget; 12 and 18 patches leave the last group part empty."""
    from mimkernels.triton import losses

    *image_shape, patch = shape
    images, pred, mask = inputs(*image_shape, patch, torch.float16, "mae", seed=group)
    runs = []
    for per_program in (1, group):
        monkeypatch.setattr(losses, "PATCHES_PER_PROGRAM", per_program)
        with mimkernels.use_backend("triton"):
            got = mimkernels.masked_patch_loss(pred, images, mask, norm_pix=norm_pix, loss=loss)
        runs.append((got, *torch.autograd.grad(got, pred)))
    pred64 = pred.detach().double().requires_grad_()
    want = reference.masked_patch_loss(pred64, images.double(), mask.double(), norm_pix=norm_pix, loss=loss)
    (grad64,) = torch.autograd.grad(want, pred64)
    (one_loss, one_grad), (got, grad) = runs
    assert abs(got.item() - want.item()) <= TOLERANCE[torch.float16] * max(1.0, abs(want.item()))
    assert (grad.double() - grad64).abs().max().item() <= TOLERANCE[torch.float16] * grad64.abs().max().item()
    torch.testing.assert_close(got, one_loss, rtol=1e-5, atol=0)  # the same sums, up to their order on a GPU
    torch.testing.assert_close(grad, one_grad, rtol=1e-3, atol=1e-6)


def test_patch_groups_must_be_powers_of_two():
    from mimkernels.triton import losses

    with pytest.raises(ValueError, match="power of 2, got 3"):
        losses.launch_config(16, 3, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_mask_gives_zero(backend):
    images, pred, mask = inputs(2, 3, 32, 32, 16, torch.float32, "zeros")
    with mimkernels.use_backend(backend):
        got = mimkernels.masked_patch_loss(pred, images, mask)
    (grad,) = torch.autograd.grad(got, pred)
    assert got.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", ["negative", "mixed"])
def test_weights_of_any_sign_divide_by_their_sum(backend, sign):
    """The official code divides by mask.sum() whatever its sign: so do we (a negative sum once fell to the
    all-zero mask's denominator of 1, a silently different loss)."""
    images, pred, mask = inputs(2, 3, 32, 32, 16, torch.float32, "weights")
    mask = -mask if sign == "negative" else mask - 0.4  # mixed: some weights below 0, the sum still positive
    assert mask.sum().item() != 0 and (mask < 0).any()
    with mimkernels.use_backend(backend):
        got = mimkernels.masked_patch_loss(pred, images, mask)
    (grad,) = torch.autograd.grad(got, pred)
    pred64 = pred.detach().double().requires_grad_()
    want = official_forward_loss(images.double(), pred64, mask.double(), 16)
    (grad64,) = torch.autograd.grad(want, pred64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_unscored_patches_are_not_read(backend, bad):
    """A patch of weight 0 adds nothing, whatever its values: the loss and the gradient equal those with the
    patch's prediction and pixels zeroed (finite, where the official code's 0 * nan would be NaN), on both
    backends; a non-finite value in a scored patch still gives a non-finite loss."""
    images, pred, mask = inputs(2, 3, 32, 48, 16, torch.float32, "mae")
    unscored = (mask == 0).nonzero()[0].tolist()  # (sample, patch); rows of 16 x 16 x 3 values
    row, col = divmod(unscored[1], 3)
    results = []
    for poison in (bad, 0.0):
        p, im = pred.detach().clone(), images.clone()
        p[unscored[0], unscored[1], ::7] = poison
        im[unscored[0], :, 16 * row + 3, 16 * col: 16 * col + 16] = poison
        p.requires_grad_()
        with mimkernels.use_backend(backend):
            loss = mimkernels.masked_patch_loss(p, im, mask)
        loss.backward()
        results.append((loss.detach(), p.grad))
    assert torch.isfinite(results[0][0]) and torch.isfinite(results[0][1]).all()
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    scored = (mask != 0).nonzero()[0].tolist()
    p = pred.detach().clone()
    p[scored[0], scored[1], 5] = bad
    with mimkernels.use_backend(backend):
        assert not torch.isfinite(mimkernels.masked_patch_loss(p, images, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_upstream_gradient_leaves_unscored_patches_at_zero(backend, bad):
    """An fp16 step whose scaled loss overflowed hands the loss a NaN / inf gradient (GradScaler then skips the
    step): every scored patch's gradient is non-finite and every unscored one stays exactly 0, as in the
    reference, whose gradient never reaches them (a product with the weight would make them 0 * nan)."""
    images, pred, mask = inputs(2, 3, 32, 48, 16, torch.float32, "mae")
    pred.requires_grad_()
    with mimkernels.use_backend(backend):
        loss = mimkernels.masked_patch_loss(pred, images, mask)
    grad, = torch.autograd.grad(loss, pred, torch.tensor(bad, device=DEVICE))
    scored = (mask != 0)[..., None].expand_as(grad)
    assert 0 < scored.sum() < scored.numel()
    assert not torch.isfinite(grad[scored]).any()
    assert (grad[~scored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_mask_and_strided_pred(backend):
    images, pred, mask = inputs(2, 3, 32, 32, 16, torch.float32, "mae")
    wide = torch.randn(2, 4, 2 * 768, device=DEVICE)
    strided = wide[:, :, ::2]  # non-unit stride in the last dim
    with mimkernels.use_backend(backend):
        got = mimkernels.masked_patch_loss(strided, images, mask.bool())
    torch.testing.assert_close(got, reference.masked_patch_loss(strided, images, mask).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix, loss", [(True, "l2"), (False, "l1")])
def test_images_gradient_as_the_reference(backend, norm_pix, loss):
    """The target is differentiable in the images, as in the official MAE code (no detach there): half precision
    non-contiguous images, fractional weights, and a NaN in an unscored patch's pixels (its gradient stays 0)."""
    images, pred, mask = inputs(2, 3, 32, 48, 16, torch.float32, "weights")
    mask[1, 5] = 0
    images = images.half().transpose(2, 3).contiguous().transpose(2, 3)  # channels-last-like strides
    images[1, :, 16, 32] = float("nan")  # sample 1, patch 5: row 1, column 2 of the 2 x 3 patches
    images.requires_grad_()
    with mimkernels.use_backend(backend):
        got = mimkernels.masked_patch_loss(pred, images, mask, norm_pix=norm_pix, loss=loss)
    (grad_images,) = torch.autograd.grad(got, images)
    clean = images.detach().double().nan_to_num(0.0).requires_grad_()
    want = reference.masked_patch_loss(pred.detach().double(), clean, mask.double(), norm_pix=norm_pix, loss=loss)
    (want_images,) = torch.autograd.grad(want, clean)
    assert grad_images.dtype == torch.float16 and grad_images.shape == images.shape
    assert torch.isfinite(grad_images).all() and (grad_images[1, :, 16:32, 32:48] == 0).all()
    assert want_images.abs().max() > 0
    torch.testing.assert_close(grad_images.double(), want_images, rtol=2e-3, atol=2e-3 * want_images.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_that_requires_grad_is_refused(backend):
    images, pred, mask = inputs(1, 3, 16, 16, 16, torch.float32, "weights")
    mask.requires_grad_()
    with mimkernels.use_backend(backend):
        with pytest.raises(ValueError, match="mask must not require grad"):
            mimkernels.masked_patch_loss(pred, images, mask)
        with torch.no_grad():
            mimkernels.masked_patch_loss(pred, images, mask)  # nothing to differentiate


@pytest.mark.parametrize("kwargs, error, match", [
    ({"pred": torch.randn(2, 4, 700)}, ValueError, "p \\* p \\* C"),
    ({"images": torch.randn(2, 3, 32, 40)}, ValueError, "not divisible by the patch size 16"),
    ({"images": torch.randn(2, 3, 32, 64)}, ValueError, "8 patches of size 16, pred has 4"),
    ({"images": torch.randn(3, 3, 32, 32)}, ValueError, "do not match pred"),
    ({"images": torch.randn(2, 3, 32)}, ValueError, "4-D"),
    ({"mask": torch.ones(2, 5)}, ValueError, "mask must be a tensor of shape \\(2, 4\\)"),
    ({"mask": torch.ones(2, 4, dtype=torch.complex64)}, TypeError, "mask must be bool, integer or real"),
    ({"loss": "huber"}, ValueError, "'l2' or 'l1'"),
    ({"norm_pix": 1}, TypeError, "norm_pix must be a bool"),
    ({"pred": torch.randn(2, 4)}, ValueError, "3-D"),
    ({"images": torch.randn(2, 0, 32, 32)}, ValueError, "C = 0 channels"),  # was a ZeroDivisionError
    # float8 ran on Triton and failed inside PyTorch's reduction on torch; complex is no pixel value
    ({"pred": torch.randn(2, 4, 768).to(torch.float8_e4m3fn)}, TypeError, "pred must be a floating-point tensor"),
    ({"images": torch.randn(2, 3, 32, 32).to(torch.float8_e4m3fn)}, TypeError, "images must be a floating-point"),
    ({"images": torch.randn(2, 3, 32, 32, dtype=torch.complex64)}, TypeError, "images must be a floating-point"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(kwargs, error, match):
    args = {"pred": torch.randn(2, 4, 768), "images": torch.randn(2, 3, 32, 32), "mask": torch.ones(2, 4),
            "norm_pix": True, "loss": "l2"} | kwargs
    for backend in BACKENDS:
        with mimkernels.use_backend(backend), pytest.raises(error, match=match):
            mimkernels.masked_patch_loss(args["pred"], args["images"], args["mask"], norm_pix=args["norm_pix"],
                                         loss=args["loss"])


# --------------------------------------------------------------------------- patchify


def test_patchify_is_official_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 48, 80)
    x = mimkernels.patchify(images, 16)
    assert x.shape == (2, 15, 768)
    square = images[..., :48]
    assert torch.equal(mimkernels.patchify(square, 16), official_patchify(square, 16))
    assert torch.equal(mimkernels.unpatchify(x, 16, 3, 5), images)


@pytest.mark.parametrize("call, error, match", [
    (lambda: mimkernels.patchify(torch.randn(1, 3, 30, 32), 16), ValueError, "not divisible"),
    (lambda: mimkernels.patchify(torch.randn(1, 3, 32, 32), 0), ValueError, "patch_size"),
    (lambda: mimkernels.patchify(torch.randn(3, 32, 32), 16), ValueError, "4-D"),
    (lambda: mimkernels.patchify(torch.zeros(1, 3, 32, 32, dtype=torch.long), 16), TypeError, "floating-point"),
    (lambda: mimkernels.unpatchify(torch.randn(1, 6, 768), 16, 2, 2), ValueError, "height \\* width"),
    (lambda: mimkernels.unpatchify(torch.randn(1, 6, 768), 16, 32, 48), ValueError, "count patches: .* pass 2, 3"),
    (lambda: mimkernels.unpatchify(torch.randn(1, 4, 700), 16, 2, 2), ValueError, "multiple of patch_size"),
    (lambda: mimkernels.unpatchify(torch.randn(1, 4, 768), 16, 0, 4), ValueError, "height"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_patchify_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
