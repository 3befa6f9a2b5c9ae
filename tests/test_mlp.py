"""gelu_mlp (the MLP with GELU inside its two GEMMs) against the float64 reference, forward and every gradient.

Error budget as in the other op tests: at most twice PyTorch's own error in the same dtype (F.linear, F.gelu,
F.linear) plus a small floor, against float64.
"""
import pytest
import torch
from conftest import DEVICE

import mimkernels
from mimkernels import reference

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_DTYPES = [torch.float32, torch.float16]
NAMES = ["out", "grad x", "grad fc1_weight", "grad fc1_bias", "grad fc2_weight", "grad fc2_bias"]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the kernels write starts as NaN, so an element they fail to write fails the test."""
    real_empty_like, real_new_empty = torch.empty_like, torch.Tensor.new_empty  # what the launchers allocate with

    def new_empty(t, *shape, **kwargs):
        made = real_new_empty(t, *shape, **kwargs)
        return made.fill_(float("nan")) if made.is_floating_point() else made

    monkeypatch.setattr(torch, "empty_like", lambda t: real_empty_like(t).fill_(float("nan")))
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)


def make_inputs(lead, width, hidden, out, dtype, bias=True, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def param(*shape, fan_in=1):
        return (torch.randn(*shape, generator=gen) / fan_in ** 0.5).to(DEVICE, dtype).requires_grad_()

    if layout == "contiguous":
        x = torch.randn(*lead, width, generator=gen)
    else:  # rows inside a wider buffer and the leading dims swapped: no unit row stride, no contiguity
        x = torch.randn(*reversed(lead), width + 8, generator=gen)[..., 3:3 + width].transpose(0, -2)
    x = x.to(DEVICE, dtype).requires_grad_()
    return (x, param(hidden, width, fan_in=width), param(hidden) if bias else None,
            param(out, hidden, fan_in=hidden), param(out) if bias else None)


def outputs_and_grads(fn, leaves, seed=1):
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    live = [leaf for leaf in leaves if leaf is not None]
    return [out, *torch.autograd.grad(out, live, grad)]


def assert_within_budget(lead, width, hidden, out, dtype, bias=True, layout="contiguous"):
    leaves = make_inputs(lead, width, hidden, out, dtype, bias, layout)
    with mimkernels.use_backend("triton"):
        got = outputs_and_grads(mimkernels.gelu_mlp, leaves)
    same_dtype = outputs_and_grads(reference.gelu_mlp, leaves)
    want = outputs_and_grads(reference.gelu_mlp, [None if t is None else t.detach().double().requires_grad_()
                                                  for t in leaves])
    names = [name for name in NAMES if bias or "bias" not in name]
    assert len(got) == len(names)
    for name, g, t, w in zip(names, got, same_dtype, want):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err, torch_err = (g.double() - w).abs().max().item(), (t.double() - w).abs().max().item()
        budget = 2 * torch_err + FLOOR[dtype] * max(1.0, w.abs().max().item())
        assert err <= budget, f"{name}: error {err:.3e} > budget {budget:.3e} (torch {torch_err:.3e})"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("tokens, width", [(1, 40), (49, 64), (50, 80), (197, 40), (257, 128)])
def test_within_budget(tokens, width, dtype):
    """Token counts of ViTs (1 for an edge), widths that are and are not multiples of the k tile."""
    assert_within_budget((2, tokens), width, 4 * width, width, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_without_biases(dtype):
    """AIM's MLP has no bias."""
    assert_within_budget((3, 17), 48, 160, 48, dtype, bias=False)


def test_odd_sizes_everywhere():
    """No size a multiple of any tile: rows, width (k of fc1), hidden (n of fc1, k of the gradient GEMM), out."""
    assert_within_budget((1, 131), 37, 135, 29, torch.float32)


def test_strided_input():
    assert_within_budget((3, 7), 48, 96, 48, torch.float32, layout="strided")


def test_one_leading_dimension_and_many_rows():
    """More row tiles than one group of GROUP_M (the grouped tile order), x 2-D."""
    from mimkernels.triton import mlp

    tile = mlp.CONFIGS[4]
    assert_within_budget((tile.block_m * tile.group_m + 70,), 24, 40, 16, torch.float32)


SMALL_TILE = (16, 32, 16, 2, 4, 1)  # interpreter-sized; a group of 2 row tiles


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lead, width, hidden, out", [((2, 25), 40, 72, 24), ((1,), 16, 32, 8), ((3, 7), 64, 96, 40)],
                         ids=str)
