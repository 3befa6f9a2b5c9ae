"""Host time per call of each public op, and of a whole training step of MAE ViT-L's and AIM-600M's depth, measured
without a GPU (pytest-benchmark; nothing is asserted).

    python -m pytest benchmarks/test_host_overhead.py --benchmark-only -p no:cacheprovider

What is timed: mimkernels' own host work (validation, backend choice, autograd, tile lookup, allocation, launch
bookkeeping) on tiny CPU tensors, with Triton's launch replaced by a stub: ``JITFunction.run`` hands back a fake
compiled kernel whose launch does nothing, so the fast launch path (mimkernels/triton/launch.py) is exercised
as on a GPU. Not timed: Triton's own launch through ``kernel[grid]`` (about 0.1 ms per launch on the H200
machine, benchmarks/results/nvidia-h200/*run5*) and the kernels. SDPA on the same tiny tensors is the point of
comparison (its figure includes its small CPU compute). The token ops check their indices on CPU tensors, which
CUDA tensors skip by default: their figures here include that check. Figures go to benchmarks/NOTES.md.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("times the host path of compiled kernels: unset TRITON_INTERPRET", allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import mimkernels  # noqa: E402
from mimkernels import _backend  # noqa: E402
from mimkernels.triton import launch  # noqa: E402


class _NoLaunch:
    """What the stubbed Triton hands back: a 'compiled kernel' whose launches do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture(autouse=True)
def stubbed_launches(monkeypatch):
    monkeypatch.setattr(JITFunction, "run", lambda self, *args, grid, warmup, **kwargs: _NoLaunch())
    monkeypatch.setattr(launch, "_COMPILED", {})
    why_not = _backend._why_not
    monkeypatch.setattr(_backend, "_why_not", lambda name, device: None if name == "triton" else why_not(name, device))
    with mimkernels.use_backend("triton"):
        yield


@pytest.fixture(params=[True, False], ids=["fast_launch", "triton_launch"])
def launch_path(request, monkeypatch):
    monkeypatch.setattr(launch, "_ENABLED", request.param)


def _qkv(batch=2, heads=4, seq_len=50, head_dim=64):
    return [torch.randn(batch, heads, seq_len, head_dim, requires_grad=True) for _ in range(3)]


def _fwd_bwd(fn, leaves):
    out = fn()
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(fn(), leaves, grad)


def test_prefix_causal_attention_forward(benchmark, launch_path):
    q, k, v = _qkv()
    prefix = torch.tensor([3, 40])
    with torch.no_grad():
        benchmark(mimkernels.prefix_causal_attention, q, k, v, prefix)


def test_prefix_causal_attention_fwd_bwd(benchmark, launch_path):
    q, k, v = _qkv()
    prefix = torch.tensor([3, 40])
    benchmark(_fwd_bwd(lambda: mimkernels.prefix_causal_attention(q, k, v, prefix), [q, k, v]))


class _NothingToDo(torch.autograd.Function):
    """The attention op's autograd.Function with nothing inside: the same arguments, the same tensors saved, its
    outputs allocated, no check, no launch."""

    @staticmethod
    def forward(ctx, q, k, v, prefix, prefix_int, scale, deterministic):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
        ctx.prefix_int, ctx.scale, ctx.deterministic = prefix_int, scale, deterministic
        ctx.save_for_backward(q, k, v, out, lse, prefix)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None, None, None


def test_empty_autograd_function_fwd_bwd(benchmark):
    """What the op pays before doing anything: its autograd.Function and the engine (prefix_causal_attention's
    fwd+bwd = this + its launchers, below + its argument checks and backend choice)."""
    q, k, v = _qkv()
    prefix = torch.tensor([3, 40])
    benchmark(_fwd_bwd(lambda: _NothingToDo.apply(q, k, v, prefix, 0, 0.125, True), [q, k, v]))


def test_attention_forward_launcher(benchmark):
    """The forward's launcher alone (allocation, tile lookup, launch arguments, the fast launch path)."""
    from mimkernels.triton import attention as kernels

    q, k, v = (t.detach() for t in _qkv())
    benchmark(kernels.forward, q, k, v, torch.tensor([3, 40]), 0.125)


