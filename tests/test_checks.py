"""The shared argument checks of mimkernels/ops/_checks.py."""
import numpy as np
import torch

from mimkernels.ops._checks import is_int, is_real, unit_stride


def test_ints_and_reals_but_never_bools():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_real(3) and is_real(0.5) and is_real(np.float32(0.5)) and not is_real(False) and not is_real("0.5")


def test_unit_stride_copies_only_when_the_last_dimension_is_strided():
    t = torch.randn(4, 6)
    assert unit_stride(t) is t
    assert unit_stride(t[:, 1:]).data_ptr() == t[:, 1:].data_ptr()  # a column slice keeps unit stride
    strided = t[:, ::2]
    copied = unit_stride(strided)
    assert copied.stride(-1) == 1 and torch.equal(copied, strided)