def test_tma_tiles_match_the_pointer_tiles(monkeypatch, lead, width, hidden, out, bias):
    """A ``tma`` tile (the 2-byte sweep's Hopper candidates; the interpreter runs descriptors like Hopper): x, the
    weights, h, gelu(h) and dh through 2-D tensor descriptors, whose zero fill past the rows, cols and depth
    replaces the wrapped offsets and k masks. Within budget, and bit-equal to the same tile through pointers."""
    from mimkernels.triton import launch, mlp

    tma_tile = mlp.GemmTile(*SMALL_TILE, tma=True)
    monkeypatch.setattr(mlp, "CONFIGS", {**mlp.CONFIGS, 2: tma_tile})
    leaves = make_inputs(lead, width, hidden, out, torch.float16, bias)
    assert launch.tma_usable(*(t for t in leaves if t is not None))  # else this tests the pointer path twice
    assert_within_budget(lead, width, hidden, out, torch.float16, bias)
    with mimkernels.use_backend("triton"):
        got = outputs_and_grads(mimkernels.gelu_mlp, leaves)
        monkeypatch.setattr(mlp, "CONFIGS", {**mlp.CONFIGS, 2: tma_tile._replace(tma=False)})
        want = outputs_and_grads(mimkernels.gelu_mlp, leaves)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_tma_tile_falls_back_to_pointers_where_descriptors_cannot_read(monkeypatch):
    """A width of 36 fp16 values is a 72-byte row stride, which TMA cannot describe: the same tile runs through
    pointers, within budget."""
    from mimkernels.triton import launch, mlp

    monkeypatch.setattr(mlp, "CONFIGS", {**mlp.CONFIGS, 2: mlp.GemmTile(*SMALL_TILE, tma=True)})
    assert not launch.tma_usable(make_inputs((2, 5), 36, 64, 24, torch.float16)[0])
    assert_within_budget((2, 5), 36, 64, 24, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("candidate", range(12), ids=lambda i: f"candidate{i}")
def test_sweep_tiles_compiled(monkeypatch, candidate):
    """Each tile of bench_mlp's sweep (one of them may be shipped as ``CONFIGS[2]`` from the sweep's timings alone),
    compiled for the GPU at hand, forward and backward in bf16 at a ViT-B-like shape whose rows (1028) fit no tile:
    within budget of float64 (the sweep checks the forward only). ``tma`` tiles on Hopper or newer."""
    from mimkernels.triton import launch, mlp

    assert len(mlp.CANDIDATES) == 12  # the parametrisation above
    tile = mlp.GemmTile(*mlp.CANDIDATES[candidate])
    if tile.tma and launch.compute_capability(torch.device(DEVICE)) < 90:
        pytest.skip("TMA descriptors need Hopper or newer")
    monkeypatch.setattr(mlp, "CONFIGS", {**mlp.CONFIGS, 2: tile})
    assert_within_budget((4, 257), 768, 3072, 768, torch.bfloat16)
    assert_within_budget((1028,), 384, 1536, 384, torch.bfloat16, bias=False)


def test_tile_names_say_what_they_are():
    from mimkernels.triton import mlp

    assert str(mlp.GemmTile(64, 128, 32, 8, 4, 4)) == "64x128x32g8w4s4"
    assert str(mlp.GemmTile(128, 256, 64, 8, 8, 3, tma=True)) == "128x256x64g8w8s3+tma"
    assert any(tile.tma for tile in mlp.CANDIDATES) and not any(tile.tma for tile in mlp.CONFIGS.values())
    for tile in (*mlp.CANDIDATES, *mlp.CONFIGS.values()):  # names read back (bench_models --mlp-tile)
        assert mlp.GemmTile.parse(str(tile)) == tile
    with pytest.raises(ValueError, match="not a GEMM tile: '128x128x64'"):
        mlp.GemmTile.parse("128x128x64")


def test_autocast_computes_in_its_dtype_and_grads_reach_the_fp32_parameters():
    """fp32 parameters and input under autocast (a training step): the GEMMs run in autocast's dtype, as F.linear's
    would, and every gradient comes back in its leaf's dtype, within the 16-bit budget of the unfused path."""
    leaves = make_inputs((2, 13), 32, 128, 32, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16), mimkernels.use_backend("triton"):
        got = outputs_and_grads(mimkernels.gelu_mlp, leaves)
    with torch.autocast(DEVICE, dtype=torch.float16):
        unfused = outputs_and_grads(reference.gelu_mlp, leaves)
    want = outputs_and_grads(reference.gelu_mlp, [t.detach().double().requires_grad_() for t in leaves])
    assert got[0].dtype == unfused[0].dtype == torch.float16
    for name, g, t, w in zip(NAMES, got, unfused, want):
        assert g.dtype == t.dtype, name
        err, torch_err = (g.double() - w).abs().max().item(), (t.double() - w).abs().max().item()
        assert err <= 2 * torch_err + FLOOR[torch.float16] * max(1.0, w.abs().max().item()), name


def test_backends_agree_and_torch_backend_is_the_reference():
    leaves = make_inputs((2, 5), 16, 64, 8, torch.float32)
    with mimkernels.use_backend("torch"):
        got = outputs_and_grads(mimkernels.gelu_mlp, leaves)
    want = outputs_and_grads(reference.gelu_mlp, leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_only_some_inputs_need_gradients():
    x, w1, b1, w2, b2 = make_inputs((4, 3), 16, 32, 16, torch.float32)
    frozen = [t.detach() for t in (w1, b1)]
    with mimkernels.use_backend("triton"):
        out = mimkernels.gelu_mlp(x, *frozen, w2, b2)
    got = torch.autograd.grad(out.square().sum(), (x, w2, b2))
    want = torch.autograd.grad(reference.gelu_mlp(x, *frozen, w2, b2).square().sum(), (x, w2, b2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy, on inf and NaN
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_output_gradient_reaches_what_its_row_feeds(bad):
    """An overflowed fp16 step's inf / NaN in one output gradient (GradScaler skips the step only if it comes out of
    the backward): that row's input gradient, fc2's weight row and bias element for that output, and fc1's weight
    gradient are non-finite; every other row's input gradient is finite."""
    row, column = 7, 3
    leaves = make_inputs((2, 5), 32, 64, 24, torch.float32)
    with mimkernels.use_backend("triton"):
        out = mimkernels.gelu_mlp(*leaves)
    grad_out = torch.ones_like(out)
    grad_out.view(-1, 24)[row, column] = bad
    grad_x, grad_fc1_weight, _, grad_fc2_weight, grad_fc2_bias = torch.autograd.grad(out, leaves, grad_out)
    finite_rows = torch.isfinite(grad_x.reshape(-1, 32)).all(-1)
    assert not finite_rows[row] and finite_rows[torch.arange(10, device=DEVICE) != row].all()
    assert not torch.isfinite(grad_fc2_weight[column]).any() and not torch.isfinite(grad_fc2_bias[column])
    assert not torch.isfinite(grad_fc1_weight).all()


def test_empty_input():
    x, w1, b1, w2, b2 = make_inputs((0, 4), 16, 32, 8, torch.float32)
    with mimkernels.use_backend("triton"):
        out = mimkernels.gelu_mlp(x, w1, b1, w2, b2)
    assert out.shape == (0, 4, 8)
    grads = torch.autograd.grad(out.sum(), (x, w1, b1, w2, b2))
    assert grads[0].shape == x.shape and all(g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("change, error, match", [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 16, dtype=torch.int32)), TypeError, "x must be float16"),
    (dict(fc1_weight=torch.ones(32)), ValueError, "fc1_weight must be a 2-D"),
    (dict(fc1_weight=torch.ones(32, 15)), ValueError, "fc1_weight .* expects 15 input features"),
    (dict(fc2_weight=torch.ones(8, 31)), ValueError, "fc2_weight .* fc1 gives 32"),
    (dict(fc1_bias=torch.ones(31)), ValueError, "fc1_bias must be None or a tensor of shape \\(32,\\)"),
    (dict(fc2_bias=torch.ones(1, 8)), ValueError, "fc2_bias must be None or a tensor of shape \\(8,\\)"),
    (dict(fc2_weight=torch.ones(8, 32, dtype=torch.float64)), TypeError, "fc2_weight is torch.float64"),
    (dict(fc1_weight=torch.ones(32, 16, device="meta")), ValueError, "fc1_weight is on meta"),
])
def test_bad_arguments_name_themselves(change, error, match):
    args = dict(x=torch.ones(2, 16), fc1_weight=torch.ones(32, 16), fc1_bias=torch.ones(32),
                fc2_weight=torch.ones(8, 32), fc2_bias=torch.ones(8))
    args.update(change)
    with pytest.raises(error, match=match):
        mimkernels.gelu_mlp(*args.values())
