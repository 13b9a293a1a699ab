"""Host lists to device tensors without waiting for the device.

`torch.tensor(values, device="cuda")`, or a copy from pageable host memory, may hold the host until the
stream has finished the kernels queued before the copy (the driver stages pageable memory synchronously).
With async scheduling the host prepares step n + 1 while step n runs, so every per-step input goes
through pinned memory and a non-blocking copy instead: the host returns at once and the copy runs in
stream order. PyTorch's caching host allocator keeps the pinned block alive until the copy is done.

A flat list of ints or floats becomes a tensor through array.array (C conversion, then torch.frombuffer
shares its memory), about 3x faster than torch.tensor's per-element path: the inputs of a step are built
on the host before its first kernel, which a lone prompt's time to first token waits for (docs/performance.md).
"""
from __future__ import annotations

import array

import torch

# torch dtype -> array.array type code of the same width (Linux, the platforms torch ships for: i is 32-bit)
_ARRAY_CODES = {torch.long: "q", torch.int32: "i", torch.float32: "f"}


def host_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype) on the CPU, the fast way for a flat list of numbers."""
    code = _ARRAY_CODES.get(dtype)
    if code is not None and isinstance(values, list):
        try:
            buffer = array.array(code, values)
        except TypeError:  # nested lists, bools, None: torch.tensor's own rules apply
            pass
        else:
            if not buffer:
                return torch.empty(0, dtype=dtype)
            return torch.frombuffer(buffer, dtype=dtype)  # keeps the array alive
    return torch.tensor(values, dtype=dtype)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`, copied without a host wait on CUDA."""
    host = host_tensor(values, dtype)
    if device.type != "cuda":
        return host.to(device)
    return _pinned(host).to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, values) -> None:
    """dst.copy_(values) for a host list, without a host wait on CUDA (straight from pinned memory)."""
    host = host_tensor(values, dst.dtype)
    dst.copy_(_pinned(host) if dst.is_cuda else host, non_blocking=True)


def _pinned(host: torch.Tensor) -> torch.Tensor:
    """A pinned copy of a CPU tensor (the caching host allocator's: kept until the copies that read it are done)."""
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned
