"""Host lists to device tensors without waiting for the device.

`torch.tensor(values, device="cuda")`, or a copy from pageable host memory, may hold the host until the
stream has finished the kernels queued before the copy (the driver stages pageable memory synchronously).
With async scheduling the host prepares step n + 1 while step n runs, so every per-step input goes
through pinned memory and a non-blocking copy instead: the host returns at once and the copy runs in
stream order. PyTorch's caching host allocator keeps the pinned block alive until the copy is done.
"""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`, copied without a host wait on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, values) -> None:
    """dst.copy_(values) for a host list, without a host wait on CUDA (straight from pinned memory)."""
    dst.copy_(torch.tensor(values, dtype=dst.dtype, pin_memory=dst.is_cuda), non_blocking=True)
