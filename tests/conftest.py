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