@pytest.mark.parametrize("variant", ["three_launches", "per_head", "stored_ds"])
def test_attention_backward_launchers(benchmark, variant):
    """The backward's launchers alone: the CPU's portable configs (row-dot pre-pass, dK/dV, dQ: three launches), the
    one-launch per-head backward, or the stored-dS one (row dot, dK/dV storing dS into a buffer it allocates, dQ from
    dS; both where the tile table picks them)."""
    from dataclasses import replace

    from mimkernels.triton import attention as kernels

    q, k, v = (t.detach() for t in _qkv())
    prefix = torch.tensor([3, 40])
    configs = kernels.configs_for(q.shape[-1], q.dtype)
    if variant == "per_head":
        configs = replace(configs, backward_per_head=configs.backward_dkdv)
    if variant == "stored_ds":
        configs = replace(configs, backward_dkdv_ds=configs.backward_dkdv, backward_dq_from_ds=configs.backward_dq)
    out, lse = kernels.forward(q, k, v, prefix, 0.125)
    benchmark(kernels.backward, torch.ones_like(out), q, k, v, out, lse, prefix, 0.125, configs)


def test_full_attention_fwd_bwd(benchmark):
    q, k, v = _qkv()
    benchmark(_fwd_bwd(lambda: mimkernels.attention(q, k, v), [q, k, v]))


def test_sdpa_fwd_bwd_reference(benchmark):
    """PyTorch's SDPA on the same tiny tensors (its C++ dispatch plus a little CPU math)."""
    q, k, v = _qkv(seq_len=8, head_dim=16)
    benchmark(_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v]))


def test_random_masking_forward(benchmark):
    x, pos = torch.randn(2, 50, 64), torch.randn(1, 50, 64)
    with torch.no_grad():
        benchmark(mimkernels.random_masking, x, 0.75, num_prefix_tokens=1, pos_embed=pos)


def test_restore_tokens_fwd_bwd(benchmark):
    kept = torch.randn(2, 13, 64, requires_grad=True)
    ids_restore = torch.stack([torch.randperm(49) for _ in range(2)])
    token = torch.zeros(1, 1, 64, requires_grad=True)
    benchmark(_fwd_bwd(lambda: mimkernels.restore_tokens(kept, ids_restore, token, num_prefix_tokens=1),
                       [kept, token]))


def test_patch_embed_fwd_bwd(benchmark):
    images = torch.randn(2, 3, 64, 64)
    weight = torch.randn(64, 3, 16, 16, requires_grad=True)
    bias = torch.zeros(64, requires_grad=True)
    ids_keep = torch.stack([torch.randperm(16)[:4] for _ in range(2)])
    benchmark(_fwd_bwd(lambda: mimkernels.patch_embed(images, weight, bias, ids_keep=ids_keep), [weight, bias]))


def test_masked_patch_loss_fwd_bwd(benchmark):
    images = torch.randn(2, 3, 64, 64)
    pred = torch.randn(2, 16, 768, requires_grad=True)
    mask = (torch.rand(2, 16) < 0.75).float()
    benchmark(_fwd_bwd(lambda: mimkernels.masked_patch_loss(pred, images, mask), [pred]))


@pytest.mark.parametrize("centre_keys", [False, True, "dq"], ids=["keys", "centred_keys", "centred_dq"])
def test_qkv_attention_fwd_bwd(benchmark, centre_keys, monkeypatch):
    """centred_keys: with ops.attention.CENTRE_KEYS on (the key mean's ATen ops before the forward, the subtraction
    again in the backward); centred_dq: with CENTRE_KEYS "dq" (no ATen ops: one more constexpr to the kernels)."""
    from mimkernels.ops import attention as attention_ops

    monkeypatch.setattr(attention_ops, "CENTRE_KEYS", centre_keys)
    qkv = torch.randn(2, 50, 3, 4, 64, requires_grad=True)
    prefix = torch.tensor([3, 40])
    benchmark(_fwd_bwd(lambda: mimkernels.qkv_attention(qkv, prefix_len=prefix), [qkv]))


