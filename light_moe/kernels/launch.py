"""Host-side helpers shared by every kernel family's launch wrapper."""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass.cute as cute
import torch

_streams: dict[int, cuda.CUstream] = {}  # torch stream handle -> CUstream (built once: costly per launch)


def current_stream() -> cuda.CUstream:
    """torch's current CUDA stream as a CuTe launch argument: kernels must run on it (not on the
    legacy default stream) to order correctly with torch's work and to be captured by CUDA graphs."""
    handle = torch.cuda.current_stream().cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        stream = _streams[handle] = cuda.CUstream(handle)
    return stream


_num_sms: dict[int, int] = {}  # device index -> SMs: the persistent kernels' grid size


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (its index, else the current device), asked of the driver once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _num_sms:
        _num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _num_sms[index]


def await_inputs() -> None:
    """First statement of every kernel of ours that reads a predecessor's output (device side, traced inline).

    Every kernel is launched with programmatic dependent launch (`use_pdl=True`): it may start while the kernel
    before it in the stream is still running, once all of that kernel's CTAs have passed their own call of this
    (griddepcontrol.launch_dependents) or exited. griddepcontrol.wait then holds it until that kernel has finished
    and its writes are visible, so nothing is read early; what is gained is the launch and prologue of the next
    kernel (CTA placement, barrier set-up) overlapping the tail of the current one (docs/kernels.md), at each boundary
    of a decode step's MoE layer (router, up, down, combine). Triggering at the start cannot starve the running
    kernel: its dependent launches only when every CTA of the running kernel is already resident. A predecessor
    that never triggers (a torch op, NCCL) makes this an ordinary stream dependency."""
    cute.arch.griddepcontrol_wait()
    cute.arch.griddepcontrol_launch_dependents()


def head_shape_problem(dtype: torch.dtype, dtypes, num_heads: int, num_kv_heads: int, head_dim: int,
                       head_dims) -> str | None:
    """The checks every attention-side kernel's supports() starts with (dtype, head_dim, GQA grouping): None when
    they pass, else the reason."""
    if dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"dtype {dtype} unsupported ({names})"
    if head_dim not in head_dims:
        return f"head_dim={head_dim} unsupported ({tuple(head_dims)})"
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        return f"num_heads={num_heads} is not a positive multiple of num_kv_heads={num_kv_heads}"
    return None


def paged_attention_shapes(kernel: str, supports, q: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    """The argument checks the paged-attention wrappers share: q a contiguous [rows, h, D] tensor, the caches
    contiguous [blocks, block_size, g, D] of q's dtype, the shapes accepted by `supports`. Returns
    (rows, h, D, block_size, g); raises ValueError naming `kernel` otherwise."""
    if q.dim() != 3 or not q.is_contiguous():
        raise ValueError(f"{kernel}: q must be a contiguous [rows, h, D] tensor, got {list(q.shape)}")
    rows, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or not k_cache.is_contiguous() \
            or not v_cache.is_contiguous():
        raise ValueError(f"{kernel}: k_cache and v_cache must be contiguous [blocks, block_size, g, D] tensors of "
                         f"one shape, got {list(k_cache.shape)} and {list(v_cache.shape)}")
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"{kernel}: cache [.., {num_kv_heads}, {cache_dim}] {k_cache.dtype} does not match q "
                         f"[rows, {num_heads}, {head_dim}] {q.dtype}")
    ok, reason = supports(q.dtype, num_heads, num_kv_heads, head_dim, block_size)
    if not ok:
        raise ValueError(f"{kernel}: {reason}")
    return rows, num_heads, head_dim, block_size, num_kv_heads
