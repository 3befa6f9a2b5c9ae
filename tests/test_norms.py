"""add_layer_norm (the residual add fused with the next LayerNorm) against the float64 reference, fwd and bwd.

Error budget as in the attention tests: at most twice PyTorch's own error in the same dtypes (its unfused add and
LayerNorm) plus a small floor, against float64.
"""
import pytest
import torch
from conftest import DEVICE

import mimkernels
from mimkernels import reference

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the kernels allocate starts as NaN, so an element they fail to write fails the test."""
    from mimkernels.triton import norms

    allocate = norms._forward_fake

    def poisoned(*args):
        total, normed, mean, rstd = allocate(*args)
        return total.fill_(float("nan")), normed.fill_(float("nan")), mean.fill_(float("nan")), rstd

    monkeypatch.setattr(norms, "_forward_fake", poisoned)
    allocate_grads = norms._backward_fake

    def poisoned_grads(*args):
        grad, grad_branch, *parts = allocate_grads(*args)
        return grad.fill_(float("nan")), grad_branch.fill_(float("nan")), *parts

    monkeypatch.setattr(norms, "_backward_fake", poisoned_grads)


def make_inputs(shape, x_dtype, branch_dtype, affine=True, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]

    def tensor(dtype, scale=1.0):
        if layout == "contiguous":
            return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()
        # every row in a wider buffer, rows out of order in memory (laid out on the device: a copy there would not be)
        buffer = (torch.randn(*shape[:-1], width + 8, generator=gen) * scale).to(DEVICE, dtype)
        t = buffer.transpose(0, -2).contiguous().transpose(0, -2)[..., 4:4 + width]
        assert not t.is_contiguous()
        return t.requires_grad_()

    def parameter(mean):
        values = (mean + 0.5 * torch.randn(width, generator=gen)).to(DEVICE)
        if layout != "contiguous":  # every other element of a buffer (the kernels read it as if contiguous)
            values = torch.stack((values, torch.full_like(values, float("nan"))), dim=-1)[:, 0]
        return values.requires_grad_()

    x, branch = tensor(x_dtype, 2.0), tensor(branch_dtype)
    weight, bias = (parameter(1.0), parameter(0.0)) if affine else (None, None)
    return x, branch, weight, bias


def outputs_and_grads(fn, leaves, seed=1):
    total, normed = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    grad_total = torch.randn(total.shape, generator=gen).to(total.device, total.dtype)
    grad_normed = torch.randn(normed.shape, generator=gen).to(normed.device, normed.dtype)
    live = [leaf for leaf in leaves if leaf is not None]
    grads = torch.autograd.grad((total, normed), live, (grad_total, grad_normed))
    return [total, normed, *grads]


def unfused(x, branch, weight, bias, eps=1e-6):
    """What a pre-norm block does without the fusion: the add, then nn.LayerNorm's function (in fp32)."""
    return reference.add_layer_norm(x, branch, weight, bias, eps=eps)


def assert_within_budget(shape, x_dtype, branch_dtype, affine=True, layout="contiguous"):
    leaves = make_inputs(shape, x_dtype, branch_dtype, affine, layout)
    with mimkernels.use_backend("triton"):
        got = outputs_and_grads(lambda *t: mimkernels.add_layer_norm(*t, eps=1e-6), leaves)
    same_dtype = outputs_and_grads(unfused, leaves)
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    want = outputs_and_grads(unfused, leaves64)
    names = ["total", "normed", "grad x", "grad branch", "grad weight", "grad bias"]
    for name, g, t, w in zip(names, got, same_dtype, want):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err, torch_err = (g.double() - w).abs().max().item(), (t.double() - w).abs().max().item()
        floor = FLOOR[torch.float32 if name.startswith("grad w") or name.startswith("grad b") and "branch" not in name
                      else g.dtype]
        budget = 2 * torch_err + floor * max(1.0, w.abs().max().item())
        assert err <= budget, f"{name}: error {err:.3e} > budget {budget:.3e} (torch {torch_err:.3e})"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("rows, width", [(1, 16), (49, 40), (50, 64), (197, 80), (257, 128), (3, 33), (2, 768)])
