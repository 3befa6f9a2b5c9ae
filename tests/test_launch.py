"""The fast launch path's bookkeeping (the Triton launch itself is exercised by every GPU test)."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkernels.triton import launch as fast

ROOT = Path(__file__).resolve().parents[1]


class FakeKernel:
    """Stands for a JITFunction: records launches through Triton and hands out a fake compiled kernel."""
    arg_names = ["X", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.jit_launches, self.direct_launches = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_launches.append((grid, args, kwargs))
            return FakeCompiled(self)
        return run


class FakeCompiled:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args: self.kernel.direct_launches.append((grid, args))


def test_same_key_launches_the_compiled_kernel_directly(monkeypatch):
    monkeypatch.setattr(fast, "_ENABLED", True)
    monkeypatch.setattr(fast, "_COMPILED", {})
    kernel, x = FakeKernel(), torch.zeros(64)
    constexprs = {"BLOCK": 32, "FLAG": True}
    y = torch.zeros(64)  # another tensor of the same dtype and alignment
    for tensor, grid in ((x, (4,)), (y, (8,)), (x, (2,))):
        fast.launch(kernel, grid, (tensor,), (48, 0.5), constexprs, num_warps=4, num_stages=2)
    assert len(kernel.jit_launches) == 1
    assert kernel.jit_launches[0][2] == {"BLOCK": 32, "FLAG": True, "num_warps": 4, "num_stages": 2,
                                         "enable_fp_fusion": True}
    assert kernel.direct_launches == [((8, 1, 1), (y, 48, 0.5, 32, True)), ((2, 1, 1), (x, 48, 0.5, 32, True))]


def test_what_triton_specialises_on_changes_the_key(monkeypatch):
    monkeypatch.setattr(fast, "_ENABLED", True)
    monkeypatch.setattr(fast, "_COMPILED", {})
    kernel, x = FakeKernel(), torch.zeros(64)
    cases = [((x, 48, 0.5), {"BLOCK": 32, "FLAG": True}, 4),
             ((x, 64, 0.5), {"BLOCK": 32, "FLAG": True}, 4),  # any other value (Triton's rules aside)
             ((x, 1, 0.5), {"BLOCK": 32, "FLAG": True}, 4),  # n == 1
             ((x, 2**40, 0.5), {"BLOCK": 32, "FLAG": True}, 4),  # 64-bit n
             ((x, 48, 0.25), {"BLOCK": 32, "FLAG": True}, 4),  # a float
             ((x[1:], 48, 0.5), {"BLOCK": 32, "FLAG": True}, 4),  # pointer not 16-byte aligned
             ((x.half(), 48, 0.5), {"BLOCK": 32, "FLAG": True}, 4),  # dtype
             ((x, 48, 0.5), {"BLOCK": 64, "FLAG": True}, 4),  # constexpr
             ((x, 48, 0.5), {"BLOCK": 32, "FLAG": True}, 8)]  # warps
    for args, constexprs, warps in cases:
        fast.launch(kernel, (1,), args[:1], args[1:], constexprs, num_warps=warps, num_stages=2)
    assert len(kernel.jit_launches) == len(cases) and not kernel.direct_launches


def test_tensor_descriptors_are_keyed_by_dtype_and_block_shape(monkeypatch):
    """A TMA descriptor specialises on its dtype and block shape; its address, shape and strides are passed at
    every launch (so a new tensor of the same kind reuses the compiled kernel)."""
    monkeypatch.setattr(fast, "_ENABLED", True)
    monkeypatch.setattr(fast, "_COMPILED", {})
    kernel, constexprs = FakeKernel(), {"BLOCK": 32, "FLAG": True}
    x, y = torch.zeros(4, 64), torch.zeros(8, 64)
    cases = [fast.TensorDescriptor.from_tensor(x, [2, 64]), fast.TensorDescriptor.from_tensor(y, [2, 64]),
             fast.TensorDescriptor.from_tensor(x, [4, 64]), fast.TensorDescriptor.from_tensor(x.half(), [2, 64])]
    for desc in cases:
        fast.launch(kernel, (1,), (desc,), (48, 0.5), constexprs, num_warps=4, num_stages=2)
    assert len(kernel.jit_launches) == 3  # the second reused the first's kernel
    assert kernel.direct_launches == [((1, 1, 1), (cases[1], 48, 0.5, 32, True))]


def test_disabled_always_goes_through_triton(monkeypatch):
    monkeypatch.setattr(fast, "_ENABLED", False)
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(3):
        fast.launch(kernel, (1,), (x,), (48, 0.5), {"BLOCK": 32, "FLAG": True}, num_warps=4, num_stages=2)
    assert len(kernel.jit_launches) == 3 and not kernel.direct_launches


@pytest.mark.parametrize("enabled", [True, False])
def test_launches_on_the_tensors_gpu_whichever_is_current(monkeypatch, enabled):
    """Triton launches on the current GPU; tensors on another one must switch to theirs for the launch and back
    after it. A stand-in for two GPUs (the test machines have at most one; test_attention_gpu runs it for real
    where there are two): the tensors report GPU 1, GPU 0 is current, and the fake kernel records which GPU is
    current when it runs."""
    current = [0]

    @contextlib.contextmanager
    def switch_to(index):
        before, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(fast, "_ENABLED", enabled)
    monkeypatch.setattr(fast, "_COMPILED", {})
    monkeypatch.setattr(fast, "_device_of", lambda t: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", switch_to)
    seen = []

    class RecordingKernel(FakeKernel):
        def __getitem__(self, grid):
            seen.append(current[0])
            return super().__getitem__(grid)

    class RecordingCompiled(FakeCompiled):
        def __getitem__(self, grid):
            seen.append(current[0])
            return super().__getitem__(grid)

    monkeypatch.setattr(sys.modules[__name__], "FakeCompiled", RecordingCompiled)
    kernel, x = RecordingKernel(), torch.zeros(64)
    for _ in range(2):
        fast.launch(kernel, (1,), (x,), (48, 0.5), {"BLOCK": 32, "FLAG": True}, num_warps=4, num_stages=2)
        assert current[0] == 0
    assert seen == [1, 1] and len(kernel.jit_launches) + len(kernel.direct_launches) == 2
    current[0] = 1  # the tensors' GPU is current: nothing to switch
    monkeypatch.setattr(torch.cuda, "device", None)
    fast.launch(kernel, (1,), (x,), (48, 0.5), {"BLOCK": 32, "FLAG": True}, num_warps=4, num_stages=2)
    assert seen == [1, 1, 1]


def test_enabled_only_for_read_triton_versions(monkeypatch):
    monkeypatch.delenv("MIMKERNELS_FAST_LAUNCH", raising=False)
    monkeypatch.setattr(fast, "triton_interpreted", lambda: False)
    monkeypatch.setattr(fast.triton, "__version__", "3.6.0")
    assert fast.fast_launch_enabled()
    monkeypatch.setattr(fast.triton, "__version__", "3.9.0")
    assert fast.fast_launch_enabled()
    monkeypatch.setattr(fast.triton, "__version__", "3.2.0")
    assert not fast.fast_launch_enabled()
    monkeypatch.setattr(fast.triton, "__version__", "3.10.0")  # not read yet
    assert not fast.fast_launch_enabled()
    monkeypatch.setattr(fast.triton, "__version__", "3.6.0")
    monkeypatch.setenv("MIMKERNELS_FAST_LAUNCH", "0")
    assert not fast.fast_launch_enabled()


def test_every_launcher_splits_its_arguments_as_the_kernel_declares_them():
    """Each public op on the compiled (not interpreted) kernels, with Triton's launch stubbed: every launcher must
    land in the fast path's cache, i.e. its tensors + scalars + constexprs line up with the kernel's parameters.
    Runs in a subprocess: this one has the interpreter on."""
    script = r"""
