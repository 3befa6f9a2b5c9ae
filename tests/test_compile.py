"""torch.compile(fullgraph=True) of whole training steps, on the CPU: every op runs as a custom op in the graph.

``aot_eager`` traces the forward and backward graphs (Dynamo + AOTAutograd, fake tensors through each op's
registered fake kernel) and runs them eagerly, so it works without a GPU; the Triton kernels run through the
interpreter. The GPU test (tests/test_attention_gpu.py) compiles with Inductor.
"""
import pytest
import torch
from conftest import HAS_GPU

import mimkernels
from mimkernels import models
from mimkernels.models import aim_tiny, mae_vit_tiny_patch8, vit
from mimkernels.ops import attention as attention_ops
from mimkernels.ops import tokens as token_ops

cpu_only = pytest.mark.skipif(HAS_GPU, reason="the CPU variant (aot_eager, interpreter); GPUs run the Inductor one")


def _loss_and_grads(model, step, *inputs):
    model.zero_grad(set_to_none=True)
    loss = step(*inputs)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


# the CPU tests' image side: 4 x 4 patches of 8, a quarter of the tiny models' 64 px, for the interpreter's sake
# (these tests check what the compiler traces; the kernels on larger shapes have their own tests)
CPU_SIDE = 32


def _model_and_step(name, device, side=64):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, side, side, device=device)
    patches = (side // 8) ** 2
    if name == "mae":
        model = mae_vit_tiny_patch8(norm_pix_loss=True, img_size=side).to(device)
        noise = torch.rand(2, patches, device=device)
        return model, lambda imgs: model(imgs, 0.75, noise=noise)[0], imgs
    if name in ("simmim", "beit", "beit_masked_head"):
        model = _mask_token_model(name, side).to(device)
        mask = model.random_mask(2, generator=torch.Generator().manual_seed(1)).to(device)
        return model, lambda imgs: model(imgs, mask=mask)[0], imgs
    model = aim_tiny(img_size=side).to(device)
    prefix = torch.tensor([1, patches * 5 // 8], device=device)
    return model, lambda imgs: model(imgs, prefix)[0], imgs


def _mask_token_model(name, side=64):
    if name == "simmim":
        return models.simmim_vit_tiny_patch8(img_size=side)
    head_on = "masked" if name == "beit_masked_head" else "all"
    return models.beit_vit_tiny_patch8(models.KMeansTokenizer(8, torch.randn(16, 8 * 8 * 3)), vocab_size=16,
                                       head_on=head_on, img_size=side)


def _compiled_matches_eager(name, device, backend, rtol, atol, dynamic=None):
    model, step, imgs = _model_and_step(name, device, CPU_SIDE if device == "cpu" else 64)
    with mimkernels.use_backend("triton"):
        eager = _loss_and_grads(model, step, imgs)
        compiled = _loss_and_grads(model, torch.compile(step, fullgraph=True, backend=backend, dynamic=dynamic), imgs)
    assert len(compiled) == len(eager) > 10
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# the selectable fused paths, off by default until a GPU measures them faster: name -> (module, switch)
SWITCHES = {"FUSED_ADD_NORM": (vit, "FUSED_ADD_NORM"), "FUSED_GELU_MLP": (vit, "FUSED_GELU_MLP"),
            "FUSED_TOKEN_BACKWARD": (token_ops, "FUSED_BACKWARD")}
# and the keys centred before attention (its bf16 GPU test: tests/test_attention_gpu.py)
SELECTABLE = {**SWITCHES, "CENTRE_KEYS": (attention_ops, "CENTRE_KEYS")}


@cpu_only
@pytest.mark.parametrize("centre_keys", [True, "dq"], ids=str)
@pytest.mark.parametrize("name", ["mae", "aim"])
def test_fused_switches_compile_fullgraph(name, centre_keys, monkeypatch):
    """Every selectable path on (the add + LayerNorm across blocks, the MLP's GELU inside its GEMMs, the token ops'
    one-pass backwards, keys centred before attention or their shared part taken out of dQ in the kernels): the step
    traces with no graph break and matches eager."""
    for module, switch in SELECTABLE.values():
        monkeypatch.setattr(module, switch, centre_keys if switch == "CENTRE_KEYS" else True)
    _compiled_matches_eager(name, "cpu", "aot_eager", rtol=1e-4, atol=1e-5)


@cpu_only
@pytest.mark.parametrize("name", ["mae", "aim", "simmim", "beit", "beit_masked_head"])
def test_training_step_compiles_fullgraph_and_matches_eager(name):
    """aot_eager: the same kernels and the same ATen ops in the same order, so equal to rounding."""
    _compiled_matches_eager(name, "cpu", "aot_eager", rtol=1e-5, atol=1e-6)


@cpu_only
@pytest.mark.parametrize("name", ["simmim", "beit", "beit_masked_head"])
def test_forward_that_draws_its_own_masks_compiles_fullgraph(name):
    """No mask given: the model draws one (BEiT's block-wise mask in Python, a custom op to the compiler), from
    torch's default generator in eager and compiled runs alike, so the same seed gives the same loss and
    gradients; a new batch size recompiles with a symbolic batch."""
    torch.manual_seed(0)
    model = _mask_token_model(name, CPU_SIDE)
    step = lambda imgs: model(imgs)[0]  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with mimkernels.use_backend("triton"):
        for batch in (2, 3):
            imgs = torch.randn(batch, 3, CPU_SIDE, CPU_SIDE)
            torch.manual_seed(batch)
            eager = _loss_and_grads(model, step, imgs)
            torch.manual_seed(batch)
            got = _loss_and_grads(model, compiled, imgs)
            for one, want in zip(got, eager):
                torch.testing.assert_close(one, want, rtol=1e-5, atol=1e-6)


def _every_op(x, qkv, images, weight, bias, pred, mask, noise, fc1, fc2, prefix, mask_ratio=0.5, scale=None):
    """A loss through every public op (their checks run on the sizes torch.compile hands them)."""
    batch, _, width = x.shape
    masking = mimkernels.random_masking(x, mask_ratio, noise=noise, num_prefix_tokens=1)
    restored = mimkernels.restore_tokens(masking.x_kept, masking.ids_restore, bias[:width].view(1, 1, -1),
                                         num_prefix_tokens=1)
    gathered = mimkernels.gather_tokens(x[:, 1:], masking.ids_keep)
    total, normed = mimkernels.add_layer_norm(restored, x, bias[:width], bias[:width])
    hidden = mimkernels.gelu_mlp(normed, fc1, None, fc2, bias[:width])
    q, k, v = qkv.unbind(2)
    heads = (mimkernels.qkv_attention(qkv, causal=True, prefix_len=prefix), mimkernels.attention(q, k, v, scale=scale),
             mimkernels.prefix_causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prefix))
    tokens = mimkernels.patch_embed(images, weight, bias, ids_keep=masking.ids_keep)
    loss = mimkernels.masked_patch_loss(pred, images, mask)
    return (loss + gathered.square().mean() + total.mean() + hidden.square().mean() + tokens.square().mean()
            + sum(h.square().mean() for h in heads))


def _every_op_inputs(batch, seq_len, side):
    gen = torch.Generator().manual_seed(batch * seq_len + side)
    patches = (side // 8) ** 2

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    images = leaf(batch, 3, side, side)  # its gradient: the patch embedding's and the loss target's
    mask = (torch.rand(batch, patches, generator=gen) < 0.5).float()
    noise = torch.rand(batch, patches, generator=gen)
    prefix = torch.randint(0, seq_len, (batch,), generator=gen)
    return (leaf(batch, 1 + patches, 16), leaf(batch, seq_len, 3, 2, 16), images, leaf(24, 3, 8, 8), leaf(24),
            leaf(batch, patches, 192), mask, noise, leaf(32, 16), leaf(16, 32), prefix)



# each public op that runs kernels, alone, on _every_op_inputs
_KERNEL_OPS = {
    "random_masking": lambda x, noise, **_: mimkernels.random_masking(x, 0.5, noise=noise, num_prefix_tokens=1).x_kept,
    "gather_tokens": lambda x, noise, **_: mimkernels.gather_tokens(x, noise.argsort(1)[:, :2]),
    "restore_tokens": lambda x, noise, **_: mimkernels.restore_tokens(x[:, 1:], noise.argsort(1), x[:1, :1]),
    "add_layer_norm": lambda x, **_: mimkernels.add_layer_norm(x, x)[1],
    "gelu_mlp": lambda x, fc1, fc2, **_: mimkernels.gelu_mlp(x, fc1, None, fc2, None),
    "attention": lambda qkv, **_: mimkernels.attention(*qkv.unbind(2)),
    "qkv_attention": lambda qkv, **_: mimkernels.qkv_attention(qkv, causal=True),
    "prefix_causal_attention": lambda qkv, prefix, **_: mimkernels.prefix_causal_attention(
        *(t.transpose(1, 2) for t in qkv.unbind(2)), prefix),
    "patch_embed": lambda images, weight, bias, **_: mimkernels.patch_embed(images, weight, bias),
    "masked_patch_loss": lambda pred, images, mask, **_: mimkernels.masked_patch_loss(pred, images, mask),
}


@pytest.mark.parametrize("op", _KERNEL_OPS)
def test_ops_refuse_torch_jit_trace(op):
    """torch.jit.trace records no Triton launch (a traced graph would return the kernels' unfilled outputs) and hands
    the ops their sizes as tensors, which full attention took for a per-sample prefix (an IndexError on the torch
    backend, an out-of-bounds read on the Triton one). Each op now refuses, saying what records it instead, on
    every backend."""
    names = ("x", "qkv", "images", "weight", "bias", "pred", "mask", "noise", "fc1", "fc2", "prefix")
    inputs = dict(zip(names, _every_op_inputs(2, 9, 16)))
    for backend in ("torch", "triton", "auto"):
        with mimkernels.use_backend(backend), \
                pytest.raises(RuntimeError, match=r"cannot be recorded by torch.jit.trace .* torch.export.export"):
            torch.jit.trace(lambda *args: _KERNEL_OPS[op](**dict(zip(names, args))), tuple(inputs.values()),
                            check_trace=False)


@pytest.mark.parametrize("name", ["mae", "aim"])
def test_models_export_for_inference_and_reload(name, tmp_path):
    """``torch.export`` of a model's forward (for inference, or to hand its encoder on): the kernels stay in the
    exported graph as ``mimkernels::`` custom ops (not the PyTorch reference), the batch can stay symbolic, and a
    program saved and loaded again (after ``import mimkernels``, which registers the ops) gives eager's outputs on
    a batch size it was not traced with. Training through an exported program is not supported: torch.export
    keeps the forward of an ``autograd.Function`` and drops its backward (README, torch.compile)."""
    device = "cuda" if HAS_GPU else "cpu"
    torch.manual_seed(0)
    if name == "mae":
        model, extra = mae_vit_tiny_patch8(norm_pix_loss=True), lambda batch: (0.75, torch.rand(batch, 64))
        dynamic = ({0: "batch"}, None, {0: "batch"})
    else:
        model, extra = aim_tiny(), lambda batch: (torch.arange(batch) * 13 % 64,)
        dynamic = ({0: "batch"}, {0: "batch"})
    model = model.to(device).eval()

    def inputs(batch):
        return tuple(t.to(device) if isinstance(t, torch.Tensor) else t
                     for t in (torch.randn(batch, 3, 64, 64), *extra(batch)))

    batch_dim = torch.export.Dim("batch", min=2, max=64)
    dynamic = tuple(d and {0: batch_dim} for d in dynamic)
    with mimkernels.use_backend("triton"):
        program = torch.export.export(model, inputs(2), dynamic_shapes=dynamic)
        kept = {str(node.target) for node in program.graph.nodes if str(node.target).startswith("mimkernels.")}
        assert {"mimkernels.attention_forward.default", "mimkernels.triton_patch_embed.default",
                "mimkernels.triton_masked_patch_loss.default"} <= kept
        torch.export.save(program, tmp_path / "model.pt2")
        reloaded = torch.export.load(tmp_path / "model.pt2").module()
        args = inputs(3)
        with torch.no_grad():
            got, want = reloaded(*args), model(*args)
    assert len(got) == len(want) == (3 if name == "mae" else 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@cpu_only
def test_every_op_compiles_with_symbolic_sizes():
    """``torch.compile(dynamic=True)`` makes every size symbolic (head dim, channels, patch rows too): the ops' checks
    must trace them (``x in range(...)`` and ``math.isqrt`` of a symbolic size did not), and the graph, run on two
    sets of sizes, matches eager. The default (``dynamic=None``) makes symbolic only the sizes that changed between
    calls, a subset of these. The mask ratio changes too: a symbolic float, whose kept count reached the patch
    embedding's autograd.Function as a size Dynamo could not lift (an AssertionError, "Source of TruncToInt(...) is
    None"); the default compile made it symbolic as soon as a second ratio came. So is an attention scale, as a
    module's float attribute is (timm's ``Attention.scale``), whose finiteness check (``math.isfinite``) Dynamo could
    not trace: a patched timm ViT failed to compile with ``dynamic=True``."""
    compiled = torch.compile(_every_op, fullgraph=True, backend="aot_eager", dynamic=True)
    with mimkernels.use_backend("triton"):
        for sizes, mask_ratio, scale in (((2, 9, 16), 0.5, 0.3), ((3, 17, 24), 0.25, 0.2)):
            inputs = _every_op_inputs(*sizes)
            leaves = [t for t in inputs if t.requires_grad]
            want = _every_op(*inputs, mask_ratio, scale)
            want_grads = torch.autograd.grad(want, leaves)
            got = compiled(*inputs, mask_ratio, scale)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for g, w in zip(torch.autograd.grad(got, leaves), want_grads):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


class _Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_dynamo_cannot_pass_sizes_from_symbolic_floats_into_autograd_functions():
    """A limit of torch.compile itself (torch 2.11 and 2.15), not of mimkernels: under ``dynamic=True`` a float
    argument is symbolic, and a size computed from it (``int(L * (1 - mask_ratio))``, as the official MAE's
    random_masking computes its kept count) cannot reach any autograd.Function: Dynamo raises an AssertionError
    ("Source of TruncToInt(...) is None when lifting it to input of top-level"). mimkernels' own masking specialises
    the count (ops/tokens.kept_count); code that computes it itself, as the official MAE model patched by
    ``integrations.apply`` does, compiles with ``torch._dynamo.config.specialize_float = True`` (as here) or without
    ``dynamic=True``. When this test fails, a torch release has lifted the limit: drop the workaround from the
    README."""

    def kept_doubled(x, mask_ratio):
        return _Doubled.apply(x[:, :int(x.shape[1] * (1 - mask_ratio))]).sum()

    x = torch.randn(2, 16, requires_grad=True)
    with pytest.raises(Exception, match=r"Source of .*TruncToInt.* is None"):
        torch.compile(kept_doubled, fullgraph=True, backend="aot_eager", dynamic=True)(x, 0.75)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(kept_doubled, fullgraph=True, backend="aot_eager", dynamic=True)
        for mask_ratio in (0.75, 0.5):
            assert compiled(x, mask_ratio).item() == pytest.approx(kept_doubled(x, mask_ratio).item())


@cpu_only
@pytest.mark.parametrize("op", ["attention", "add_layer_norm"])
def test_one_tensor_passed_twice_compiles(op):
    """``attention(x, x, x)``, ``add_layer_norm(x, x)``: Dynamo refuses an autograd.Function given one tensor twice,
    so the ops hand it views (ops/_autograd.py: distinct); the gradient reaches x from every use."""
    x = torch.randn(2, 2, 9, 16, requires_grad=True)

    def loss(x):
        if op == "attention":
            return mimkernels.attention(x, x, x, causal=True).square().sum()
        total, normed = mimkernels.add_layer_norm(x, x)
        return (total * normed).sum()

    with mimkernels.use_backend("triton"):
        eager = loss(x), torch.autograd.grad(loss(x), x)[0]
        compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
        compiled = compiled_loss(x), torch.autograd.grad(compiled_loss(x), x)[0]
    with mimkernels.use_backend("torch"):
        want = torch.autograd.grad(loss(x), x)[0]
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager[1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mae", "aim", "simmim", "beit", "beit_masked_head"])
def test_training_step_compiles_with_inductor_on_gpu(name):
    """Inductor fuses the ops around ours (fp32 here): equal to eager within fp32 reassociation."""
    _compiled_matches_eager(name, "cuda", "inductor", rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mae", "aim"])
def test_whole_training_step_captures_in_a_cuda_graph(name):
    """Forward, backward and an SGD step captured once and replayed: the same losses and weights as eager steps
    from the same start (no host sync, no allocation outside the graph's pool, no launch that capture rejects)."""
    model, step, imgs = _model_and_step(name, "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train_step():
        optimizer.zero_grad(set_to_none=False)  # the grads stay the graph's own tensors
        loss = step(imgs)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile every kernel and create the grads before capture
        for _ in range(2):
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step()
    model.load_state_dict(start)  # capture ran nothing, but be explicit about where both runs begin
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(static_loss.clone())
    after_graph = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(start)
    eager = [train_step().detach() for _ in range(3)]
    for got, want in zip(replayed, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(after_graph, model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("compile_backend", [None, "inductor"], ids=["eager", "inductor"])
@pytest.mark.parametrize("name", ["mae", "aim"])
def test_fused_switches_train_as_the_unfused_model_on_gpu(name, compile_backend, switch, monkeypatch):
    """models.vit.FUSED_ADD_NORM (the bf16 branch gradients written by the add + LayerNorm kernel), FUSED_GELU_MLP
    (the bf16 GEMMs with the GELU epilogues) or ops.tokens.FUSED_BACKWARD (MAE's decoder input, its gradients in
    one pass) under bf16 autocast on the GPU, eager and under Inductor: the loss and every gradient of the unfused
    eager model, within bf16 rounding (each gradient's error norm at most 3% of its norm)."""
    module, attribute = SWITCHES[switch]

    def loss_and_grads(fused, backend):
        monkeypatch.setattr(module, attribute, fused)
        model, step, imgs = _model_and_step(name, "cuda")
        if backend:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend=backend)
        with mimkernels.use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(imgs)
        loss.backward()
        return loss.detach().float(), [p.grad.float() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(False, None)
    loss_fused, grads_fused = loss_and_grads(True, compile_backend)
    assert len(grads_fused) == len(grads) > 10
    torch.testing.assert_close(loss_fused, loss, rtol=1e-2, atol=1e-3)
    for index, (got, want) in enumerate(zip(grads_fused, grads)):
        assert (got - want).norm() <= 0.03 * want.norm() + 1e-6, index


def _opcheck_cases():
    from mimkernels.triton import losses, mlp, patch_embed, tokens

    x, pos = torch.randn(2, 7, 16), torch.randn(1, 7, 16)
    ids_keep = torch.tensor([[3, 0], [5, 2]])
    ids_restore = torch.stack([torch.randperm(6) for _ in range(2)])
    images, weight = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 8, 8)
    pred, mask = torch.randn(2, 4, 192), torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]])
    return {
        "gather_rows": (tokens.gather_rows, (x, ids_keep, pos, 1)),
        "restore_rows": (tokens.restore_rows, (x[:, :3], ids_restore, torch.randn(16), pos, 1)),
        "rows_backward_scatter": (tokens.rows_backward, (x, ids_restore, 1, 2, True, True, True)),
        "rows_backward_gather": (tokens.rows_backward, (x[:, :3], ids_restore, 1, 2, False, True, False)),
        "patch_embed": (patch_embed.forward, (images, weight, torch.randn(8), torch.randn(1, 4, 8),
                                              torch.tensor([[1, 3], [0, 2]]), None, None)),
        "patch_embed_weight_grad": (patch_embed.weight_grad, (images, torch.randn(2, 4, 8), None, [8, 3, 8, 8])),
        "masked_patch_loss": (losses.masked_patch_loss, (pred, images, mask, 8, True, False)),
        "masked_patch_loss_backward": (losses.masked_patch_loss_backward,
                                       (pred, images, mask, torch.tensor([0.25]), 8, True, False)),
        "linear_gelu": (mlp.linear_gelu, (torch.randn(5, 16), torch.randn(24, 16), torch.randn(24))),
        "matmul_gelu_grad": (mlp.matmul_gelu_grad, (torch.randn(5, 16), torch.randn(16, 24), torch.randn(5, 24))),
    }


@cpu_only
@pytest.mark.parametrize("name", ["gather_rows", "restore_rows", "rows_backward_scatter", "rows_backward_gather",
                                  "patch_embed", "patch_embed_weight_grad",
                                  "masked_patch_loss", "masked_patch_loss_backward", "linear_gelu",
                                  "matmul_gelu_grad"])
def test_kernel_custom_ops_pass_opcheck(name):
    """Schema, fake kernel (shapes, dtypes, strides) and dispatch of each launcher torch.compile sees."""
    launcher, args = _opcheck_cases()[name]
    torch.library.opcheck(launcher.custom_op, args)