def test_within_budget(rows, width, dtype):
    assert_within_budget((1, rows, width), dtype, dtype)


@pytest.mark.parametrize("x_dtype, branch_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_mixed_dtypes_as_under_autocast(x_dtype, branch_dtype):
    """The fp32 residual stream plus a 16-bit branch output: total is fp32, each input gets its own dtype back."""
    assert_within_budget((2, 50, 64), x_dtype, branch_dtype)


def test_without_affine_parameters():
    assert_within_budget((2, 9, 40), torch.float32, torch.float32, affine=False)


def test_strided_rows_and_parameters():
    assert_within_budget((3, 7, 48), torch.float32, torch.float32, layout="strided")


def test_many_rows_per_backward_program():
    """More rows than backward programs: each program sums the weight gradient over several rows."""
    from mimkernels.triton import norms

    assert 600 > norms.BACKWARD_PROGRAMS
    assert_within_budget((600, 1, 24), torch.float32, torch.float32)


@pytest.mark.parametrize("use", ["total", "normed"])
def test_only_one_output_used(use):
    x, branch, weight, bias = make_inputs((2, 5, 32), torch.float32, torch.float32)
    with mimkernels.use_backend("triton"):
        total, normed = mimkernels.add_layer_norm(x, branch, weight, bias)
    out = total if use == "total" else normed
    got = torch.autograd.grad(out.square().sum(), (x, branch))
    total_ref, normed_ref = reference.add_layer_norm(x, branch, weight, bias)
    want = torch.autograd.grad((total_ref if use == "total" else normed_ref).square().sum(), (x, branch))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_normed_comes_in_the_autocast_dtype():
    x, branch = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 5, 32, device=DEVICE, dtype=torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        total, normed = mimkernels.add_layer_norm(x, branch, torch.ones(32, device=DEVICE))
    assert total.dtype == torch.float32 and normed.dtype == torch.bfloat16
    want = torch.nn.functional.layer_norm(x + branch, (32,), torch.ones(32, device=DEVICE))
    torch.testing.assert_close(normed, want.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy, on inf and NaN
@pytest.mark.parametrize("output", ["normed", "total"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_output_gradient_reaches_what_its_row_feeds(bad, output):
    """An overflowed fp16 step's inf / NaN in one row of either output's gradient (GradScaler skips the step only
    if it comes out of the backward): that row's x and branch gradients are non-finite, every other row's finite;
    through the normed output also the weight and bias gradients of its column."""
    row, column = 7, 5
    leaves = make_inputs((2, 5, 64), torch.float32, torch.float32)
    with mimkernels.use_backend("triton"):
        total, normed = mimkernels.add_layer_norm(*leaves, eps=1e-6)
    grad_total, grad_normed = torch.ones_like(total), torch.ones_like(normed)
    (grad_normed if output == "normed" else grad_total).view(-1, 64)[row, column] = bad
    grad_x, grad_branch, grad_weight, grad_bias = torch.autograd.grad((total, normed), leaves,
                                                                      (grad_total, grad_normed))
    for grad in (grad_x, grad_branch):
        finite_rows = torch.isfinite(grad.reshape(-1, 64)).all(-1)
        assert not finite_rows[row] and finite_rows[torch.arange(10, device=DEVICE) != row].all()
    if output == "normed":
        assert not torch.isfinite(grad_weight[column]) and not torch.isfinite(grad_bias[column])
    else:
        assert torch.isfinite(grad_weight).all() and torch.isfinite(grad_bias).all()


def test_empty_input():
    x = torch.randn(0, 4, 16, device=DEVICE, requires_grad=True)
    with mimkernels.use_backend("triton"):
        total, normed = mimkernels.add_layer_norm(x, x.detach(), torch.ones(16, device=DEVICE))
    assert total.shape == normed.shape == (0, 4, 16)
    (total.sum() + normed.sum()).backward()
    assert x.grad.shape == x.shape


def test_bad_arguments_name_themselves():
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="branch must be a torch.Tensor"):
        mimkernels.add_layer_norm(x, 1.0)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        mimkernels.add_layer_norm(x.long(), x)
    with pytest.raises(ValueError, match="branch .* must match x"):
        mimkernels.add_layer_norm(x, x[:, :2])
    with pytest.raises(ValueError, match=r"weight must be None or a float tensor .* of shape \(8,\), got "
                                         r"torch.float32 of shape \(7,\)"):
        mimkernels.add_layer_norm(x, x, torch.ones(7))
    with pytest.raises(ValueError, match="bias must be None .* got torch.int64"):
        mimkernels.add_layer_norm(x, x, None, torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be None .* got torch.float8_e4m3fn"):
        mimkernels.add_layer_norm(x, x, torch.ones(8).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        mimkernels.add_layer_norm(x, x, eps=0)


def test_custom_ops_pass_opcheck():
    from mimkernels.triton import norms

    x, branch, weight = torch.randn(2, 5, 24), torch.randn(2, 5, 24, dtype=torch.float16), torch.randn(24)
    args = (x, branch, weight, torch.randn(24), 1e-5, torch.float32, torch.float16)
    torch.library.opcheck(norms.forward.custom_op, args)
    total, normed, mean, rstd = norms.forward(*args)
    grad_args = (torch.randn_like(normed), torch.randn_like(total), total, weight, mean, rstd, torch.float32)
    torch.library.opcheck(norms.backward.custom_op, grad_args)
    torch.library.opcheck(norms.backward.custom_op, (*grad_args, torch.bfloat16))


def test_branch_gradient_comes_from_the_kernel_in_its_dtype():
    """An fp32 stream with a 16-bit branch: the kernel writes the branch's gradient in fp16 itself (rounded once from
    the fp32 gradient, as a cast after it would round), so no cast runs after it."""
    from mimkernels.triton import norms

    x, branch, weight, bias = make_inputs((2, 7, 48), torch.float32, torch.float16)
    dtypes_asked = []
    backward = norms.backward

    def recording(*args):
        dtypes_asked.append(args[7:])
        return backward(*args)

    with mimkernels.use_backend("triton"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(norms, "backward", recording)
        outputs = outputs_and_grads(lambda *t: mimkernels.add_layer_norm(*t), (x, branch, weight, bias))
    grad_x, grad_branch = outputs[2:4]
    assert dtypes_asked == [(torch.float16,)]
    assert grad_x.dtype == torch.float32 and grad_branch.dtype == torch.float16
    torch.testing.assert_close(grad_branch, grad_x.to(torch.float16), rtol=0, atol=0)


def test_compiles_to_the_same_kernels():
    x, branch, weight, bias = make_inputs((2, 5, 32), torch.float32, torch.float32)

    def loss_of(x, branch, weight, bias):
        total, normed = mimkernels.add_layer_norm(x, branch, weight, bias)
        return total.sum() + normed.square().sum()

    with mimkernels.use_backend("triton"):
        compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
        got = compiled(x, branch, weight, bias)
        got_grads = torch.autograd.grad(got, (x, branch, weight, bias))
        want = loss_of(x, branch, weight, bias)
        want_grads = torch.autograd.grad(want, (x, branch, weight, bias))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_each_parameter_gradient_comes_in_its_own_dtype():
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    weight = torch.ones(16, device=DEVICE, dtype=torch.float16, requires_grad=True)
    bias = torch.zeros(16, device=DEVICE, requires_grad=True)
    with mimkernels.use_backend("triton"):
        total, normed = mimkernels.add_layer_norm(x, x.detach(), weight, bias)
    (total.sum() + normed.float().square().sum()).backward()
    assert weight.grad.dtype == torch.float16 and bias.grad.dtype == torch.float32
