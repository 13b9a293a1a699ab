"""MoE combine: weighted sum of each token's K expert output rows.

Shape legend: T tokens, K top-k, H hidden, M = T * K routed rows (sorted by expert).
y [M, H] (bf16, fp16 or fp32), reverse_index [M] int32, topk_weights [T, K] fp32 -> out [T, H] (y's dtype):
    out[t] = sum_k topk_weights[t, k] * y[reverse_index[t * K + k]]
accumulated in fp32 in slot order k = 0..K-1, then rounded once (light_moe.ops.reference.combine).
No atomics, so the result is deterministic.

One CTA per (token, chunk of 128 x 16 bytes of the row): 128 threads, each owning one 16-byte vector of the
row; it issues the K row loads before the first add (K x 16 bytes in flight per thread), which is
what a memory-bound gather needs. Grid = T x ceil(H / (128 * vec)).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float16, Float32, Int32
from cutlass.cute.runtime import make_ptr

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream

THREADS = 128
MAX_TOP_K = 16
_DTYPES = {torch.bfloat16: BFloat16, torch.float16: Float16, torch.float32: Float32}


def supports(dtype: torch.dtype, hidden_size: int, top_k: int) -> tuple[bool, str]:
    if dtype not in _DTYPES:
        return False, f"dtype {dtype} unsupported (bf16, fp16, fp32)"
    row_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()
    if hidden_size <= 0 or row_bytes % 16:
        return False, f"hidden_size={hidden_size}: rows must be a multiple of 16 bytes"
    if not 1 <= top_k <= MAX_TOP_K:
        return False, f"top_k={top_k} outside [1, {MAX_TOP_K}]"
    return True, "ok"


class CombineKernel:
    """Compiled once per (dtype, H, K); T is a run-time argument."""

    def __init__(self, dtype, hidden: int, top_k: int):
        self.dtype = dtype
        self.hidden = hidden
        self.top_k = top_k
        self.vec = 128 // dtype.width  # elements per 16-byte access

    @cute.jit
    def __call__(
        self,
        y_ptr: cute.Pointer,
        reverse_ptr: cute.Pointer,
        weights_ptr: cute.Pointer,
        out_ptr: cute.Pointer,
        n_tokens: Int32,
        stream: cuda.CUstream,
    ):
        hidden, k = self.hidden, self.top_k
        y = cute.make_tensor(y_ptr, cute.make_layout((n_tokens * k, hidden), stride=(hidden, 1)))
        reverse = cute.make_tensor(reverse_ptr, cute.make_layout((n_tokens * k,)))
        weights = cute.make_tensor(weights_ptr, cute.make_layout((n_tokens, k), stride=(k, 1)))
        out = cute.make_tensor(out_ptr, cute.make_layout((n_tokens, hidden), stride=(hidden, 1)))
        n_chunks = -(-(hidden // self.vec) // THREADS)
        self.kernel(y, reverse, weights, out).launch(grid=(n_tokens, n_chunks, 1), block=(THREADS, 1, 1), stream=stream,
                                                     use_pdl=True)

    @cute.kernel
    def kernel(self, y: cute.Tensor, reverse: cute.Tensor, weights: cute.Tensor, out: cute.Tensor):
        await_inputs()
        k, vec = self.top_k, self.vec
        tidx, _, _ = cute.arch.thread_idx()
        token, chunk, _ = cute.arch.block_idx()
        v = chunk * THREADS + tidx
        if v < self.hidden // vec:
            copy128 = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=128)
            res = cute.make_rmem_tensor((vec,), self.dtype)
            combine_vector(y, reverse, weights, token, v, res, copy128, k, vec)
            cute.copy(copy128, res, cute.zipped_divide(out[token, None], (vec,))[None, v])


@cute.jit
def combine_vector(y: cute.Tensor, reverse: cute.Tensor, weights: cute.Tensor, token: Int32, v: Int32,
                   dst: cute.Tensor, copy128, k: cutlass.Constexpr, vec: cutlass.Constexpr):
    """dst (vec registers of y's dtype) := vector v of token's combine: its K rows' 16-byte pieces loaded before
    the first add, summed in fp32 in slot order, rounded once. Shared with kernels/rms_norm.py's combine
    prologue, so the fused and the separate paths round alike."""
    rows = cute.make_rmem_tensor((vec, k), dst.element_type)
    for kk in cutlass.range_constexpr(k):
        src = cute.zipped_divide(y[reverse[token * k + kk], None], (vec,))
        cute.copy(copy128, src[None, v], rows[None, kk])
    acc = cute.make_rmem_tensor((vec,), Float32)
    acc.fill(0.0)
    for kk in cutlass.range_constexpr(k):
        acc.store(acc.load() + rows[None, kk].load().to(Float32) * weights[token, kk])
    dst.store(acc.load().to(dst.element_type))


_compiled = CompileCache("combine")  # (dtype, H, K) -> compiled function; never keyed on T



def make_compile_args(dtype: torch.dtype, hidden: int, top_k: int, stream=None):
    """(jit function, arguments) for cute.compile with placeholder pointers; T is dynamic."""
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[dtype]
    args = (
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        make_ptr(Float32, 16, gmem, assumed_align=4),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        Int32(1),
        stream,
    )
    return CombineKernel(cdt, hidden, top_k), args


def compiled_combine(dtype: torch.dtype, hidden: int, top_k: int):
    key = (dtype, hidden, top_k)
    return _compiled.get(key, lambda: make_compile_args(dtype, hidden, top_k, current_stream()))


def combine_into(y: torch.Tensor, reverse_index: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor) -> None:
    """Writes out [T, H] on the current stream. y may hold more rows than the T * K it is read at (the
    fixed-capacity expert exchange returns a padded buffer); reverse_index entries must lie in [0, rows of y)."""
    if topk_weights.dim() != 2 or topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        raise ValueError(
            f"topk_weights must be a contiguous [T, K] fp32 tensor, got {tuple(topk_weights.shape)} "
            f"{topk_weights.dtype}"
        )
    num_tokens, top_k = topk_weights.shape
    if y.dim() != 2 or y.shape[0] < num_tokens * top_k or not y.is_contiguous():
        raise ValueError(f"y must be a contiguous [>= T * K = {num_tokens * top_k}, H] tensor, got {tuple(y.shape)}")
    hidden = y.shape[1]
    ok, reason = supports(y.dtype, hidden, top_k)
    if not ok:
        raise ValueError(f"combine kernel: {reason}")
    if reverse_index.shape != (num_tokens * top_k,) or reverse_index.dtype != torch.int32:
        raise ValueError(
            f"reverse_index must be [{num_tokens * top_k}] int32, got {tuple(reverse_index.shape)} "
            f"{reverse_index.dtype}"
        )
    if out.shape != (num_tokens, hidden) or out.dtype != y.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{num_tokens}, {hidden}] {y.dtype} tensor")
    if y.data_ptr() % 16 or out.data_ptr() % 16:
        raise ValueError("y and out must be 16-byte aligned (128-bit accesses)")
    if num_tokens == 0:
        return
    fn = compiled_combine(y.dtype, hidden, top_k)
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[y.dtype]
    fn(
        make_ptr(cdt, y.data_ptr(), gmem, assumed_align=16),
        make_ptr(Int32, reverse_index.data_ptr(), gmem, assumed_align=4),
        make_ptr(Float32, topk_weights.data_ptr(), gmem, assumed_align=4),
        make_ptr(cdt, out.data_ptr(), gmem, assumed_align=16),
        Int32(num_tokens),
        current_stream(),
    )


def combine(y: torch.Tensor, reverse_index: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Same contract as light_moe.ops.reference.combine -> out [T, H] in y's dtype."""
    out = torch.empty(topk_weights.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    combine_into(y, reverse_index.to(torch.int32).contiguous(), topk_weights.float().contiguous(), out)
    return out
