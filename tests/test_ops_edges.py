"""Every public op off the training path: second derivatives and meta tensors.

- A kernel's backward writes plain tensors: asked for a graph (``create_graph=True``, e.g. a gradient penalty), it
  would hand back gradients that depend on nothing, and a penalty built on them would differentiate to zero without
  a word, beside a loss that differentiates as usual. Differentiating them raises instead, naming the op
  (``ops/_autograd.py``); the PyTorch backend (plain ops, SDPA's math kernel) gives the true second derivative.
- Meta tensors (shape inference, ``FlopCounterMode`` on a model built under ``torch.device("meta")``) have no
  autocast state, and torch raises when asked for one: every op runs on them through the PyTorch backend, with the
  shapes and dtypes it gives on the CPU.
- Layouts: an input may come as a broadcast (``expand``: stride 0, as a position embedding or mask token expanded
  over the batch), transposed in its last two dims, or with every other element of a wider last dim; and the output
  gradient of ``out.sum()`` is itself a stride-0 tensor. Each op gives the same outputs and gradients as from
  contiguous copies, on the PyTorch and Triton backends, compiled (``aot_eager``: the kernels' custom ops traced
  through their fake kernels), and for the token ops on the C++ extension.
- A graph kept with ``retain_graph=True`` gives the same gradients on a second backward: no backward writes into
  what its forward saved.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mimkernels
from mimkernels import _backend
from mimkernels.models import aim_tiny, mae_vit_tiny_patch8

B, N, H, D, E = 2, 9, 2, 16, 32


def _calls(device):
    """{op name: (function of its float inputs, those inputs)}, small shapes, one per public op."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    ids_restore = torch.stack([torch.randperm(8, generator=g) for _ in range(B)]).to(device)
    ids_keep = ids_restore.argsort(1)[:, :3]
    mask = (ids_restore >= 3).float()
    images = rand(B, 3, 16, 16)
    return {
        "attention": (lambda q, k, v: mimkernels.attention(q, k, v, causal=True), (rand(B, H, N, D),) * 3),
        "prefix_causal_attention": (lambda q, k, v: mimkernels.prefix_causal_attention(
            q, k, v, torch.tensor([3, 5], device=device)), (rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D))),
        "qkv_attention": (lambda qkv: mimkernels.qkv_attention(qkv, prefix_len=4), (rand(B, N, 3, H, D),)),
        "random_masking": (lambda x, pos: mimkernels.random_masking(
            x, 0.6, noise=ids_restore.float(), num_prefix_tokens=1, pos_embed=pos).x_kept, (rand(B, 9, E),
                                                                                        rand(1, 9, E))),
        "gather_tokens": (lambda x, pos: mimkernels.gather_tokens(x, ids_keep, pos_embed=pos),
                          (rand(B, 8, E), rand(1, 8, E))),
        "restore_tokens": (lambda x, token, pos: mimkernels.restore_tokens(
            x, ids_restore, token, pos_embed=pos, num_prefix_tokens=1), (rand(B, 4, E), rand(E), rand(1, 9, E))),
        "patch_embed": (lambda images, weight, bias: mimkernels.patch_embed(images, weight, bias, ids_keep=ids_keep),
                        (images, rand(E, 3, 4, 4), rand(E))),
        "masked_patch_loss": (lambda pred: mimkernels.masked_patch_loss(pred, images, mask[:, :8].repeat(1, 2)),
                              (rand(B, 16, 48),)),
        "add_layer_norm": (lambda x, branch, w, b: mimkernels.add_layer_norm(x, branch, w, b)[1],
                           (rand(B, N, E), rand(B, N, E), rand(E), rand(E))),
        "gelu_mlp": (lambda x, w1, b1, w2, b2: mimkernels.gelu_mlp(x, w1, b1, w2, b2),
                     (rand(B, N, E), rand(48, E), rand(48), rand(E, 48), rand(E))),
    }


OPS = list(_calls("cpu"))
OP_NAMES = {"prefix_causal_attention": "attention", "random_masking": "gather_tokens"}  # the Function they run


def _first_grads(fn, inputs, create_graph=True):
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    # squared, so that the gradient reaching the op depends on the inputs too, as a loss's does
    return inputs, torch.autograd.grad((out.square() * weights).sum(), inputs, create_graph=create_graph)


@pytest.mark.parametrize("name", OPS)
def test_a_second_derivative_through_a_kernel_raises(name):
    fn, inputs = _calls("cpu")[name]
    with mimkernels.use_backend("triton"):
        _, plain = _first_grads(fn, inputs, create_graph=False)
        inputs, grads = _first_grads(fn, inputs)
        loss = fn(*inputs).square().sum() + sum(grad.square().sum() for grad in grads)  # a gradient penalty
    for got, want in zip(grads, plain):  # the same first derivative either way
        assert got.requires_grad and torch.equal(got, want)
    with pytest.raises(RuntimeError, match=rf"mimkernels\.{OP_NAMES.get(name, name)} has no second derivative"):
        loss.backward()


@pytest.mark.parametrize("name", ["gather_tokens", "restore_tokens"])
def test_a_second_derivative_through_the_extension_raises(name):
    if "extension" not in _backend.available_backends():
        pytest.skip("the C++ extension is not built here")
    fn, inputs = _calls("cpu")[name]
    with mimkernels.use_backend("extension"):
        inputs, grads = _first_grads(fn, inputs)
        loss = fn(*inputs).square().sum() + sum(grad.square().sum() for grad in grads)
    with pytest.raises(RuntimeError, match=f"mimkernels.{name} has no second derivative"):
        loss.backward()


