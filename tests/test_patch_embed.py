"""Fused patch embedding against conv2d (+ mask token, + pos_embed, + gather) in float64, every gradient."""
import pytest
import torch
from conftest import DEVICE, HAS_GPU

import mimkernels
from mimkernels import reference

# the interpreter's bf16 tl.dot is broken: bf16 runs through Triton on a GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative to the largest value


def make(batch, channels, height, width, patch, embed, dtype, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    patches = (height // patch) * (width // patch)
    leaves = {
        "images": torch.randn(batch, channels, height, width, generator=gen),
        "weight": torch.randn(embed, channels, patch, patch, generator=gen) / (channels * patch * patch) ** 0.5,
        "bias": torch.randn(embed, generator=gen),
        "pos_embed": torch.randn(1, patches, embed, generator=gen),
    }
    leaves = {k: v.to(DEVICE, dtype if k in ("images", "weight") else torch.float32).requires_grad_()
              for k, v in leaves.items()}
    extra = {}
    if mode == "mae":
        kept = max(1, patches // 4)
        ids = [torch.randperm(patches, generator=gen)[:kept] for _ in range(batch)]
        extra["ids_keep"] = torch.stack(ids).to(DEVICE)
    if mode == "simmim":
        leaves["mask_token"] = torch.randn(1, 1, embed, generator=gen).to(DEVICE).requires_grad_()
        extra["mask"] = (torch.rand(batch, patches, generator=gen) < 0.6).to(DEVICE)
    if mode == "blend":  # mask values between 0 and 1 mix patch and token (SimMIM's / BEiT's formula)
        leaves["mask_token"] = torch.randn(1, 1, embed, generator=gen).to(DEVICE).requires_grad_()
        values = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.8])
        extra["mask"] = values[torch.randint(len(values), (batch, patches), generator=gen)].to(DEVICE)
    return leaves, extra


def call(fn, leaves, extra):
    kwargs = {k: v for k, v in leaves.items() if k not in ("images", "weight", "bias")}
    return fn(leaves["images"], leaves["weight"], leaves["bias"], **kwargs, **extra)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["full", "mae", "simmim", "blend"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 48, 16, 40), (1, 3, 28, 42, 14, 64), (2, 1, 16, 32, 16, 24),
                                   (1, 3, 32, 32, 16, 768)], ids=lambda s: "x".join(map(str, s)))
def test_patch_embed(backend, dtype, mode, shape):
    leaves, extra = make(*shape, dtype, mode)
    with mimkernels.use_backend(backend):
        out = call(mimkernels.patch_embed, leaves, extra)
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    want = call(reference.patch_embed, leaves64, extra)
    grads64 = torch.autograd.grad(want, list(leaves64.values()), grad_out.double())
    for name, got, ref in [("out", out, want), *zip(leaves, grads, grads64)]:
        assert got.shape == ref.shape, name
        err = (got.double() - ref).abs().max().item()
        assert err <= TOLERANCE[dtype] * max(1.0, ref.abs().max().item()), f"{name}: {err:.3e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_values_blend_as_simmim_and_beit_do(backend):
    """The official SimMIM / BEiT step, ``x * (1 - w) + mask_token * w`` with w = ``mask.type_as(mask_token)``:
    the same result for a bool, an integer and a float mask, and mask values between 0 and 1 mix the two."""
    leaves, extra = make(2, 3, 32, 48, 16, 40, torch.float32, "blend")
    images, weight, bias, pos, token = (leaves[k].detach() for k in ("images", "weight", "bias", "pos_embed",
                                                                     "mask_token"))
    conv = torch.nn.functional.conv2d(images.double(), weight.double(), bias.double(), stride=16)
    w = extra["mask"].double().unsqueeze(-1)
    official = conv.flatten(2).transpose(1, 2) * (1 - w) + token.double() * w + pos.double()
    with mimkernels.use_backend(backend):
        got = mimkernels.patch_embed(images, weight, bias, pos_embed=pos, mask=extra["mask"], mask_token=token)
        torch.testing.assert_close(got.double(), official, rtol=1e-5, atol=1e-5)
        binary = extra["mask"] > 0.5
        results = [mimkernels.patch_embed(images, weight, bias, mask=m, mask_token=token)
                   for m in (binary, binary.long(), binary.half(), binary.float())]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_upstream_gradient_reaches_only_what_its_row_feeds(backend, bad):
    """SimMIM / BEiT masking, an fp16 overflow on one row of the upstream gradient: on a kept row it reaches the
    convolution's gradients but not the mask token's; on a masked row the token's but not the convolution's (the
    reference's where() routes each row to one of them). A product with the mask would spread 0 * inf = NaN."""
    leaves, extra = make(2, 3, 32, 48, 16, 40, torch.float32, "simmim")
    masked = extra["mask"][0]
    for row, reaches, spared in ((int((~masked).nonzero()[0]), "weight", "mask_token"),
                                 (int(masked.nonzero()[0]), "mask_token", "weight")):
        with mimkernels.use_backend(backend):
            out = call(mimkernels.patch_embed, leaves, extra)
        grad_out = torch.ones_like(out)
        grad_out[0, row, 3] = bad
        grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out)))
        assert not torch.isfinite(grads[reaches]).all()
        assert torch.isfinite(grads[spared]).all()
        assert not torch.isfinite(grads["pos_embed"][0, row, 3])  # every row reaches pos_embed


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_patches_left_out_of_ids_keep_are_not_read(bad):
    """MAE's dropped patches: a non-finite pixel there changes no output and no gradient of the kernel path (the
    docstring says so; the convolving ``torch`` backend would carry it into weight's gradient)."""
    leaves, extra = make(2, 3, 32, 48, 16, 40, torch.float32, "mae")
    dropped = sorted(set(range(6)) - set(extra["ids_keep"][1].tolist()))[0]
    row, col = divmod(dropped, 3)
    results = []
    for poison in (bad, 0.0):
        images = leaves["images"].detach().clone()
        images[1, 2, 16 * row + 5, 16 * col: 16 * col + 16] = poison
        inputs = {**leaves, "images": images.requires_grad_()}
        with mimkernels.use_backend("triton"):
            out = call(mimkernels.patch_embed, inputs, extra)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(inputs.values()))))
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_autocast_runs_in_autocast_dtype():
    leaves, extra = make(1, 3, 32, 32, 16, 40, torch.float32, "full")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = call(mimkernels.patch_embed, leaves, extra)
    assert out.dtype == torch.bfloat16
    assert torch.autograd.grad(out.float().sum(), leaves["weight"])[0].dtype == torch.float32