import torch
from triton.runtime.jit import JITFunction
import mimkernels
from mimkernels import _backend
from mimkernels.triton import launch

class NoLaunch:
    def __getitem__(self, grid):
        return lambda *args: None

JITFunction.run = lambda self, *args, grid, warmup, **kwargs: NoLaunch()
launch._ENABLED = True
why = _backend._why_not
_backend._why_not = lambda name, device: None if name == "triton" else why(name, device)
with mimkernels.use_backend("triton"):
    q = torch.randn(2, 2, 20, 16, requires_grad=True)
    torch.autograd.grad(mimkernels.prefix_causal_attention(q, q, q, torch.tensor([3, 9])).sum(), q)
    x = torch.randn(2, 5, 16, requires_grad=True)
    kept = mimkernels.random_masking(x, 0.5, num_prefix_tokens=1)
    restored = mimkernels.restore_tokens(kept.x_kept, kept.ids_restore, torch.zeros(16, requires_grad=True),
                                         num_prefix_tokens=1)
    torch.autograd.grad(restored.sum(), x)
    images, weight = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 8, 8, requires_grad=True)
    torch.autograd.grad(mimkernels.patch_embed(images, weight).sum(), weight)
    pred = torch.randn(2, 4, 192, requires_grad=True)
    torch.autograd.grad(mimkernels.masked_patch_loss(pred, images, torch.ones(2, 4)), pred)
    qkv = torch.randn(2, 20, 3, 2, 16, requires_grad=True)
    torch.autograd.grad(mimkernels.qkv_attention(qkv, prefix_len=torch.tensor([3, 9])).sum(), qkv)
    total, normed = mimkernels.add_layer_norm(x, x.detach(), torch.ones(16), torch.zeros(16))
    torch.autograd.grad(total.sum() + normed.sum(), x)
    w1, w2 = torch.randn(32, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    torch.autograd.grad(mimkernels.gelu_mlp(x, w1, torch.zeros(32), w2, None).sum(), (x, w1, w2))
from mimkernels.triton import attention as kernels  # the per-head backward: used only where the table picks it
q = q.detach()
out, lse = kernels.forward(q, q, q, 3, 0.25)
tile = kernels.configs_for(16, q.dtype).backward_dkdv
kernels.backward_per_head(out, q, q, q, out, lse, torch.tensor([3, 9]), 0.25, tile)
names = sorted({kernel.__name__ for kernel in launch._LAUNCHED})
print(" ".join(names))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == sorted([
        "_add_layer_norm_bwd", "_add_layer_norm_fwd", "_bwd_row_dot", "_gather_rows", "_linear_gelu_fwd",
        "_masked_patch_loss_bwd", "_masked_patch_loss_fwd", "_matmul_gelu_grad", "_patch_embed_fwd",
        "_patch_embed_weight_grad", "_prefix_causal_bwd_dkdv", "_prefix_causal_bwd_dq", "_prefix_causal_bwd_per_head",
        "_prefix_causal_fwd",
        "_restore_rows"])
