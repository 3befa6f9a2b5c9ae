"""Every op on a GPU that is not the current one (a process that moves its model to ``cuda:1`` without
``torch.cuda.set_device(1)``): Triton launches on the current GPU unless told otherwise, so each op must switch
to its tensors' GPU (``triton.launch.launch``; the CPU test in test_launch.py checks the switch with a stand-in).
Needs two GPUs; the results must equal those computed with ``cuda:1`` current."""
import pytest
import torch

import mimkernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (runs the ops on the one not current)"),
]


def _every_op(device):
    """Outputs and input gradients of each Triton-backed op on ``device`` (fp32, fixed seed)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    results = []
    q, k, v = leaf(2, 4, 197, 64), leaf(2, 4, 197, 64), leaf(2, 4, 197, 64)
    out = mimkernels.prefix_causal_attention(q, k, v, torch.tensor([5, 100], device=device))
    results += [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    images, weight, bias = leaf(2, 3, 64, 64), leaf(32, 3, 16, 16), leaf(32)
    tokens = mimkernels.patch_embed(images, weight, bias)
    results += [tokens, *torch.autograd.grad(tokens.square().sum(), (images, weight, bias))]

    x, pos = leaf(2, 16, 32), leaf(1, 16, 32)
    noise = torch.rand(2, 16, generator=gen).to(device)
    masking = mimkernels.random_masking(x, 0.75, noise=noise, pos_embed=pos)
    restored = mimkernels.restore_tokens(masking.x_kept, masking.ids_restore, leaf(1, 1, 32))
    results += [masking.x_kept, restored, *torch.autograd.grad(restored.square().sum(), (x, pos))]

    pred = leaf(2, 16, 16 * 16 * 3)
    loss = mimkernels.masked_patch_loss(pred, images.detach(), masking.mask)
    results += [loss, *torch.autograd.grad(loss, (pred,))]

    residual, branch = leaf(2, 8, 64), leaf(2, 8, 64)
    total, normed = mimkernels.add_layer_norm(residual, branch, leaf(64), leaf(64))
    results += [total, normed, *torch.autograd.grad(normed.square().sum(), (residual, branch))]

    hidden = mimkernels.gelu_mlp(residual, leaf(128, 64), leaf(128), leaf(64, 128), leaf(64))
    results += [hidden, *torch.autograd.grad(hidden.square().sum(), (residual,))]
    return [t.detach() for t in results]


def test_every_op_runs_on_its_tensors_gpu_when_another_is_current():
    with torch.cuda.device(1):
        expected = _every_op("cuda:1")
    with torch.cuda.device(0):
        got = _every_op("cuda:1")
        torch.cuda.synchronize(1)
    for g, e in zip(got, expected):
        assert g.device == torch.device("cuda:1")
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