@pytest.mark.parametrize("change, error, match", [
    ({"weight": torch.randn(8, 3, 16)}, ValueError, "weight must be"),
    ({"weight": torch.randn(8, 3, 16, 8)}, ValueError, "weight must be"),
    # the kernels have tiles for these three: every backend takes the same (float64 was a KeyError on Triton)
    ({"weight": torch.randn(8, 3, 16, 16, dtype=torch.float64)}, TypeError, "weight must be float16, bfloat16 or"),
    ({"weight": torch.ones(8, 3, 16, 16, dtype=torch.int32)}, TypeError, "weight must be float16, bfloat16 or"),
    ({"images": torch.randn(1, 3, 30, 32)}, ValueError, "not divisible by the patch size 16"),
    ({"images": torch.randn(1, 1, 32, 32)}, ValueError, "1 channels, weight expects 3"),
    ({"bias": torch.randn(9)}, ValueError, "bias must have shape"),
    ({"pos_embed": torch.randn(1, 5, 8)}, ValueError, r"pos_embed must have shape \(1, 4, 8\)"),
    ({"ids_keep": torch.tensor([[0, 1]]), "mask": torch.ones(1, 4), "mask_token": torch.zeros(8)}, ValueError,
     "not both"),
    ({"mask": torch.ones(1, 4)}, ValueError, "go together"),
    ({"mask": torch.ones(1, 3), "mask_token": torch.zeros(8)}, ValueError, r"mask must have shape \(1, 4\)"),
    ({"mask": torch.ones(1, 4), "mask_token": torch.zeros(7)}, ValueError, "mask_token must hold 8"),
    ({"mask": torch.ones(1, 4), "mask_token": [0.0] * 8}, TypeError, "mask_token must be a torch.Tensor"),
    ({"mask": torch.ones(1, 4, dtype=torch.complex64), "mask_token": torch.zeros(8)}, TypeError,
     "mask must be bool, integer or real"),
    ({"ids_keep": torch.tensor([[0, 1, 2]]).float()}, TypeError, "int32 or int64"),
    ({"ids_keep": torch.tensor([[0, 1], [2, 3]])}, ValueError, r"ids_keep must have shape \[1, K\]"),
    ({"ids_keep": torch.tensor([[0, 4]])}, IndexError, r"\[0, 4\)"),
    # a complex bias / pos_embed / token was a KeyError on Triton and lost its imaginary part on torch; float8 ran on
    # Triton only; an integer bias is refused as the token ops refuse an integer pos_embed
    ({"bias": torch.ones(8, dtype=torch.complex64)}, TypeError, "bias must be a floating-point tensor"),
    ({"bias": torch.ones(8, dtype=torch.int32)}, TypeError, "bias must be a floating-point tensor"),
    ({"pos_embed": torch.ones(1, 4, 8).to(torch.float8_e4m3fn)}, TypeError, "pos_embed must be a floating-point"),
    ({"mask": torch.ones(1, 4), "mask_token": torch.zeros(8, dtype=torch.complex64)}, TypeError,
     "mask_token must be a floating-point tensor"),
    ({"images": torch.ones(1, 3, 32, 32).to(torch.float8_e4m3fn)}, TypeError, "images must be a floating-point"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(change, error, match):
    args = {"images": torch.randn(1, 3, 32, 32), "weight": torch.randn(8, 3, 16, 16), "bias": None} | change
    images, weight, bias = args.pop("images"), args.pop("weight"), args.pop("bias")
    for backend in ("torch", "triton"):
        with mimkernels.use_backend(backend), pytest.raises(error, match=match):
            mimkernels.patch_embed(images, weight, bias, **args)
