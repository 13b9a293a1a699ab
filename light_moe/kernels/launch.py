"""Host-side helpers shared by every kernel family's launch wrapper."""
from __future__ import annotations

import cuda.bindings.driver as cuda
import torch

_streams: dict[int, cuda.CUstream] = {}  # torch stream handle -> CUstream (building one costs ~8 us)


def current_stream() -> cuda.CUstream:
    """torch's current CUDA stream as a CuTe launch argument: kernels must run on it (not on the
    legacy default stream) to order correctly with torch's work and to be captured by CUDA graphs."""
    handle = torch.cuda.current_stream().cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        stream = _streams[handle] = cuda.CUstream(handle)
    return stream
