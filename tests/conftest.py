"""Test harness: without a GPU the Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so this runs before any test module
imports mimkernels' kernels. Tests marked ``gpu`` are skipped without a GPU, never faked.
"""
import os
import sys
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before conftest could turn on its interpreter"
    )
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_GPU else "cpu"


def _interpret_tma_reduce_adds():
    """Triton's interpreter (3.6-3.9) has no TMA reduce-add (``descriptor.atomic_add``, Hopper's
    ``cp.reduce.async.bulk.tensor``), which the atomic dK/dV kernel uses through descriptors. Its meaning is an atomic
    add of the block's elements that lie inside the tensor, the others dropped: that is what this adds to the
    interpreter, so the kernel code around it (offsets, block shape, dtype) runs in the CPU tests. A Triton whose
    interpreter has its own is left alone. On a GPU the compiled instruction runs and the GPU tests check it."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    if hasattr(interpreter.InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"the tests' interpreter shim only adds: {kind}")
        pointers, inside = desc.materialize_pointers(indices)
        if not isinstance(inside, interpreter.TensorHandle):  # Triton 3.9 hands over a TensorHandle, 3.6-3.8 an array
            inside = interpreter.TensorHandle(inside, tl.int1)
        op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
        return self.create_atomic_rmw(op, pointers, value, inside, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    interpreter.InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


if not HAS_GPU:
    _interpret_tma_reduce_adds()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def fused_backward(request, monkeypatch):
    """ops.tokens.FUSED_BACKWARD set to the value a test is parametrized with (indirectly): the token ops' one-pass
    backwards, on the Triton backend."""
    from mimkernels.ops import tokens as token_ops

    monkeypatch.setattr(token_ops, "FUSED_BACKWARD", request.param)
    return request.param


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank (this process), for FSDP and DDP on the CPU; destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def seeded_per_test(request):
    """Each test starts from a seed of its own name: its unseeded random inputs are the same whichever tests ran
    before it or alone (an order-dependent input once failed a tolerance in CI only)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles from empty Dynamo caches: compiled code is cached per code object (timm's and our modules'
    forwards), every new model instance adds an entry, and past 8 (torch's recompile_limit) a fullgraph compile
    fails, so compile tests passed alone and failed in the full suite once enough earlier tests had compiled."""
    torch._dynamo.reset()
