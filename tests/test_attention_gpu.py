"""Attention checks that need a GPU: bf16, compiled kernels at real sizes, torch.compile, CUDA graphs."""
import dataclasses

import pytest
import torch
from test_attention import (
    NON_FINITE_PREFIX,
    assert_leaves_within_budget,
    assert_non_finite_gradient_reaches_what_its_row_feeds,
    assert_within_budget,
    keys_sharing_a_large_part,
    make_qkv,
    outputs_and_grads,
    per_sample_prefix,
    public_op,
    reference_on_centred_keys,
    reference_op,
    rows_far_below_zero,
    triton_op,
    with_optional_kernels,
    with_per_head_backward,
    with_tails,
    with_tma,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import mimkernels
from mimkernels import reference
from mimkernels.ops import attention as attention_ops
from mimkernels.triton import attention as kernels

pytestmark = pytest.mark.gpu


def _relative_errors(shape, dtype, prefix, deterministic=True):
    """Relative errors of out, dq, dk, dv against float64; absolute where the reference is exactly 0
    (N = 1: one visible key, so dq = 0)."""
    q, k, v = (torch.randn(shape, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(shape, device="cuda").to(dtype)
    out = mimkernels.prefix_causal_attention(q, k, v, prefix, deterministic=deterministic)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = reference.prefix_causal_attention(*leaves64, prefix)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    return [((g.double() - w).norm() / (w.norm() if w.norm() > 0 else 1.0)).item()
            for g, w in zip([out, *grads], [out64, *grads64])]


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-5)],
                         ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 1, 64), (8, 12, 197, 64), (4, 16, 257, 80), (2, 12, 256, 128),
                                   (2, 3, 49, 40), (2, 2, 50, 256), (2, 2, 1025, 96), (1, 2, 300, 112)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_on_gpu(shape, dtype, tolerance):
    prefix = torch.randint(0, shape[2] + 2, (shape[0],), device="cuda")
    errors = _relative_errors(shape, dtype, prefix)
    assert max(errors) <= tolerance, errors


@pytest.mark.parametrize("shape", [(3, 4, 1, 64), (8, 12, 197, 64), (2, 12, 256, 128), (2, 2, 1025, 96)],
                         ids=lambda s: "x".join(map(str, s)))
def test_atomic_backward_matches_reference(shape, monkeypatch):
    """The atomic-dQ backward, forced on (the table enables it only where it measured faster)."""
    monkeypatch.setattr(kernels, "atomic_dq_measured_faster", lambda q: True)
    prefix = torch.randint(0, shape[2] + 2, (shape[0],), device="cuda")
    errors = _relative_errors(shape, torch.bfloat16, prefix, deterministic=False)
    assert max(errors) <= 2e-2, errors


@pytest.mark.parametrize("shape", [(3, 4, 1, 64), (8, 12, 197, 64), (4, 16, 257, 80), (2, 12, 256, 128),
                                   (2, 2, 1025, 96)], ids=lambda s: "x".join(map(str, s)))