def test_add_layer_norm_fwd_bwd(benchmark):
    x, branch = torch.randn(2, 50, 64, requires_grad=True), torch.randn(2, 50, 64, requires_grad=True)
    weight, bias = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)

    def forward():
        total, normed = mimkernels.add_layer_norm(x, branch, weight, bias)
        return total + normed

    benchmark(_fwd_bwd(forward, [x, branch, weight, bias]))


def test_add_then_layer_norm_reference(benchmark):
    """The unfused ops it replaces (an add, then F.layer_norm), on the same tiny tensors."""
    x, branch = torch.randn(2, 50, 64, requires_grad=True), torch.randn(2, 50, 64, requires_grad=True)
    weight, bias = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)

    def forward():
        total = x + branch
        return total + F.layer_norm(total, (64,), weight, bias)

    benchmark(_fwd_bwd(forward, [x, branch, weight, bias]))


def _mlp_leaves(rows=100, width=64, hidden=256):
    return [torch.randn(rows, width, requires_grad=True), torch.randn(hidden, width, requires_grad=True),
            torch.randn(hidden, requires_grad=True), torch.randn(width, hidden, requires_grad=True),
            torch.randn(width, requires_grad=True)]


def test_gelu_mlp_fwd_bwd(benchmark):
    """Includes the four GEMMs that stay PyTorch's (fc2 forward, three in the backward), computed on the CPU."""
    leaves = _mlp_leaves()
    benchmark(_fwd_bwd(lambda: mimkernels.gelu_mlp(*leaves), leaves))


def test_linear_gelu_linear_reference(benchmark):
    """The unfused MLP on the same tensors: all six GEMMs and GELU computed on the CPU."""
    leaves = _mlp_leaves()
    benchmark(_fwd_bwd(lambda: mimkernels.reference.gelu_mlp(*leaves), leaves))


def _deep_narrow_model(family: str):
    """MAE ViT-L's depth (24 encoder + 8 decoder blocks) or AIM-600M's (24 trunk + 12 head blocks) at width 32 (two
    16-wide heads), one 224 px image: the op count, and so the host work, of the real model, with almost no CPU
    compute left in it."""
    from mimkernels.models.aim import AIM
    from mimkernels.models.mae import _LN, MAE

    torch.manual_seed(0)
    if family == "mae":
        return MAE(patch_size=16, embed_dim=32, depth=24, num_heads=2, decoder_embed_dim=32, decoder_depth=8,
                   decoder_num_heads=2, mlp_ratio=4, norm_layer=_LN, norm_pix_loss=True)
    return AIM(embed_dim=32, depth=24, num_heads=2, head_depth=12, head_embed_dim=32)


@pytest.mark.parametrize("provider", ["mimkernels", "official"])
@pytest.mark.parametrize("family", ["mae", "aim"])
def test_training_step_host_time(benchmark, family, provider):
    """A whole training step's host work, forward and backward (no optimizer: the same for both): ours (launches
    stubbed) against the official code path on the same model (benchmarks/official.py: timm-style blocks with SDPA
    for MAE, ml-aim's dense mask for AIM; ATen on the CPU, whose kernels here compute a 32-wide model). Where a
    GPU's step takes less than this, the step is bound by its host."""
    from benchmarks import official

    model = _deep_narrow_model(family)
    imgs = torch.randn(1, 3, 224, 224)
    if family == "mae":
        noise = torch.rand(1, model.patch_embed.num_patches)
        loss_fn = {"mimkernels": lambda: model(imgs, 0.75, noise=noise)[0],
                   "official": lambda: official.mae_forward(model, imgs, 0.75, noise)[0]}[provider]
    else:
        prefix = torch.tensor([model.num_patches // 2])
        loss_fn = {"mimkernels": lambda: model(imgs, prefix)[0],
                   "official": lambda: official.aim_forward(model, imgs, prefix)[0]}[provider]
    parameters = [p for p in model.parameters() if p.requires_grad]
    benchmark(lambda: torch.autograd.grad(loss_fn(), parameters, allow_unused=True))
