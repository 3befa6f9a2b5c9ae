"""Tensors past 2^31 elements: every offset the kernels compute must be 64-bit where it can pass 2^31.

A 32-bit overflow corrupts the samples at the end of the batch, so each check runs the op on the whole big batch
and again on its last samples alone (offsets far below 2^31), and compares those samples. On a GPU the tensors
really pass 2^31 elements (marked ``gpu``; skipped where the GPU lacks the memory); on the CPU the same checks
run on tiny shapes, so that a broken check cannot hide behind a skip.
"""
import pytest
import torch

import mimkernels

BIG = 1 << 31
TAIL = 2  # samples compared at the end of the batch


def _needs_free_gpu_memory(gib: float):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * (1 << 30):
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / (1 << 30):.0f} GiB free")


def _randn(*shape, device, dtype, grad=False):
    gen = torch.Generator(device=device).manual_seed(sum(shape))
    return torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_(grad)


def _close(got, want, dtype):
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def check_attention_tail(batch, heads, seq_len, head_dim, device, dtype):
    q, k, v = (_randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, grad=True) for _ in range(3))
    prefix = torch.randint(0, seq_len + 1, (batch,), device=device)
    out = mimkernels.prefix_causal_attention(q, k, v, prefix)
    grad_out = _randn(*out.shape, device=device, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    tail = slice(batch - TAIL, batch)
    small = [t[tail].detach().clone().requires_grad_() for t in (q, k, v)]
    out_small = mimkernels.prefix_causal_attention(*small, prefix[tail])
    grads_small = torch.autograd.grad(out_small, small, grad_out[tail])
    _close(out[tail], out_small, dtype)
    for got, want in zip(grads, grads_small):
        _close(got[tail], want, dtype)


def check_tokens_tail(batch, patches, dim, device, dtype, backend):
    x = _randn(batch, 1 + patches, dim, device=device, dtype=dtype, grad=True)
    token = _randn(1, 1, dim, device=device, dtype=dtype)
    noise = torch.rand(batch, patches, device=device)

    def mask_and_restore(x, noise):
        kept = mimkernels.random_masking(x, 0.75, noise=noise, num_prefix_tokens=1)
        return mimkernels.restore_tokens(kept.x_kept, kept.ids_restore, token, num_prefix_tokens=1)

    with mimkernels.use_backend(backend):
        out = mask_and_restore(x, noise)
        grad_out = _randn(*out.shape, device=device, dtype=dtype)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        tail = slice(batch - TAIL, batch)
        x_small = x[tail].detach().clone().requires_grad_()
        out_small = mask_and_restore(x_small, noise[tail])
        (grad_small,) = torch.autograd.grad(out_small, x_small, grad_out[tail])
    assert torch.equal(out[tail], out_small) and torch.equal(grad[tail], grad_small)  # row copies are exact


def check_patch_embed_and_loss_tail(batch, size, patch, embed, device, dtype):
    """Image and output offsets past 2^31 (full patch embedding), and the masked loss over such a batch."""
    images = _randn(batch, 3, size, size, device=device, dtype=dtype)
    weight = _randn(embed, 3, patch, patch, device=device, dtype=dtype) / (3 * patch * patch) ** 0.5
    tail = slice(batch - TAIL, batch)
    out = mimkernels.patch_embed(images, weight)
    _close(out[tail], mimkernels.patch_embed(images[tail], weight), dtype)
    del out
    patches = (size // patch) ** 2
    pred = _randn(batch, patches, 3 * patch * patch, device=device, dtype=dtype, grad=True)
    mask = torch.zeros(batch, patches, device=device)
    mask[tail] = (torch.rand(TAIL, patches, device=device) < 0.75).float()  # only the tail counts
    loss = mimkernels.masked_patch_loss(pred, images, mask)
    (grad,) = torch.autograd.grad(loss, pred)
    pred_small = pred[tail].detach().clone().requires_grad_()
    loss_small = mimkernels.masked_patch_loss(pred_small, images[tail], mask[tail])
    (grad_small,) = torch.autograd.grad(loss_small, pred_small)
    _close(loss, loss_small, torch.float32)
    _close(grad[tail], grad_small, dtype)
    assert not grad[: batch - TAIL].any()


def check_gelu_mlp_tail(rows, width, hidden, device, dtype):
    """Hidden activations past 2^31 elements (h, gelu(h) and dh are [rows, hidden]): the last rows' output and
    input gradient equal those of the op run on those rows alone."""
    x = _randn(rows, width, device=device, dtype=dtype, grad=True)
    fc1 = _randn(hidden, width, device=device, dtype=dtype) / width ** 0.5
    fc2 = _randn(width, hidden, device=device, dtype=dtype) / hidden ** 0.5
    bias = _randn(hidden, device=device, dtype=dtype)
    with mimkernels.use_backend("triton"):
        out = mimkernels.gelu_mlp(x, fc1, bias, fc2, None)
        grad_out = _randn(*out.shape, device=device, dtype=dtype)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        tail = slice(rows - TAIL, rows)
        x_small = x[tail].detach().clone().requires_grad_()
        out_small = mimkernels.gelu_mlp(x_small, fc1, bias, fc2, None)
        (grad_small,) = torch.autograd.grad(out_small, x_small, grad_out[tail])
    _close(out[tail], out_small, dtype)
    _close(grad[tail], grad_small, dtype)


# ----------------------------------------------------------------------------- tiny, on the CPU (interpreter)


def test_checks_hold_on_tiny_shapes(device):
    if device != "cpu":
        pytest.skip("the GPU runs the real sizes below")
    with mimkernels.use_backend("triton"):
        check_attention_tail(5, 2, 19, 16, device, torch.float32)
        check_patch_embed_and_loss_tail(5, 16, 8, 16, device, torch.float32)
        check_gelu_mlp_tail(70, 16, 40, device, torch.float32)
    for backend in ("triton", "extension"):
        if backend in mimkernels.available_backends():
            check_tokens_tail(5, 12, 16, device, torch.float32, backend)


# ----------------------------------------------------------------------------- past 2^31 elements, on a GPU


@pytest.mark.gpu
def test_attention_past_2_31_elements():
    shape = (1025, 16, 1024, 128)  # 2^31 + 2^21 elements per tensor, 4 GiB in bf16
    assert torch.Size(shape).numel() > BIG
    _needs_free_gpu_memory(44)  # q, k, v, out, grad_out, three grads, and the workspace
    check_attention_tail(*shape, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_tokens_past_2_31_elements(backend):
    if backend not in mimkernels.available_backends():
        pytest.skip(f"backend {backend} is not available")
    shape = (8200, 256, 1024)  # x: [B, 1 + 256, 1024] bf16, 2^31 + 6.4M elements
    assert (shape[0] * (1 + shape[1]) * shape[2]) > BIG
    _needs_free_gpu_memory(24)
    check_tokens_tail(*shape, "cuda", torch.bfloat16, backend)


@pytest.mark.gpu
def test_patch_embed_and_loss_past_2_31_elements():
    batch, size, patch, embed = 14300, 224, 16, 768  # images and the [B, 196, 768] output: > 2^31 elements each
    assert batch * 3 * size * size > BIG and batch * (size // patch) ** 2 * embed > BIG
    _needs_free_gpu_memory(30)
    check_patch_embed_and_loss_tail(batch, size, patch, embed, "cuda", torch.bfloat16)


@pytest.mark.gpu
def test_gelu_mlp_past_2_31_elements():
    rows, width, hidden = (BIG >> 12) + 1024, 1024, 4096  # h, gelu(h), dh: [rows, 4096] bf16, 2^31 + 4M elements
    assert rows * hidden > BIG
    _needs_free_gpu_memory(28)
    check_gelu_mlp_tail(rows, width, hidden, "cuda", torch.bfloat16)
