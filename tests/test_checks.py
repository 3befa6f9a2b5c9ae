"""The shared argument checks of mimkernels/ops/_checks.py."""
import numpy as np
import pytest
import torch

from mimkernels.ops import _checks
from mimkernels.ops._checks import (
    check_bool,
    check_distinct_indices,
    check_float_tensor,
    check_images,
    check_index_tensor,
    check_mask_values,
    described,
    is_int,
    is_real,
    patch_side,
    unit_stride,
)


def test_ints_and_reals_but_never_bools():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_real(3) and is_real(0.5) and is_real(np.float32(0.5)) and not is_real(False) and not is_real("0.5")


def test_patch_side_of_square_patches_or_zero():
    for side in (1, 2, 7, 14, 16, 32, 56, 1000):
        for channels in (1, 3, 4):
            assert patch_side(side * side * channels, channels) == side
            assert patch_side(side * side * channels + channels, channels) == 0  # not a square
            if channels > 1:
                assert patch_side(side * side * channels + 1, channels) == 0  # not a multiple of the channels
    assert patch_side(768, 3) == 16 and patch_side(588, 3) == 14 and patch_side(767, 3) == 0
    assert patch_side(768, 0) == 0 and patch_side(0, 3) == 0  # no channel (was a ZeroDivisionError) or no value


def test_unit_stride_copies_only_when_the_last_dimension_is_strided():
    t = torch.randn(4, 6)
    assert unit_stride(t) is t
    assert unit_stride(t[:, 1:]).data_ptr() == t[:, 1:].data_ptr()  # a column slice keeps unit stride
    strided = t[:, ::2]
    copied = unit_stride(strided)
    assert copied.stride(-1) == 1 and torch.equal(copied, strided)


def test_check_images_names_the_argument():
    check_images(torch.randn(2, 3, 32, 48), 16)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        check_images(np.zeros((2, 3, 32, 32)), 16, name="target")
    with pytest.raises(ValueError, match="images must be 4-D"):
        check_images(torch.randn(3, 32, 32), 16)
    with pytest.raises(TypeError, match="floating-point"):
        check_images(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 16)
    with pytest.raises(ValueError, match="32x40 is not divisible by the patch size 16"):
        check_images(torch.randn(2, 3, 32, 40), 16)


def test_check_float_tensor_takes_the_four_float_dtypes_only():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        check_float_tensor("bias", torch.ones(2, dtype=dtype))
    for dtype in (torch.float8_e4m3fn, torch.complex64, torch.int64, torch.bool):
        with pytest.raises(TypeError, match=f"bias must be a floating-point tensor .* got {dtype}"):
            check_float_tensor("bias", torch.ones(2).to(dtype))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got list"):
        check_float_tensor("bias", [1.0])


def test_check_bool_takes_bools_only():
    assert check_bool("causal", True) is True and check_bool("causal", False) is False
    for value in ("false", 0, 1, None, np.bool_(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="causal must be a bool, got "):
            check_bool("causal", value)


def test_described_names_dtype_and_shape_or_type():
    assert described(torch.ones(2, 3, dtype=torch.float16)) == "torch.float16 of shape (2, 3)"
    assert described([1.0]) == "list" and described(None) == "NoneType"


def test_check_mask_values_takes_real_weights_only():
    for dtype in (torch.bool, torch.uint8, torch.int64, torch.float16, torch.float32, torch.float64):
        check_mask_values("mask", torch.ones(2, 4, dtype=dtype))
    with pytest.raises(TypeError, match="bool_masked_pos must be bool, integer or real floating point, got "
                                        "torch.complex64"):
        check_mask_values("bool_masked_pos", torch.ones(2, 4, dtype=torch.complex64))


def test_check_index_tensor_metadata():
    ids = torch.arange(12).reshape(2, 6)
    assert check_index_tensor("ids", ids, 2, ids.device) is ids
    assert check_index_tensor("ids", ids[:, ::2], 2, ids.device).stride(-1) == 1
    assert check_index_tensor("ids", ids.int(), 2, ids.device, length=6).dtype == torch.int32
    with pytest.raises(TypeError, match="ids_keep must be a torch.Tensor"):
        check_index_tensor("ids_keep", [[0, 1]], 1, ids.device)
    with pytest.raises(TypeError, match="int32 or int64"):
        check_index_tensor("ids", ids.float(), 2, ids.device)
    with pytest.raises(ValueError, match=r"ids must have shape \[3, K\]"):
        check_index_tensor("ids", ids, 3, ids.device)
    with pytest.raises(ValueError, match=r"ids must have shape \[2, 5\]"):
        check_index_tensor("ids", ids, 2, ids.device, length=5)
    with pytest.raises(ValueError, match="ids is on cpu but the data are on meta"):
        check_index_tensor("ids", ids, 2, torch.device("meta"))


def test_check_distinct_indices_values():
    check_distinct_indices("ids", torch.tensor([[3, 0], [1, 2]]), 4)
    check_distinct_indices("ids", torch.tensor([[2, 0, 1]]), 3, permutation=True)
    check_distinct_indices("ids", torch.empty(2, 0, dtype=torch.long), 4)
    with pytest.raises(IndexError, match=r"ids values must lie in \[0, 4\), got values from -1 to 3"):
        check_distinct_indices("ids", torch.tensor([[3, -1]]), 4)
    with pytest.raises(IndexError, match="from 0 to 4"):
        check_distinct_indices("ids", torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="repeats an index"):
        check_distinct_indices("ids", torch.tensor([[1, 1]]), 4)
    with pytest.raises(ValueError, match="permutation of 0..2"):
        check_distinct_indices("ids", torch.tensor([[0, 1]]), 3, permutation=True)


def test_index_values_on_cuda_are_checked_only_when_asked(monkeypatch):
    """Without a GPU: a meta tensor stands in for a device tensor whose values cannot be read cheaply."""
    bad = torch.empty(1, 2, dtype=torch.long, device="meta")
    monkeypatch.setattr(_checks, "CHECK_CUDA_INDICES", False)
    check_distinct_indices("ids", bad, 4)  # not read: no error, no sync
    monkeypatch.setattr(_checks, "CHECK_CUDA_INDICES", True)
    with pytest.raises((NotImplementedError, RuntimeError)):  # now it tries to read the values
        check_distinct_indices("ids", bad, 4)
