"""MAE token ops on every backend against the official-MAE reference in float64, forward and gradients."""
import pytest
import torch
from conftest import DEVICE

import mimkernels
from benchmarks.official import random_masking as official_random_masking
from mimkernels import reference
from mimkernels.triton import tokens as kernels

BACKENDS = [name for name in ("torch", "triton", "extension") if name in mimkernels.available_backends()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # relative to the largest value


# (backend, tokens.FUSED_BACKWARD): the one-pass backwards run on the Triton backend only
BACKWARDS = [(name, False) for name in BACKENDS] + [("triton", True)] * ("triton" in BACKENDS)


def leaf(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()


def run(backend, fn, *args, **kwargs):
    with mimkernels.use_backend(backend):
        return fn(*args, **kwargs)


def assert_close_to_float64(got, want, dtype, what, tolerance=None):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert err <= (tolerance or TOLERANCE[dtype]) * scale, f"{what}: error {err:.3e}"


def check_grads(out, inputs, reference_fn, dtype, tolerance=None):
    """Gradients of ``out`` w.r.t. ``inputs`` against ``reference_fn`` run on float64 twins; ``tolerance``
    (relative to the largest value) replaces the dtype's where a gradient sums thousands of rows."""
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    got = torch.autograd.grad(out, inputs, grad_out)
    twins = [t.detach().double().requires_grad_() for t in inputs]
    want_out = reference_fn(*twins)
    want = torch.autograd.grad(want_out, twins, grad_out.double())
    assert_close_to_float64(out, want_out, dtype, "output", tolerance)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == inputs[i].dtype
        assert_close_to_float64(g, w, dtype, f"grad {i}", tolerance)


# --------------------------------------------------------------------------- random_masking


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patches, mask_ratio", [(49, 0.75), (196, 0.75), (50, 0.0), (197, 0.9)])
def test_random_masking_is_official_mae(backend, dtype, patches, mask_ratio):
    x = leaf(3, patches, 40, dtype=dtype)
    noise = torch.rand(3, patches, generator=torch.Generator().manual_seed(patches)).to(DEVICE)
    got = run(backend, mimkernels.random_masking, x, mask_ratio, noise=noise)
    x_masked, mask, ids_restore = official_random_masking(x.detach(), mask_ratio, noise)
    assert torch.equal(got.x_kept, x_masked)  # bit for bit: a gather copies
    assert torch.equal(got.mask, mask) and got.mask.dtype == torch.float32
    assert torch.equal(got.ids_restore, ids_restore)
    assert torch.equal(got.ids_keep, torch.argsort(noise, dim=1)[:, :x_masked.shape[1]])
    check_grads(got.x_kept, [x], lambda x64: official_random_masking(x64, mask_ratio, noise)[0], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_masking_keeps_prefix_tokens(backend):
    x = leaf(2, 1 + 196, 24)  # cls + 14 x 14 patches
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = run(backend, mimkernels.random_masking, x, 0.75, noise=noise, num_prefix_tokens=1)
    x_masked, mask, ids_restore = official_random_masking(x.detach()[:, 1:], 0.75, noise)
    assert torch.equal(got.x_kept, torch.cat([x.detach()[:, :1], x_masked], 1))
    assert torch.equal(got.mask, mask) and torch.equal(got.ids_restore, ids_restore)
    check_grads(got.x_kept, [x], lambda x64: reference.random_masking(
        x64, 0.75, noise=noise, num_prefix_tokens=1).x_kept, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_masking_adds_pos_embed(backend, dtype):
    x = leaf(2, 1 + 49, 40, dtype=dtype)
    pos = leaf(1, 1 + 49, 40, seed=5)
    noise = torch.rand(2, 49, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = run(backend, mimkernels.random_masking, x, 0.75, noise=noise, num_prefix_tokens=1, pos_embed=pos)
    check_grads(got.x_kept, [x, pos], lambda x64, pos64: reference.random_masking(
        x64, 0.75, noise=noise, num_prefix_tokens=1, pos_embed=pos64).x_kept, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_tokens_move_exactly_on_every_backend(backend):
    """float64 tokens, positions and mask token: every op's output and gradients are the reference's bit for bit.
    The Triton kernels rounded each value to fp32 (a gather of float64 tokens was off by 1e-7), the extension each
    value it added a position to; float64 now takes the reference on every backend."""
    def ops(x, pos, kept, token, dec_pos):
        noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        masking = mimkernels.random_masking(x, 0.75, noise=noise, num_prefix_tokens=1, pos_embed=pos)
        gathered = mimkernels.gather_tokens(x[:, 1:], masking.ids_keep, pos_embed=pos[:, 1:])
        restored = mimkernels.restore_tokens(kept, masking.ids_restore, token, pos_embed=dec_pos,
                                             num_prefix_tokens=1)
        return masking.x_kept, gathered, restored

    # tokens, their positions, kept tokens, a mask token and the decoder's positions
    shapes = [(2, 17, 24), (1, 17, 24), (2, 5, 24), (24,), (1, 17, 24)]
    leaves = [leaf(*shape, dtype=torch.float64, seed=seed) for seed, shape in enumerate(shapes)]
    got = run(backend, ops, *leaves)
    want = run("torch", ops, *leaves)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and torch.equal(g, w)
    grad_outs = [torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
                 for w in want]
    got_grads = torch.autograd.grad(got, leaves, grad_outs)
    want_grads = torch.autograd.grad(want, leaves, grad_outs)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch, kept", [(0, 2), (2, 0)])
def test_empty_batches_and_no_kept_tokens(backend, batch, kept):
    """An empty batch, or no token to gather: empty outputs, and zero gradients where the inputs hold values. The
    backward of ``out.sum()`` hands an empty gradient of stride 0, which the extension took for a bad layout
    ("x must have unit stride") before 2026-12-06."""
    x, pos, token = leaf(batch, 6, 16), leaf(1, 6, 16, seed=1), leaf(16, seed=2)
    ids_keep = torch.arange(kept, device=DEVICE).expand(batch, kept)
    ids_restore = torch.arange(6, device=DEVICE).expand(batch, 6)
    gathered = run(backend, mimkernels.gather_tokens, x, ids_keep, pos_embed=pos)
    restored = run(backend, mimkernels.restore_tokens, x[:, :kept], ids_restore, token, pos_embed=pos)
    assert gathered.shape == (batch, kept, 16) and restored.shape == (batch, 6, 16)
    grads = torch.autograd.grad(gathered.sum() + restored.sum(), [x, pos, token])
    want = torch.autograd.grad(reference.gather_tokens(x, ids_keep, pos_embed=pos).sum()
                               + reference.restore_tokens(x[:, :kept], ids_restore, token, pos_embed=pos).sum(),
                               [x, pos, token])
    for got, expected in zip(grads, want):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_float32_whatever_the_default_dtype(backend):
    """``torch.set_default_dtype(torch.float64)`` (some scientific code sets it): the mask stays the documented
    float32 on every backend (the reference's ``torch.ones`` took the default dtype)."""
    x = leaf(2, 1 + 16, 8)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        masking = run(backend, mimkernels.random_masking, x, 0.5, num_prefix_tokens=1)
        mask, _, _ = mimkernels.masking_indices(torch.rand(2, 16, device=DEVICE), 0.5)
    finally:
        torch.set_default_dtype(previous)
    assert masking.mask.dtype == mask.dtype == torch.float32
    assert masking.x_kept.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_masking_with_strided_noise(backend):
    """Noise in any layout ranks the patches as its values say: a column-major noise (a transposed view) gave the
    kernels ids they read as another row's, hence other tokens, with no error."""
    x = leaf(3, 17, 24)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    column_major = noise.t().contiguous().t()
    want = reference.random_masking(x, 0.75, noise=noise, num_prefix_tokens=1)
    got = run(backend, mimkernels.random_masking, x, 0.75, noise=column_major, num_prefix_tokens=1)
    for name, g, w in zip(want._fields, got, want):
        assert torch.equal(g, w), name
    for g, w in zip(mimkernels.masking_indices(column_major, 0.75), mimkernels.masking_indices(noise, 0.75)):
        assert torch.equal(g, w) and g.stride(-1) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_masking_draws_noise(backend):
    torch.manual_seed(3)
    first = run(backend, mimkernels.random_masking, leaf(2, 20, 16), 0.5)
    assert first.x_kept.shape == (2, 10, 16) and first.mask.sum().item() == 20
    assert torch.equal(first.ids_restore.sort(1).values, torch.arange(20, device=DEVICE).expand(2, 20))


# --------------------------------------------------------------------------- gather_tokens


@pytest.mark.parametrize("backend, fused_backward", BACKWARDS, indirect=["fused_backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patches, kept, dim", [(49, 12, 40), (196, 49, 33), (197, 50, 1100), (5, 5, 8)])
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_tokens(backend, fused_backward, dtype, patches, kept, dim, with_pos):
    x = leaf(2, patches, dim, dtype=dtype)
    ids = torch.stack([torch.randperm(patches, generator=torch.Generator().manual_seed(b))[:kept] for b in range(2)])
    ids = ids.to(DEVICE, torch.int32 if patches % 2 else torch.int64)
    inputs = [x]
    if with_pos:
        inputs.append(leaf(1, patches, dim, seed=1))
    out = run(backend, mimkernels.gather_tokens, x, ids, pos_embed=inputs[1] if with_pos else None)
    assert out.dtype == dtype and out.shape == (2, kept, dim)

    def want(x64, pos64=None):
        return reference.gather_tokens(x64, ids, pos_embed=pos64)

    check_grads(out, inputs, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_tokens_strided_input(backend):
    base = leaf(2, 30, 64)
    x = base[:, ::2, :48]  # every other token, a slice of the width
    ids = torch.tensor([[3, 0, 14], [7, 8, 1]], device=DEVICE)
    out = run(backend, mimkernels.gather_tokens, x, ids)
    torch.testing.assert_close(out, reference.gather_tokens(x, ids), rtol=0, atol=0)


# --------------------------------------------------------------------------- restore_tokens


@pytest.mark.parametrize("backend, fused_backward", BACKWARDS, indirect=["fused_backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix, patches, kept, dim", [(1, 196, 49, 40), (0, 49, 12, 33), (1, 50, 50, 16),
                                                        (2, 9, 0, 1100)])
@pytest.mark.parametrize("with_pos", [False, True])
def test_restore_tokens(backend, fused_backward, dtype, prefix, patches, kept, dim, with_pos):
    x_kept = leaf(3, prefix + kept, dim, dtype=dtype)
    mask_token = leaf(1, 1, dim, seed=2)  # an fp32 parameter, as in MAE
    ids_restore = torch.stack([torch.randperm(patches, generator=torch.Generator().manual_seed(b))
                               for b in range(3)]).to(DEVICE)
    inputs = [x_kept, mask_token]
    if with_pos:
        inputs.append(leaf(1, prefix + patches, dim, seed=3))
    out = run(backend, mimkernels.restore_tokens, x_kept, ids_restore, mask_token,
              pos_embed=inputs[2] if with_pos else None, num_prefix_tokens=prefix)
    assert out.dtype == dtype and out.shape == (3, prefix + patches, dim)

    def want(x64, token64, pos64=None):
        return reference.restore_tokens(x64, ids_restore, token64, pos_embed=pos64, num_prefix_tokens=prefix)

    check_grads(out, inputs, want, dtype)


@pytest.mark.parametrize("backend, fused_backward", BACKWARDS, indirect=["fused_backward"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_upstream_gradient_reaches_only_what_its_row_feeds(backend, fused_backward, bad):
    """An fp16 overflow on one row of the decoder input's gradient: on a restored kept row it reaches x_kept's
    gradient but not the mask token's; on a masked row the token's but not x_kept's (the reference gathers each
    row from one of them). A product with a 0/1 mask would spread 0 * inf = NaN into the token's gradient."""
    x_kept = leaf(2, 1 + 12, 16)
    mask_token = leaf(1, 1, 16, seed=2)
    ids_restore = torch.stack([torch.randperm(49, generator=torch.Generator().manual_seed(b))
                               for b in range(2)]).to(DEVICE)
    kept_row = 1 + int((ids_restore[0] < 12).nonzero()[0])
    masked_row = 1 + int((ids_restore[0] >= 12).nonzero()[0])
    for row, reaches, spared in ((kept_row, 0, 1), (masked_row, 1, 0)):
        out = run(backend, mimkernels.restore_tokens, x_kept, ids_restore, mask_token, num_prefix_tokens=1)
        grad_out = torch.ones_like(out)
        grad_out[0, row, 5] = bad
        grads = torch.autograd.grad(out, [x_kept, mask_token], grad_out)
        assert not torch.isfinite(grads[reaches]).all()
        assert torch.isfinite(grads[spared]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_then_restore_round_trip(backend):
    """Restoring with a zero mask token puts every kept token back and zeros elsewhere."""
    x = leaf(2, 1 + 49, 32)
    kept = run(backend, mimkernels.random_masking, x, 0.75, num_prefix_tokens=1)
    zero = torch.zeros(32, device=DEVICE)
    back = run(backend, mimkernels.restore_tokens, kept.x_kept, kept.ids_restore, zero, num_prefix_tokens=1)
    keep = torch.cat([torch.ones(2, 1, device=DEVICE), 1 - kept.mask], 1).unsqueeze(-1)
    torch.testing.assert_close(back, x.detach() * keep, rtol=0, atol=0)


# --------------------------------------------------------------------------- out-of-range ids in the kernels


def test_kernels_never_leave_the_tensors():
    """Unchecked bad ids read only inside x: its neighbours in memory are NaN and must not show up."""
    storage = torch.full((2, 12, 8), float("nan"), device=DEVICE)
    x = storage[:, 2:10]  # 8 tokens, NaN rows on both sides
    x.copy_(torch.randn(2, 8, 8))
    bad = torch.tensor([[0, -1, 8, 1 << 40], [7, -(1 << 40), 3, 9]], device=DEVICE)
    gathered = kernels.gather_rows(x, bad, None, 0)
    assert torch.isfinite(gathered).all()
    torch.testing.assert_close(gathered[0, 0], x[0, 0])
    torch.testing.assert_close(gathered[0, 1:], torch.zeros_like(gathered[0, 1:]))  # out of [0, L): zero rows
    torch.testing.assert_close(gathered[1, 0], x[1, 7])
    torch.testing.assert_close(gathered[1, 2], x[1, 3])
    torch.testing.assert_close(gathered[1, 1::2], torch.zeros_like(gathered[1, 1::2]))
    token = torch.ones(8, device=DEVICE)
    restored = kernels.restore_rows(x, bad, token, None, 0)
    assert torch.isfinite(restored).all()
    torch.testing.assert_close(restored[0, 1:], token.expand(3, 8))  # out of [0, K): the mask token


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
@pytest.mark.parametrize("fused_backward", [True], indirect=True)
@pytest.mark.parametrize("backward_programs", [6, 2048])
def test_fused_backwards_sum_over_sample_groups(fused_backward, backward_programs, monkeypatch):
    """Five samples over 10 full-length rows, in groups of at least BACKWARD_BLOCK_S (4) samples: the last group has
    one live sample, so the positional embedding's and the token's gradients add partial sums of unequal groups;
    both backwards, float64 reference. With 6 programs' worth of work, 2 samples a group before rounding; 2048, 1."""
    monkeypatch.setattr(kernels, "BACKWARD_PROGRAMS", backward_programs)
    ids_restore = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(b)) for b in range(5)])
    ids_restore = ids_restore.to(DEVICE)
    ids_keep = ids_restore.argsort(1)[:, :3]
    x, pos = leaf(5, 1 + 9, 40), leaf(1, 1 + 9, 40, seed=1)
    kept = run("triton", mimkernels.random_masking, x, 0.6, noise=ids_restore.float() / 9, pos_embed=pos,
               num_prefix_tokens=1)
    torch.testing.assert_close(kept.ids_restore, ids_restore, rtol=0, atol=0)
    check_grads(kept.x_kept, [x, pos], lambda x64, pos64: reference.gather_tokens(
        x64 + pos64, torch.cat([torch.zeros(5, 1, dtype=ids_keep.dtype, device=DEVICE), ids_keep + 1], 1)),
        torch.float32)
    x_kept, token, pos = leaf(5, 1 + 3, 40, seed=2), leaf(1, 1, 40, seed=3), leaf(1, 1 + 9, 40, seed=4)
    out = run("triton", mimkernels.restore_tokens, x_kept, ids_restore, token, pos_embed=pos, num_prefix_tokens=1)
    check_grads(out, [x_kept, token, pos], lambda x64, token64, pos64: reference.restore_tokens(
        x64, ids_restore, token64, pos_embed=pos64, num_prefix_tokens=1), torch.float32)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_fused_backward_kernel_never_leaves_the_tensors():
    """Unchecked bad ids (negative, past K, past L) in rows_backward: reads and writes stay inside the gradient and
    its output (NaN neighbours in memory never show up); such rows count as not kept."""
    storage = torch.full((2, 8, 8), float("nan"), device=DEVICE)
    grad = storage[:, 2:6]  # P + K = 1 + 3 rows, NaN rows on both sides
    grad.copy_(torch.randn(2, 4, 8))
    bad = torch.tensor([[0, -1, 3, 1 << 40, 2], [-(1 << 40), 1, 9, 0, 2]], device=DEVICE)
    gathered_back, pos_sum, _ = kernels.rows_backward(grad, bad, 1, 3, False, True, False)
    assert torch.isfinite(gathered_back).all() and torch.isfinite(pos_sum).all()
    torch.testing.assert_close(gathered_back[0, 1], grad[0, 1])  # id 0: patch row 0 came from grad row 1
    torch.testing.assert_close(gathered_back[0, 2:5], torch.zeros(3, 8, device=DEVICE))  # -1, 3 (= K), 2^40
    torch.testing.assert_close(pos_sum, gathered_back.sum(0))
    full = torch.randn(2, 6, 8, device=DEVICE)
    scattered, _, token_sum = kernels.rows_backward(full, bad, 1, 3, True, False, True)
    assert torch.isfinite(token_sum).all()
    torch.testing.assert_close(scattered[0, 1], full[0, 1])  # patch row 0 kept as id 0
    not_kept = [full[0, 2], full[0, 3], full[0, 4], full[1, 1], full[1, 3]]  # ids -1, 3, 2^40, -2^40, 9
    torch.testing.assert_close(token_sum, torch.stack(not_kept).sum(0))


@pytest.mark.skipif("extension" not in BACKENDS, reason="the compiled extension is not built")
def test_extension_ops_pass_opcheck():
    """Schema, fake (meta) kernels for torch.compile, and dispatch of the csrc ops."""
    x, pos = torch.randn(2, 6, 8), torch.randn(1, 6, 8)
    torch.library.opcheck(torch.ops.mimkernels.gather_rows.default, (x, torch.tensor([[4, 0], [1, 3]]), pos, 1))
    ids_restore = torch.tensor([[3, 0, 1, 2], [2, 3, 0, 1]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.mimkernels.restore_rows.default, (x[:, :3], ids_restore, torch.zeros(8), None, 1))


@pytest.mark.skipif("extension" not in BACKENDS, reason="the compiled extension is not built")
def test_extension_cpu_ops_raise_index_error():
    from mimkernels import extension

    x = torch.randn(2, 8, 8)
    bad = torch.tensor([[0, 8], [1, 2]])
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        extension.gather_rows(x, bad, None, 0)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        extension.restore_rows(x, bad, torch.zeros(8), None, 0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, error, match", [
    (lambda x, i: mimkernels.random_masking(x, 1.0), ValueError, "mask_ratio"),
    (lambda x, i: mimkernels.random_masking(x, -0.1), ValueError, "mask_ratio"),
    (lambda x, i: mimkernels.random_masking(x[:, :3], 0.75), ValueError, "keeps no patch"),
    (lambda x, i: mimkernels.random_masking(x, 0.5, num_prefix_tokens=11), ValueError, "num_prefix_tokens"),
    (lambda x, i: mimkernels.random_masking(x, 0.5, num_prefix_tokens=1.0), TypeError, "num_prefix_tokens"),
    (lambda x, i: mimkernels.random_masking(x, 0.5, noise=torch.rand(2, 9)), ValueError, "noise"),
    (lambda x, i: mimkernels.random_masking(x[0], 0.5), ValueError, "3-D"),
    (lambda x, i: mimkernels.random_masking(x.long(), 0.5), TypeError, "floating-point"),
    # float8 noise failed inside argsort; a complex pos_embed is no position
    (lambda x, i: mimkernels.random_masking(x, 0.5, noise=torch.rand(2, 10).to(torch.float8_e4m3fn)), TypeError,
     "noise must be a floating-point tensor .* got torch.float8_e4m3fn"),
    (lambda x, i: mimkernels.gather_tokens(x, i, pos_embed=torch.zeros(1, 10, 4, dtype=torch.complex64)), TypeError,
     "pos_embed must be a floating-point tensor"),
    (lambda x, i: mimkernels.restore_tokens(x[:, :3].to(torch.float8_e4m3fn), i, torch.zeros(4)), TypeError,
     "x_kept must be a floating-point tensor"),
    (lambda x, i: mimkernels.gather_tokens(x, i.float()), TypeError, "int32 or int64"),
    (lambda x, i: mimkernels.gather_tokens(x, i[:1]), ValueError, r"ids_keep must have shape \[2, K\]"),
    (lambda x, i: mimkernels.gather_tokens(x, i + 10), IndexError, r"\[0, 10\)"),
    (lambda x, i: mimkernels.gather_tokens(x, i * 0), ValueError, "distinct"),
    (lambda x, i: mimkernels.gather_tokens(x, i, pos_embed=torch.zeros(1, 10, 5)), ValueError, "pos_embed"),
    (lambda x, i: mimkernels.restore_tokens(x[:, :3], i, torch.zeros(5)), ValueError, "mask_token must hold 4"),
    (lambda x, i: mimkernels.restore_tokens(x[:, :3], i, None), TypeError, "mask_token"),
    (lambda x, i: mimkernels.restore_tokens(x, i, torch.zeros(4)), ValueError, "only 3 places"),
    (lambda x, i: mimkernels.restore_tokens(x[:, :3], i * 0, torch.zeros(4)), ValueError, "permutation"),
    (lambda x, i: mimkernels.restore_tokens(x[:, :3], i, torch.zeros(4), num_prefix_tokens=4), ValueError,
     "num_prefix_tokens"),
    (lambda x, i: mimkernels.restore_tokens(x[:, :4], i, torch.zeros(4), pos_embed=torch.zeros(1, 3, 4),
                                            num_prefix_tokens=1), ValueError, r"pos_embed must have shape \(1, 4, 4\)"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(backend, call, error, match):
    x = torch.randn(2, 10, 4)
    ids = torch.tensor([[0, 2, 1], [2, 0, 1]])
    with mimkernels.use_backend(backend), pytest.raises(error, match=match):
        call(x, ids)


@pytest.mark.parametrize("patches, mask_ratio", [(196, 0.75), (49, 0.5), (1, 0.0), (50, 0.9)])
def test_masking_indices_are_random_maskings(patches, mask_ratio):
    noise = torch.rand(3, patches, generator=torch.Generator().manual_seed(patches))
    mask, ids_restore, ids_keep = mimkernels.masking_indices(noise, mask_ratio)
    x = torch.randn(3, patches, 8)
    x_kept, want_mask, want_restore = official_random_masking(x, mask_ratio, noise)
    assert torch.equal(mask, want_mask) and torch.equal(ids_restore, want_restore)
    assert torch.equal(torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 8)), x_kept)


@pytest.mark.parametrize("noise, ratio, error, match", [
    (torch.rand(2, 4), 1.0, ValueError, "mask_ratio"),
    (torch.rand(2, 4), 0.9, ValueError, "keeps no patch"),
    (torch.rand(8), 0.5, TypeError, "noise must be a 2-D"),
    (torch.arange(8).reshape(2, 4), 0.5, TypeError, r"noise must be a 2-D floating-point .* got torch.int64 of shape"),
    (torch.rand(2, 4).to(torch.float8_e4m3fn), 0.5, TypeError, "noise must be a 2-D floating-point"),
    ([[0.1, 0.2]], 0.5, TypeError, "noise"),
])
def test_masking_indices_bad_input(noise, ratio, error, match):
    with pytest.raises(error, match=match):
        mimkernels.masking_indices(noise, ratio)
