"""mimkernels.triton._interpreter_masks: a block mask that holds a broadcast scalar condition works in Triton's CPU
interpreter (Triton 3.9's refused it as int32: "mask has unsupported dtype"). On a GPU the kernel is compiled."""
import pytest
import torch
import triton
import triton.language as tl

from mimkernels import _backend

pytestmark = pytest.mark.skipif(not _backend.triton_interpreted(), reason="the interpreter's masks (CPU runs only)")


@triton.jit
def _copy_and_count_live_rows(X, OUT, COUNT, rows, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    live = (cols < width) & (row < rows)  # a block condition and a scalar one, as the kernels write it
    x = tl.load(X + row * width + cols, mask=live, other=-1.0)
    tl.store(OUT + row * width + cols, x, mask=live)
    tl.atomic_add(COUNT + cols, tl.full((BLOCK,), 1, tl.int32), mask=live)


def test_scalar_condition_in_a_block_mask():
    rows, width = 3, 5
    x = torch.randn(rows + 1, width)  # one row past `rows`: the mask must keep it out
    out = torch.zeros_like(x)
    count = torch.zeros(8, dtype=torch.int32)
    _copy_and_count_live_rows[(rows + 1,)](x, out, count, rows, width, BLOCK=8)
    torch.testing.assert_close(out[:rows], x[:rows], rtol=0, atol=0)
    assert torch.equal(out[rows], torch.zeros(width))
    assert count.tolist() == [rows] * width + [0] * (8 - width)
