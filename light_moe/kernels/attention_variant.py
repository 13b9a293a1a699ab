"""gpt-oss's two additions to the paged attention kernels (decode_attention.py, prefill_attention.py), as the
reference defines them (light_moe.ops.attention.paged_attention_sinks, transformers' gpt_oss attention):

  * sinks [h]: a learned logit per query head that joins every softmax denominator and attends to nothing:
    out = sum_j exp(s_j - m) v_j / (exp(sink - m) + sum_j exp(s_j - m));
  * a sliding window W: the query at position p sees the keys at positions p - W + 1 ... p (key_pos > p - W).

Both are compile-time options of the kernel classes (the sink dtype, or None; window on or off), so a kernel
without them is the same code as before they existed; the window's width is a run-time argument.
"""
from __future__ import annotations

import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float16, Float32
from cutlass.cute.runtime import make_ptr

SINK_DTYPES = {torch.float32: Float32, torch.bfloat16: BFloat16, torch.float16: Float16}


def supports(sinks: torch.Tensor | None, sliding_window: int | None, num_heads: int) -> tuple[bool, str]:
    """Whether the attention kernels take these sinks and this window (the shapes are the kernels' own check)."""
    if sinks is not None:
        if sinks.dtype not in SINK_DTYPES:
            return False, f"sinks are {sinks.dtype}: the kernels read fp32 / bf16 / fp16 sinks"
        if sinks.shape != (num_heads,) or not sinks.is_contiguous():
            return False, f"sinks must be a contiguous [{num_heads}] tensor, got {list(sinks.shape)}"
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or not 1 <= sliding_window < 2 ** 31):
        return False, f"sliding_window={sliding_window!r}: need an int >= 1"
    return True, "ok"


def check(sinks: torch.Tensor | None, sliding_window: int | None, num_heads: int, device: torch.device) -> None:
    """supports() as a ValueError, plus the device."""
    ok, reason = supports(sinks, sliding_window, num_heads)
    if not ok:
        raise ValueError(reason)
    if sinks is not None and sinks.device != device:
        raise ValueError(f"sinks are on {sinks.device}, q on {device}")


def sink_type(sinks_dtype: torch.dtype | None):
    """The CuTe element type of the kernel's sinks, None without sinks (the compile-time option)."""
    return None if sinks_dtype is None else SINK_DTYPES[sinks_dtype]


def sinks_pointer(sinks: torch.Tensor | None, placeholder: torch.Tensor) -> cute.Pointer:
    """The sinks' pointer argument; a kernel compiled without sinks never reads it (placeholder: any device
    tensor)."""
    if sinks is None:
        return _pointer(None, placeholder.data_ptr())
    return _pointer(sinks.dtype, sinks.data_ptr())


def placeholder_sinks_pointer(sinks_dtype: torch.dtype | None) -> cute.Pointer:
    """The sinks' pointer for cute.compile (any aligned address)."""
    return _pointer(sinks_dtype, 16)


def _pointer(sinks_dtype: torch.dtype | None, address: int) -> cute.Pointer:
    dtype = Float32 if sinks_dtype is None else SINK_DTYPES[sinks_dtype]
    return make_ptr(dtype, address, cute.AddressSpace.gmem, assumed_align=dtype.width // 8)