def test_the_pytorch_backend_gives_second_derivatives():
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    prefix = torch.tensor([3, 5])
    mask = mimkernels.prefix_causal_mask(N, prefix)

    def penalty_grad(attend):
        grad_q, = torch.autograd.grad(attend(q, k, v).square().sum(), q, create_graph=True)
        return torch.autograd.grad(grad_q.square().sum(), k)[0]

    def dense(q, k, v):  # the definition, in plain ops
        scores = (q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v

    # The PyTorch backend's attention is SDPA: its math kernel has second derivatives (its fused ones do not, and say
    # so). float32 is the ops' widest dtype.
    with mimkernels.use_backend("torch"), sdpa_kernel(SDPBackend.MATH):
        got = penalty_grad(lambda *t: mimkernels.prefix_causal_attention(*(x.float() for x in t), prefix).double())
    want = penalty_grad(dense)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("name", OPS)
def test_every_op_runs_on_meta_tensors_as_on_the_cpu(name):
    fn, inputs = _calls("meta")[name]
    got = fn(*inputs)
    fn, inputs = _calls("cpu")[name]
    with mimkernels.use_backend("torch"):
        want = fn(*inputs)
    assert got.device.type == "meta" and (got.shape, got.dtype) == (want.shape, want.dtype)


LAYOUTS = {
    "expanded": lambda t: t[:1].expand(t.shape),  # stride 0 in the first dim (its gradient sums over it)
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
    "every_other": lambda t: torch.stack([t, -t], -1).flatten(-2)[..., ::2],  # last-dim stride 2
}


def _weighted_loss(out):
    """A loss whose gradient differs at every output element and depends on the output (squared term)."""
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out) + out.square()).sum()


def _outputs_and_grads(fn, inputs, layout=None, contiguous=False, loss="weighted"):
    """``fn``'s output and the gradients of its input leaves, the inputs laid out as ``layout`` (then copied
    contiguous if asked); ``loss`` "sum" hands the op a stride-0 output gradient, "ones" the same values contiguous."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    laid_out = [LAYOUTS[layout](t) if layout and t.dim() > 1 else t for t in leaves]
    out = fn(*[t.contiguous() if contiguous else t for t in laid_out])
    if loss == "weighted":
        total = _weighted_loss(out)
    else:
        total = out.sum() if loss == "sum" else (out * torch.ones_like(out)).sum()
    return out, torch.autograd.grad(total, leaves)


# every op on both backends and compiled (its Triton kernels as custom ops in the graph, through their fake kernels),
# and the token ops, which the C++ extension runs too, on it
BACKEND_CASES = [(name, backend) for name in OPS for backend in ("torch", "triton", "triton_compiled")] + [
    (name, "extension") for name in ("random_masking", "gather_tokens", "restore_tokens")]


@pytest.mark.parametrize("layout", [*LAYOUTS, "stride0_grad"])
@pytest.mark.parametrize(("name", "backend"), BACKEND_CASES)
def test_every_op_gives_the_same_numbers_in_any_layout(name, backend, layout):
    if backend not in _backend.available_backends() + ["triton_compiled"]:
        pytest.skip(f"the {backend} backend cannot run here")
    fn, inputs = _calls("cpu")[name]
    tested = fn  # on the odd layout; the contiguous copies always go through fn eagerly
    if backend == "triton_compiled":
        backend, tested = "triton", torch.compile(fn, fullgraph=True, backend="aot_eager")
    with mimkernels.use_backend(backend):
        if layout == "stride0_grad":
            got, want = _outputs_and_grads(tested, inputs, loss="sum"), _outputs_and_grads(fn, inputs, loss="ones")
        else:
            got = _outputs_and_grads(tested, inputs, layout)
            want = _outputs_and_grads(fn, inputs, layout, contiguous=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "backend"), [case for case in BACKEND_CASES if case[1] != "triton_compiled"])
def test_a_retained_graph_gives_the_same_gradients_again(name, backend):
    """A second backward through a graph kept with ``retain_graph=True`` reads the saved tensors again: every op's
    backward leaves them as the forward saved them (the second gradients equal the first, bit for bit). The attention
    kernels' variants: tests/test_attention.py."""
    if backend not in _backend.available_backends():
        pytest.skip(f"the {backend} backend cannot run here")
    fn, inputs = _calls("cpu")[name]
    leaves = [t.clone().requires_grad_() for t in inputs]
    with mimkernels.use_backend(backend):
        out = fn(*leaves)
    loss = _weighted_loss(out)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    again = torch.autograd.grad(loss, leaves)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("build", [mae_vit_tiny_patch8, aim_tiny])
def test_models_built_on_meta_count_the_flops_of_the_cpu_model(build):
    def flops(device):
        torch.manual_seed(0)
        with torch.device(device):
            model = build()
            images = torch.randn(2, 3, 64, 64)
        # SDPA through its math kernel on both devices: FlopCounterMode counts its matmuls, not every fused kernel
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            loss = model(images, 16)[0] if build is aim_tiny else model(images)[0]
            loss.backward()
        return counter.get_total_flops()

    with mimkernels.use_backend("torch"):
        on_cpu = flops("cpu")
    assert flops("meta") == on_cpu > 0
