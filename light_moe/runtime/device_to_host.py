"""Device tensors read on the host without waiting for the device now.

A `.cpu()` holds the host until every kernel queued before it has run. Values the host needs only later
(the sampled tokens under async scheduling, engine/inflight.py; the expert-load statistics, reduced every
few steps) are copied to pinned memory behind the kernels that make them, with an event after the copy:
`ready()` polls it, `get()` waits for it alone, not for the kernels queued since.
"""
from __future__ import annotations

import torch


class HostCopy:
    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self._host, self._event = tensor, None  # already on the host
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def get(self) -> torch.Tensor:
        """The host copy, waiting for it if it is still in flight."""
        if self._event is not None:
            self._event.synchronize()
        return self._host