def test_per_head_backward_matches_reference_and_repeats(shape, monkeypatch):
    """The one-program-per-head backward, forced on with each shape's dK/dV tile (the table enables it only where
    it measured faster): within the bf16 tolerance, and bit-identical on a second run (compiled, its key tiles'
    dQ read-modify-writes must see each other through the barrier between them)."""
    looked_up = kernels.configs_for_call
    monkeypatch.setattr(kernels, "configs_for_call", lambda q: with_per_head_backward(looked_up(q)))
    prefix = torch.randint(0, shape[2] + 2, (shape[0],), device="cuda")
    errors = _relative_errors(shape, torch.bfloat16, prefix)
    assert max(errors) <= 2e-2, errors
    q, k, v, grad_out = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    first, second = (torch.autograd.grad(mimkernels.prefix_causal_attention(*leaves, prefix), leaves, grad_out)
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


TMA_SHAPES = [(3, 4, 1, 64), (2, 3, 49, 40), (4, 2, 50, 64), (2, 16, 257, 80), (2, 12, 256, 128), (1, 2, 1025, 96)]
TMA_CASES = ([(shape, "contiguous", "default") for shape in TMA_SHAPES]
             + [(shape, "packed_qkv", "delta_in_dq") for shape in TMA_SHAPES]
             + [(shape, "contiguous", "atomic") for shape in TMA_SHAPES[1::3]]
             + [(shape, "packed_qkv", "per_head") for shape in TMA_SHAPES[::2]])


@pytest.mark.parametrize("shape, layout, variant", TMA_CASES, ids=str)
def test_tma_kernels_compiled_for_hopper(shape, layout, variant):
    """Every kernel through TMA tensor descriptors, compiled (the interpreter tests check them against the pointer
    path bit for bit), bf16, with the tiles this GPU's table picks for the shape and each backward variant: within
    the float64 budget of tests/test_attention.py."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA tensor descriptors need sm_90 or newer")
    q, k, v, _ = make_qkv(shape, torch.bfloat16, layout)
    assert kernels.tma_usable(q, k, v)
    configs = kernels.configs_for_call(q)
    if variant == "delta_in_dq":
        configs = with_optional_kernels(configs)
    elif variant == "per_head":
        configs = with_per_head_backward(configs)
    elif variant == "default":
        configs = dataclasses.replace(configs, backward_dq_delta=None)
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    assert_within_budget(triton_op(prefix, with_tma(configs), deterministic=variant != "atomic"), reference_op(prefix),
                         shape, torch.bfloat16, layout=layout)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("shape", [(3, 4, 1, 64), (8, 12, 197, 64), (4, 16, 257, 80), (8, 16, 65, 80),
                                   (2, 3, 49, 40)], ids=lambda s: "x".join(map(str, s)))
def test_tail_tiles_compiled(shape, tma):
    """Tail tiles (16-row query tiles past the last whole one) on this GPU's tiles for the shape, compiled, bf16, the
    delta-computing dQ too: within the float64 budget of tests/test_attention.py (the interpreter tests check
    forward and dQ bit for bit against the same tiles without tails)."""
    if tma and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA tensor descriptors need sm_90 or newer")
    q, _, _, _ = make_qkv(shape, torch.bfloat16)
    configs = with_tails(with_optional_kernels(kernels.configs_for_call(q)))
    configs = with_tma(configs) if tma else dataclasses.replace(configs, **{
        name: dataclasses.replace(getattr(configs, name), tma=False)
        for name in ("forward", "backward_dkdv", "backward_dq", "backward_dq_delta")})
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    assert_within_budget(triton_op(prefix, configs), reference_op(prefix), shape, torch.bfloat16)


def _force_backward(variant, monkeypatch):
    """Runs the ``variant`` backward (default: the table's) wherever it can run."""
    if variant == "atomic":
        monkeypatch.setattr(kernels, "atomic_dq_measured_faster", lambda q: True)
    elif variant == "per_head":
        looked_up = kernels.configs_for_call
        monkeypatch.setattr(kernels, "configs_for_call", lambda q: with_per_head_backward(looked_up(q)))
    elif variant == "stored_ds":
        monkeypatch.setattr(kernels, "STORED_DS", True)


@pytest.mark.parametrize("variant", ["default", "atomic", "per_head", "stored_ds"])
@pytest.mark.parametrize("shape", [(2, 4, 197, 64), (2, 4, 192, 128), (2, 16, 257, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rows_whose_log_sum_exp_is_far_below_zero_compiled(shape, variant, monkeypatch):
    """tests/test_attention.py's rows with every logit about -120 (log-sum-exp below -88.7, where cuDNN's backward
    gave NaN dQ at N % 128 == 64 with a mask: pytorch/pytorch#196678), compiled, bf16, this GPU's tiles for the shape
    (through TMA where the table says so), each backward forced on, per-sample prefixes and full attention: finite
    and within the float64 budget. Shapes whose kernels the other tests here compile already (N 192 runs AIM's
    tiles). The budget's bf16 reference (SDPA with a mask) must not run on cuDNN here: at N 192 it is that bug's
    case, and its NaN would fail the budget, not our kernels."""
    deterministic = variant != "atomic"
    _force_backward(variant, monkeypatch)
    for prefix in (per_sample_prefix(shape[0], shape[2], seed=shape[2]), shape[2]):
        leaves = rows_far_below_zero(shape, torch.bfloat16, seed=shape[2])
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            assert_leaves_within_budget(triton_op(prefix, deterministic=deterministic), reference_op(prefix), leaves,
                                        "contiguous", shape, torch.bfloat16)


@pytest.mark.parametrize("variant", ["default", "atomic", "per_head", "stored_ds"])
@pytest.mark.parametrize("shape", [(2, 4, 197, 64), (2, 4, 256, 128), (2, 4, 257, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_non_finite_values_propagate_compiled(shape, variant, monkeypatch):
    """Compiled (where Triton's maximum does not propagate NaN by default, ``PropagateNan.NONE``; the interpreter's
    NumPy does), bf16, this GPU's tiles, each backward forced on: a NaN in one query makes its output row NaN and
    leaves every other row finite, and an inf / NaN in one row of the output gradient (an overflowed fp16 step, which
    GradScaler must see) reaches what that row feeds (tests/test_attention.py's check)."""
    _force_backward(variant, monkeypatch)
    prefix = torch.tensor(NON_FINITE_PREFIX, device="cuda")
    op = triton_op(prefix, deterministic=variant != "atomic")
    q, k, v, _ = make_qkv(shape, torch.bfloat16)
    with torch.no_grad():
        q[1, 0, 20, 3] = float("nan")
        out = op(q, k, v)
    finite_rows = torch.isfinite(out).all(-1)
    assert out[1, 0, 20].isnan().all() and finite_rows.sum() == finite_rows.numel() - 1
    for bad in (float("inf"), float("nan")):
        assert_non_finite_gradient_reaches_what_its_row_feeds(op, shape, torch.bfloat16, bad)


@pytest.mark.parametrize("mode", [True, "dq"], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
@pytest.mark.parametrize("shape", [(2, 4, 197, 64), (2, 4, 256, 128)], ids=lambda s: "x".join(map(str, s)))
def test_centred_keys_compiled(shape, packed, mode, monkeypatch):
    """tests/test_attention.py's keys that share a large part, compiled, bf16 (which the interpreter cannot
    check), this GPU's tiles, per-sample prefixes, CENTRE_KEYS on (keys centred first, or the kernels' dQ
    correction): every output and gradient within the budget of PyTorch's bf16 error on keys that share nothing.
    Shapes whose kernels the other tests here compile."""
    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", mode)
    mask = {"prefix_len": per_sample_prefix(shape[0], shape[2], seed=shape[2])}
    leaves = keys_sharing_a_large_part(shape, torch.bfloat16, seed=shape[2])
    assert_leaves_within_budget(public_op(mask, packed), reference_on_centred_keys(mask), leaves, "contiguous",
                                shape, torch.bfloat16)


@pytest.mark.parametrize("shape", [(8, 12, 256, 128), (4, 16, 257, 80), (16, 16, 50, 64), (2, 3, 1, 64),
                                   (2, 4, 1024, 128)], ids=lambda s: "x".join(map(str, s)))
def test_stored_ds_backward_compiled(shape, monkeypatch):
    """kernels.STORED_DS with this GPU's tiles for the shape (AIM's D 128 through a dS descriptor where the dK/dV tile
    is +tma), compiled, bf16: within the float64 budget of tests/test_attention.py, and the same bits twice."""
    monkeypatch.setattr(kernels, "STORED_DS", True)
    q, k, v, leaves = make_qkv(shape, torch.bfloat16)
    if not kernels.stored_ds_tiles(q, kernels.configs_for_call(q)):  # a +splitd dK/dV tile in this GPU's table
        pytest.skip("this GPU's dK/dV tile splits the head dim here, which stores no dS")
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    assert_within_budget(triton_op(prefix), reference_op(prefix), shape, torch.bfloat16)
    first, second = (outputs_and_grads(triton_op(prefix), q, k, v, leaves) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _stored_ds_candidates():
    from mimkernels.triton.attention_tuning import CANDIDATES

    dkdv, dq = CANDIDATES["backward_dkdv_ds"], CANDIDATES["backward_dq_from_ds"]
    return [(text, dq[0]) for text in dkdv] + [(dkdv[0], text) for text in dq[1:]]


@pytest.mark.parametrize("tiles", _stored_ds_candidates(), ids="/".join)
def test_stored_ds_candidates_compiled(tiles, monkeypatch):
    """Each of the tuner's stored-dS candidates (dK/dV storing dS, dQ from dS), compiled, bf16, as a table entry would
    give them, at ViT-H N257's shape class (D 80 padded to 128; N 257: rows padded, a one-row tail): within the float64
    budget of tests/test_attention.py."""
    monkeypatch.setattr(kernels, "STORED_DS", None)
    shape = (4, 16, 257, 80)
    dkdv, dq = (kernels.TileConfig.parse(text) for text in tiles)
    configs = dataclasses.replace(kernels.configs_for(80, torch.bfloat16), backward_dkdv_ds=dkdv,
                                  backward_dq_from_ds=dq)
    prefix = per_sample_prefix(shape[0], shape[2], seed=7)
    assert_within_budget(triton_op(prefix, configs), reference_op(prefix), shape, torch.bfloat16)


@pytest.mark.parametrize("variant", ["default", "delta_in_dq"])
@pytest.mark.parametrize("tiles", [("128x32x4x4", "32x64x4x3", "64x32x4x3"), ("64x64x4x3", "64x64x4x2", "128x32x4x3"),
                                   ("128x64x8x3", "32x128x8x3", "64x64x4x3"),
                                   ("128x32x4x4+tma", "64x64x4x2+tma", "128x32x4x3+tma")], ids="/".join)
@pytest.mark.parametrize("shape", [(4, 16, 257, 80), (8, 16, 65, 80), (2, 3, 49, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_split_head_dim_compiled(shape, tiles, variant):
    """``+splitd`` forward, dK/dV and dQ (head dim as two power-of-2 column blocks) compiled, bf16, with tiles among
    the tuner's candidates (TMA ones run through pointers below sm_90): output and gradients within the float64
    budget of tests/test_attention.py."""
    forward, dkdv, dq = (kernels.TileConfig.parse(f"{tile}+splitd") for tile in tiles)
    configs = kernels.AttentionConfigs(forward, dkdv, dq, backward_dq_delta=dq if variant == "delta_in_dq" else None)
    prefix = per_sample_prefix(shape[0], shape[2], seed=shape[2])
    assert_within_budget(triton_op(prefix, configs), reference_op(prefix), shape, torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_nondeterministic_causal_routes_to_sdpa_and_full_stays(causal):
    """deterministic=False: causal attention is SDPA's call; full attention stays on our kernels (they took less GPU
    time than SDPA at the MAE shapes), whose forward is the deterministic one's."""
    q, k, v = (torch.randn(4, 16, 50, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = mimkernels.attention(q, k, v, causal=causal, deterministic=False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ours = mimkernels.attention(q, k, v, causal=causal)
    assert torch.equal(got, want if causal else ours)  # the same call, not just close
    torch.testing.assert_close(ours, want, atol=2e-2, rtol=2e-2)


def test_default_backward_is_bitwise_deterministic():
    q, k, v = (torch.randn(4, 12, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    prefix = torch.randint(1, 256, (4,), device="cuda")
    grad_out = torch.randn_like(q)
    first, second = (torch.autograd.grad(mimkernels.prefix_causal_attention(q, k, v, prefix), (q, k, v), grad_out)
                     for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_long_sequence():
    errors = _relative_errors((1, 2, 8192, 64), torch.bfloat16, torch.tensor([3000], device="cuda"))
    assert max(errors) <= 2e-2, errors


def test_many_batch_heads():
    """batch * heads = 2^20 programs along one grid axis."""
    q = torch.randn(2**14, 64, 16, 16, device="cuda", dtype=torch.float16)
    prefix = torch.randint(0, 17, (2**14,), device="cuda")
    out = mimkernels.prefix_causal_attention(q, q, q, prefix)
    rows = torch.tensor([0, 2**14 - 1], device="cuda")
    want = reference.prefix_causal_attention(q[rows].float(), q[rows].float(), q[rows].float(), prefix[rows])
    torch.testing.assert_close(out[rows].float(), want, atol=2e-3, rtol=2e-3)


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(4, 6, 197, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    prefix = torch.randint(1, 197, (4,), device="cuda")

    def step(q, k, v, prefix):
        return mimkernels.prefix_causal_attention(q, k, v, prefix).float().square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(q, k, v, prefix)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = step(q, k, v, prefix)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for g, e in zip(grads, grads_eager):
        torch.testing.assert_close(g, e)


def test_cuda_graph_capture():
    """No host sync on the fast path: forward and backward capture into a CUDA graph and replay."""
    q, k, v = (torch.randn(4, 6, 197, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    prefix = torch.randint(1, 197, (4,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        torch.autograd.grad(mimkernels.prefix_causal_attention(q, k, v, prefix).sum(), (q, k, v))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mimkernels.prefix_causal_attention(q, k, v, prefix)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    prefix.copy_(torch.tensor([0, 5, 196, 300], device="cuda"))
    graph.replay()
    want = reference.prefix_causal_attention(q.float(), k.float(), v.float(), prefix)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(g).all() for g in grads)


def test_auto_uses_triton_on_gpu():
    q = torch.randn(2, 3, 20, 32, device="cuda", dtype=torch.float16)
    out = mimkernels.prefix_causal_attention(q, q, q, 4)
    assert out.transpose(1, 2).is_contiguous() and not out.is_contiguous()
