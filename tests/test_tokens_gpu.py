"""MAE token ops on a GPU: the compiled CUDA kernels and the Triton kernels at MAE sizes, all vector widths."""
import pytest
import torch
from test_tokens import check_grads

import mimkernels
from mimkernels import reference

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [name for name in ("extension", "triton") if name in mimkernels.available_backends()]
# (backend, ops.tokens.FUSED_BACKWARD): the one-pass backwards (Triton only) compiled, at MAE sizes
GPU_BACKWARDS = [(name, False) for name in GPU_BACKENDS] + [("triton", True)] * ("triton" in GPU_BACKENDS)


@pytest.mark.parametrize("backend, fused_backward", GPU_BACKWARDS, indirect=["fused_backward"],
                         ids=[backend + "-fused_bwd" * fused for backend, fused in GPU_BACKWARDS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dim", [768, 1024, 33, 36, 1100])  # 16-byte vectors, odd widths, 4/8-byte vectors
def test_mae_encoder_and_decoder_path(backend, fused_backward, dtype, dim):
    """Masking, gather and restore with an fp32 pos_embed and mask token, against the reference on float64 twins
    (the kernels add pos_embed in fp32 and round once; a reference run in bf16 would round twice); the backwards
    as shipped and, on Triton, in one pass (16 samples: four sample groups, each a partial sum; widths 33, 36 and
    1100 end in a partial column block)."""
    batch, patches = 16, 196
    x = torch.randn(batch, 1 + patches, dim, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.randn(1, 1 + patches, dim, device="cuda", requires_grad=True)
    token = torch.randn(1, 1, dim, device="cuda", requires_grad=True)
    noise = torch.rand(batch, patches, device="cuda")
    with mimkernels.use_backend(backend):
        kept = mimkernels.random_masking(x, 0.75, noise=noise, num_prefix_tokens=1)
        gathered = mimkernels.gather_tokens(x[:, 1:], kept.ids_keep, pos_embed=pos[:, 1:])
        restored = mimkernels.restore_tokens(kept.x_kept, kept.ids_restore, token, pos_embed=pos, num_prefix_tokens=1)
    want = reference.random_masking(x, 0.75, noise=noise, num_prefix_tokens=1)
    assert torch.equal(kept.x_kept, want.x_kept) and torch.equal(kept.mask, want.mask)  # a gather copies

    def both(x64, pos64, token64):
        kept64 = reference.random_masking(x64, 0.75, noise=noise, num_prefix_tokens=1).x_kept
        return torch.cat([
            reference.gather_tokens(x64[:, 1:], want.ids_keep, pos_embed=pos64[:, 1:]).flatten(),
            reference.restore_tokens(kept64, want.ids_restore, token64, pos_embed=pos64, num_prefix_tokens=1).flatten(),
        ])

    # The mask token's gradient sums 16 x 147 rows: fp32 summation error passes fp32's element tolerance there.
    tolerance = 1e-5 if dtype == torch.float32 else None
    check_grads(torch.cat([gathered.flatten(), restored.flatten()]), [x, pos, token], both, dtype, tolerance)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_out_of_range_ids_stay_in_bounds(backend):
    x = torch.randn(2, 8, 64, device="cuda")
    bad = torch.tensor([[0, -3, 8, 1 << 40], [7, 2, 3, 9]], device="cuda")
    kernels = mimkernels.ops.tokens._KERNELS[backend]
    gathered = kernels.gather_rows(x, bad, None, 0)
    torch.cuda.synchronize()
    assert torch.isfinite(gathered).all() and gathered[0, 1:].abs().sum() == 0


def test_index_check_flag(monkeypatch):
    monkeypatch.setattr(mimkernels.ops._checks, "CHECK_CUDA_INDICES", True)
    x = torch.randn(2, 8, 64, device="cuda")
    with pytest.raises(IndexError):
        mimkernels.gather_tokens(x, torch.tensor([[0, 8], [1, 2]], device="cuda"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_batch_past_the_grid_limit_of_65535(backend):
    """More samples than a CUDA grid's second or third axis takes (65535): the Triton kernels put the batch on the
    first axis, the extension folds it into one. The last samples must equal the same samples run alone."""
    batch, patches, dim = 70_000, 8, 16
    x = torch.randn(batch, 1 + patches, dim, device="cuda")
    pos = torch.randn(1, 1 + patches, dim, device="cuda")
    noise = torch.rand(batch, patches, device="cuda")
    token = torch.randn(1, 1, dim, device="cuda")
    tail = slice(batch - 3, batch)
    with mimkernels.use_backend(backend):
        kept = mimkernels.random_masking(x, 0.5, noise=noise, num_prefix_tokens=1, pos_embed=pos)
        restored = mimkernels.restore_tokens(kept.x_kept, kept.ids_restore, token, pos_embed=pos,
                                             num_prefix_tokens=1)
        kept_tail = mimkernels.random_masking(x[tail], 0.5, noise=noise[tail], num_prefix_tokens=1, pos_embed=pos)
        restored_tail = mimkernels.restore_tokens(kept_tail.x_kept, kept_tail.ids_restore, token, pos_embed=pos,
                                                  num_prefix_tokens=1)
    assert torch.equal(kept.x_kept[tail], kept_tail.x_kept) and torch.equal(restored[tail], restored_tail)
