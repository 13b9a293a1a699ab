"""runtime/host_to_device.py: host lists become exactly what torch.tensor makes of them (dtype, shape, values),
through array.array for flat lists of numbers and torch.tensor for everything else; on the CPU, to_device and
copy_to give the same values."""
import pytest
import torch

from light_moe.runtime.host_to_device import copy_to, host_tensor, to_device

CASES = [
    ([1, -2, 3, 2**40], torch.long),
    ([-1, 0, 7], torch.int32),
    ([0.1, 2.5, -3.0, 1e-8], torch.float32),
    ([], torch.long),
    ([True, False], torch.long),  # bools are ints: array.array takes them as torch.tensor does
    ([1.7, -2.2], torch.long),  # floats into an int dtype: torch.tensor's truncation (the fallback)
    ([[1, 2], [3, 4]], torch.long),  # nested: the fallback keeps the 2-D shape
    ([True, False, True], torch.bool),  # no array code: torch.tensor
]


@pytest.mark.parametrize("values, dtype", CASES)
def test_host_tensor_is_torch_tensor(values, dtype):
    got, want = host_tensor(values, dtype), torch.tensor(values, dtype=dtype)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(to_device(values, dtype, torch.device("cpu")), want)


def test_copy_to_and_independent_results():
    dst = torch.full((5,), -9, dtype=torch.int32)
    copy_to(dst[1:4], [4, 5, 6])
    assert dst.tolist() == [-9, 4, 5, 6, -9]
    a, b = host_tensor([1, 2], torch.long), host_tensor([1, 2], torch.long)
    a[0] = 7  # each call owns its memory
    assert b.tolist() == [1, 2]


def test_out_of_range_values_raise():
    with pytest.raises((OverflowError, RuntimeError)):
        host_tensor([2**40], torch.int32)

