"""The MIM ops (token gather / restore, patch embedding, the masked loss) on shapes, strides, prefixes and options
drawn by hypothesis, on every backend, against the reference in float64: output and every gradient.

The parametrized tests elsewhere pin the shapes that matter (MAE's 49 / 196 patches, D = 40 / 1100, ...); these
draw the corners nobody lists: one patch, one channel, odd widths, a view with strided rows, no kept patch at all,
every option on or off together.
"""
import contextlib

import torch
from conftest import DEVICE
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mimkernels
from mimkernels import reference

BACKENDS = [name for name in ("torch", "triton", "extension") if name in mimkernels.available_backends()]
# fp16 rounds the output once (the inputs are fp16 values, the reference sees the same values in float64)
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3}
SETTINGS = settings(max_examples=15, deadline=None)


def make(shape, dtype, gen, *, strided=False):
    """A leaf of ``shape``; ``strided``: a view whose rows are not packed (every other row of a bigger tensor)."""
    if strided:
        base = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=gen).to(DEVICE, dtype)
        return base[:, ::2].requires_grad_()
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()


@contextlib.contextmanager
def fp32_without_tf32():
    """The PyTorch backend on a GPU runs conv2d / matmul through cuDNN / cuBLAS, which may round fp32 to TF32
    (torch's cuDNN default): a user's setting, not the op's error, so these checks switch it off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_against_float64(op, reference_op, leaves, dtype, seed, out_dtype=None):
    """Output (of ``out_dtype``, default ``dtype``) and the gradient of every leaf of ``op(*leaves)`` against
    ``reference_op`` on float64 twins."""
    with fp32_without_tf32():
        got = op(*leaves)
    twins = [t.detach().double().requires_grad_() for t in leaves]
    want = reference_op(*twins)
    assert got.shape == want.shape and got.dtype == (out_dtype or dtype), (got.shape, got.dtype)
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with fp32_without_tf32():
        got_grads = torch.autograd.grad(got, leaves, grad_out.to(got.dtype), allow_unused=True)
    want_grads = torch.autograd.grad(want, twins, grad_out.double(), allow_unused=True)
    pairs = [("output", got, want)] + [(f"grad {i}", g, w) for i, (g, w) in enumerate(zip(got_grads, want_grads))]
    for what, g, w in pairs:
        if w is None:  # not reached by the reference either (e.g. a mask token with every patch kept)
            assert g is None or not g.abs().any(), f"{what}: nonzero where the reference has no gradient"
            continue
        assert g is not None, f"{what}: missing"
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        err = (g.double() - w).abs().max().item() if w.numel() else 0.0
        assert err <= TOLERANCE[dtype] * scale, f"{what}: error {err:.3e} (scale {scale:.3g})"


def row_permutations(batch, length, gen):
    return torch.argsort(torch.rand(batch, length, generator=gen), dim=1).to(DEVICE)


@SETTINGS
@given(backend=st.sampled_from(BACKENDS), dtype=st.sampled_from(list(TOLERANCE)), batch=st.integers(1, 3),
       patches=st.integers(1, 40), kept_fraction=st.floats(0, 1), dim=st.integers(1, 70),
       with_pos=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_gather_tokens(backend, dtype, batch, patches, kept_fraction, dim, with_pos, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    kept = round(kept_fraction * patches)
    x = make((batch, patches, dim), dtype, gen, strided=strided)
    ids_keep = row_permutations(batch, patches, gen)[:, :kept]
    leaves = [x] + ([make((1, patches, dim), torch.float32, gen)] if with_pos else [])

    def op(x, pos=None):
        with mimkernels.use_backend(backend):
            return mimkernels.gather_tokens(x, ids_keep, pos_embed=pos)

    def reference_op(x, pos=None):
        return reference.gather_tokens(x, ids_keep, pos_embed=pos)

    check_against_float64(op, reference_op, leaves, dtype, seed)


@SETTINGS
@given(backend=st.sampled_from(BACKENDS), dtype=st.sampled_from(list(TOLERANCE)), batch=st.integers(1, 3),
       prefix=st.integers(0, 2), patches=st.integers(1, 40), kept_fraction=st.floats(0, 1),
       dim=st.integers(1, 70), with_pos=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_restore_tokens(backend, dtype, batch, prefix, patches, kept_fraction, dim, with_pos, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    kept = round(kept_fraction * patches)
    x_kept = make((batch, prefix + kept, dim), dtype, gen, strided=strided)
    ids_restore = row_permutations(batch, patches, gen)
    mask_token = make((1, 1, dim), dtype, gen)
    leaves = [x_kept, mask_token] + ([make((1, prefix + patches, dim), torch.float32, gen)] if with_pos else [])

    def op(x, token, pos=None):
        with mimkernels.use_backend(backend):
            return mimkernels.restore_tokens(x, ids_restore, token, pos_embed=pos, num_prefix_tokens=prefix)

    def reference_op(x, token, pos=None):
        return reference.restore_tokens(x, ids_restore, token, pos_embed=pos, num_prefix_tokens=prefix)

    check_against_float64(op, reference_op, leaves, dtype, seed)


@SETTINGS
@given(backend=st.sampled_from([b for b in BACKENDS if b != "extension"]), dtype=st.sampled_from(list(TOLERANCE)),
       batch=st.integers(1, 2), channels=st.integers(1, 3), patch=st.integers(1, 4), rows=st.integers(1, 3),
       cols=st.integers(1, 3), embed=st.integers(1, 40), masking=st.sampled_from(["none", "ids_keep", "mask"]),
       with_bias=st.booleans(), with_pos=st.booleans(), seed=st.integers(0, 2**16))
def test_patch_embed(backend, dtype, batch, channels, patch, rows, cols, embed, masking, with_bias, with_pos, seed):
    gen = torch.Generator().manual_seed(seed)
    num_patches = rows * cols
    images = make((batch, channels, rows * patch, cols * patch), dtype, gen)
    weight = make((embed, channels, patch, patch), dtype, gen)
    optional = {"bias": make((embed,), dtype, gen) if with_bias else None,
                "pos_embed": make((1, num_patches, embed), dtype, gen) if with_pos else None,
                "mask_token": make((1, 1, embed), dtype, gen) if masking == "mask" else None}
    names = [name for name, t in optional.items() if t is not None]
    leaves = [images, weight] + [optional[name] for name in names]
    fixed = {}
    if masking == "ids_keep":
        fixed["ids_keep"] = row_permutations(batch, num_patches, gen)[:, : (num_patches + 1) // 2]
    elif masking == "mask":
        fixed["mask"] = (torch.rand(batch, num_patches, generator=gen) < 0.5).to(DEVICE)

    def op(images, weight, *rest):
        with mimkernels.use_backend(backend):
            return mimkernels.patch_embed(images, weight, **dict(zip(names, rest)), **fixed)

    def reference_op(images, weight, *rest):
        return reference.patch_embed(images, weight, **dict(zip(names, rest)), **fixed)

    check_against_float64(op, reference_op, leaves, dtype, seed)


@SETTINGS
@given(backend=st.sampled_from([b for b in BACKENDS if b != "extension"]), dtype=st.sampled_from(list(TOLERANCE)),
       batch=st.integers(1, 3), channels=st.integers(1, 3), patch=st.integers(1, 4), rows=st.integers(1, 3),
       cols=st.integers(1, 3), norm_pix=st.booleans(), loss=st.sampled_from(["l2", "l1"]),
       mask_kind=st.sampled_from(["random", "none masked", "all masked"]), seed=st.integers(0, 2**16))
def test_masked_patch_loss(backend, dtype, batch, channels, patch, rows, cols, norm_pix, loss, mask_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    num_patches = rows * cols
    images = make((batch, channels, rows * patch, cols * patch), dtype, gen).detach()  # the target: no gradient
    pred = make((batch, num_patches, patch * patch * channels), dtype, gen)
    mask = {"random": (torch.rand(batch, num_patches, generator=gen) < 0.5).float(),
            "none masked": torch.zeros(batch, num_patches),
            "all masked": torch.ones(batch, num_patches)}[mask_kind].to(DEVICE)

    def op(pred):
        with mimkernels.use_backend(backend):
            return mimkernels.masked_patch_loss(pred, images, mask, norm_pix=norm_pix, loss=loss)

    def reference_op(pred):
        return reference.masked_patch_loss(pred, images.double(), mask, norm_pix=norm_pix, loss=loss)

    assume(not (norm_pix and patch * patch * channels == 1))  # one value per patch: no variance to normalise by
    check_against_float64(op, reference_op, [pred], dtype, seed, out_dtype=torch.float32)
