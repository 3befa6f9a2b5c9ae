"""The compiled ops of csrc/ (``torch.ops.mimkernels.*``): loaded, given fake kernels for torch.compile,
and wrapped with the same signatures as the Triton kernel modules, so ops/ can use either.

Importing this module fails with ImportError when the extension was not built or does not load (built against
another torch); ``_backend`` tries it first and leaves the extension out with a warning.
"""
import torch

from . import _C  # noqa: F401  (its static initialisers register torch.ops.mimkernels.*)


@torch.library.register_fake("mimkernels::gather_rows")
def _gather_rows_fake(x, ids, pos, num_prefix):
    return x.new_empty(x.shape[0], num_prefix + ids.shape[1], x.shape[2])


@torch.library.register_fake("mimkernels::restore_rows")
def _restore_rows_fake(x, ids, token, pos, num_prefix):
    return x.new_empty(x.shape[0], num_prefix + ids.shape[1], x.shape[2])


def gather_rows(x, ids, pos, num_prefix):
    """See mimkernels/triton/tokens.py; on CPU tensors out-of-range ids raise IndexError."""
    return torch.ops.mimkernels.gather_rows(x, ids, pos, num_prefix)


def restore_rows(x, ids, token, pos, num_prefix):
    """See mimkernels/triton/tokens.py; on CPU tensors out-of-range ids raise IndexError."""
    return torch.ops.mimkernels.restore_rows(x, ids, token, pos, num_prefix)
