"""RMSNorm with an optional fused residual add, one kernel per call.

Shape legend: N rows (tokens, or tokens x heads for per-head q/k norms), H hidden (the normalised size).
x [N, H] (rows may be strided: row stride >= H, last dim contiguous), weight [H], residual [N, H] contiguous,
out [N, H] contiguous; all one dtype (bf16, fp16 or fp32).

    without residual:  out = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)
    with residual:     s = (x + residual).to(dtype), written back into residual; out = norm(s) as above

With a combine prologue (combine_k = K > 0, the MoE layer's output fused into the next norm; residual required):
x is not read; each of its vectors is the MoE combine of that token, x[t] = sum_k topk_weights[t, k] * y[reverse_index
[t K + k]] accumulated in fp32 in slot order and rounded once (kernels/combine.py, the same expression), plus, with
extra (the shared expert's output [N, H]), (x[t] + extra[t]) rounded once as torch's add; the rest is the same.

The rounding follows light_moe/layers/norm.py op by op: the sum x + residual is rounded to dtype (torch's
bf16 add), the normalised row is rounded to dtype, and weight * row is one fp32 product (exact for 16-bit
inputs) rounded once, as torch's bf16 mul does. Only the fp32 sum of squares is accumulated in a different
order than torch's reduction, which can move the fp32 scale by an ulp or so.

Work split: a row of n_vec = H / vec 16-byte vectors is owned by tpr threads (a power of two), each holding
vpt vectors in registers between the reduction and the output (one read of x and residual). Small rows share
a CTA (rows_per_cta = 128 / tpr) so that per-head norms of size 128 do not launch 32-thread CTAs. The sum of
squares is reduced with butterfly shuffles inside a row's lanes, plus shared memory when a row spans warps.
"""

from __future__ import annotations

from dataclasses import dataclass

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float16, Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cute.runtime import make_ptr
from cutlass.cutlass_dsl import dsl_user_op

from light_moe.kernels.combine import combine_vector
from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream

_DTYPES = {torch.bfloat16: BFloat16, torch.float16: Float16, torch.float32: Float32}
MIN_CTA_THREADS = 128  # small rows are packed until a CTA has this many threads
MAX_THREADS_PER_ROW = 1024
TARGET_VECTORS_PER_THREAD = 4  # independent 16-byte loads in flight per thread before the reduction
MAX_VECTORS_PER_THREAD = 8  # register budget of the row kept between reduction and output
COMBINE_MAX_TOP_K = 16  # kernels/combine.py's bound


@dataclass(frozen=True)
class RowTiling:
    """How one row of n_vec 16-byte vectors is spread over threads."""

    threads_per_row: int
    vectors_per_thread: int
    rows_per_cta: int

    @property
    def threads(self) -> int:
        return self.threads_per_row * self.rows_per_cta


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def choose_tiling(n_vec: int) -> RowTiling:
    tpr = min(MAX_THREADS_PER_ROW, _next_pow2(-(-n_vec // TARGET_VECTORS_PER_THREAD)))
    vpt = -(-n_vec // tpr)
    return RowTiling(tpr, vpt, max(1, MIN_CTA_THREADS // tpr))


def _vec(dtype: torch.dtype) -> int:
    return 16 // dtype.itemsize


def supports(dtype: torch.dtype, hidden_size: int) -> tuple[bool, str]:
    if dtype not in _DTYPES:
        return False, f"dtype {dtype} unsupported (bf16, fp16, fp32)"
    vec = _vec(dtype)
    if hidden_size <= 0 or hidden_size % vec:
        return False, f"hidden_size={hidden_size}: rows must be a positive multiple of 16 bytes ({vec} elements)"
    max_hidden = MAX_THREADS_PER_ROW * MAX_VECTORS_PER_THREAD * vec
    if hidden_size > max_hidden:
        return False, f"hidden_size={hidden_size} > {max_hidden} (the row must fit in one CTA's registers)"
    return True, "ok"


@dsl_user_op
def mul_rn(a: Float32, b: Float32, *, loc=None, ip=None) -> Float32:
    """a * b rounded to fp32 on its own: an explicit mul.rn is never contracted into an fma with a following
    add, so a product and a sum round separately as in torch's separate mul and add kernels."""
    values = [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)]
    return Float32(llvm.inline_asm(Float32.mlir_type, values, "mul.rn.f32 $0, $1, $2;", "=f,f,f",
                                   has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
                                   loc=loc, ip=ip))


class RMSNormKernel:
    """Compiled once per (dtype, H, residual or not, combine_k, extra or not); N, the row stride of x and eps are
    run-time arguments."""

    def __init__(self, dtype, hidden: int, has_residual: bool, combine_k: int = 0, has_extra: bool = False):
        if combine_k and not has_residual or has_extra and not combine_k:
            raise ValueError("the combine prologue needs a residual; extra needs the combine prologue")
        self.dtype = dtype
        self.hidden = hidden
        self.has_residual = has_residual
        self.combine_k = combine_k
        self.has_extra = has_extra
        self.vec = 128 // dtype.width
        self.n_vec = hidden // self.vec
        self.tiling = choose_tiling(self.n_vec)

    @cute.jit
    def __call__(
        self,
        x_ptr: cute.Pointer,
        x_row_stride: Int32,
        residual_ptr: cute.Pointer,
        weight_ptr: cute.Pointer,
        out_ptr: cute.Pointer,
        n_rows: Int32,
        eps: Float32,
        y_ptr: cute.Pointer,
        reverse_ptr: cute.Pointer,
        topk_ptr: cute.Pointer,
        extra_ptr: cute.Pointer,
        stream: cuda.CUstream,
    ):
        """y_ptr [N K, H], reverse_ptr [N K] int32, topk_ptr [N, K] fp32, extra_ptr [N, H]: the combine prologue's
        inputs, read only when compiled with it (any valid pointers otherwise)."""
        hidden, tiling, k = self.hidden, self.tiling, max(1, self.combine_k)
        stride = cute.assume(x_row_stride, divby=self.vec)  # what lets the 16-byte accesses verify
        x = cute.make_tensor(x_ptr, cute.make_layout((n_rows, hidden), stride=(stride, 1)))
        residual = cute.make_tensor(residual_ptr, cute.make_layout((n_rows, hidden), stride=(hidden, 1)))
        weight = cute.make_tensor(weight_ptr, cute.make_layout((hidden,)))
        out = cute.make_tensor(out_ptr, cute.make_layout((n_rows, hidden), stride=(hidden, 1)))
        y = cute.make_tensor(y_ptr, cute.make_layout((n_rows * k, hidden), stride=(hidden, 1)))
        reverse = cute.make_tensor(reverse_ptr, cute.make_layout((n_rows * k,)))
        topk = cute.make_tensor(topk_ptr, cute.make_layout((n_rows, k), stride=(k, 1)))
        extra = cute.make_tensor(extra_ptr, cute.make_layout((n_rows, hidden), stride=(hidden, 1)))
        n_ctas = (n_rows + tiling.rows_per_cta - 1) // tiling.rows_per_cta
        self.kernel(x, residual, weight, out, n_rows, eps, y, reverse, topk, extra).launch(
            grid=(n_ctas, 1, 1), block=(tiling.threads, 1, 1), stream=stream, use_pdl=True)

    @cute.kernel
    def kernel(self, x: cute.Tensor, residual: cute.Tensor, weight: cute.Tensor, out: cute.Tensor, n_rows: Int32,
               eps: Float32, y: cute.Tensor, reverse: cute.Tensor, topk: cute.Tensor, extra: cute.Tensor):
        await_inputs()
        vec, n_vec, dtype = self.vec, self.n_vec, self.dtype
        tpr, vpt, rpc = self.tiling.threads_per_row, self.tiling.vectors_per_thread, self.tiling.rows_per_cta
        warps_per_row = max(1, tpr // 32)
        partial = None
        if cutlass.const_expr(warps_per_row > 1):
            partial = cutlass.utils.SmemAllocator().allocate_tensor(
                Float32, cute.make_layout((warps_per_row * rpc,)), byte_alignment=16)

        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        row = bidx * rpc + tidx // tpr
        lane_in_row = tidx % tpr
        # Rows past N (the last CTA's spare rows) load row N - 1 and store nothing: every lane then reaches the
        # shuffles and the barrier below, which must not sit inside a branch on the row.
        row_in = cutlass.min(row, n_rows - 1)
        copy128 = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128)
        x_vecs = cute.zipped_divide(x[row_in, None], (vec,))  # ((vec), n_vec)
        res_vecs = cute.zipped_divide(residual[row_in, None], (vec,))
        w_vecs = cute.zipped_divide(weight, (vec,))
        out_vecs = cute.zipped_divide(out[row_in, None], (vec,))

        vals = cute.make_rmem_tensor((vec, vpt), dtype)  # the row's (x + residual) kept in registers
        vals.fill(0.0)  # a thread's vectors past n_vec contribute 0 to the sum of squares
        partner = cute.make_rmem_tensor((vec,), dtype)
        sumsq = Float32(0.0)
        for j in cutlass.range_constexpr(vpt):
            v = lane_in_row + j * tpr
            if v < n_vec:
                if cutlass.const_expr(self.combine_k > 0):
                    self.combine_vector(y, reverse, topk, extra, row_in, v, vals[None, j], copy128)
                else:
                    cute.copy(copy128, x_vecs[None, v], vals[None, j])
                if cutlass.const_expr(self.has_residual):
                    cute.copy(copy128, res_vecs[None, v], partner)
                    vals[None, j].store((vals[None, j].load().to(Float32) + partner.load().to(Float32)).to(dtype))
                    if row < n_rows:
                        cute.copy(copy128, vals[None, j], res_vecs[None, v])
                f = vals[None, j].load().to(Float32)
                sumsq += (f * f).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)

        sumsq = cute.arch.warp_reduction_sum(sumsq, threads_in_group=min(tpr, 32))
        if cutlass.const_expr(warps_per_row > 1):
            warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            if cute.arch.lane_idx() == 0:
                partial[warp] = sumsq
            cute.arch.sync_threads()
            first = (tidx // tpr) * warps_per_row
            sumsq = partial[first]
            for w in cutlass.range_constexpr(1, warps_per_row):
                sumsq += partial[first + w]
        # mean as torch's reduction computes it: the sum times the factor 1/H, rounded before + eps
        scale = cute.math.rsqrt(mul_rn(sumsq, Float32(1.0 / self.hidden)) + eps)

        if row < n_rows:
            for j in cutlass.range_constexpr(vpt):
                v = lane_in_row + j * tpr
                if v < n_vec:
                    normed = (vals[None, j].load().to(Float32) * scale).to(dtype)
                    cute.copy(copy128, w_vecs[None, v], partner)
                    vals[None, j].store((partner.load().to(Float32) * normed.to(Float32)).to(dtype))
                    cute.copy(copy128, vals[None, j], out_vecs[None, v])

    @cute.jit
    def combine_vector(self, y: cute.Tensor, reverse: cute.Tensor, topk: cute.Tensor, extra: cute.Tensor, row: Int32,
                       v: Int32, dst: cute.Tensor, copy128):
        """dst := vector v of token row's MoE combine (+ extra), rounded as kernels/combine.py and torch's add."""
        vec, dtype = self.vec, self.dtype
        combine_vector(y, reverse, topk, row, v, dst, copy128, self.combine_k, vec)
        if cutlass.const_expr(self.has_extra):
            add = cute.make_rmem_tensor((vec,), dtype)
            cute.copy(copy128, cute.zipped_divide(extra[row, None], (vec,))[None, v], add)
            dst.store((dst.load().to(Float32) + add.load().to(Float32)).to(dtype))


_compiled = CompileCache("rms_norm")  # (dtype, H, residual, combine_k, extra) -> compiled function; never keyed on N


def make_compile_args(dtype: torch.dtype, hidden: int, has_residual: bool, stream=None, combine_k: int = 0,
                      has_extra: bool = False):
    """(jit function, arguments) for cute.compile with placeholder pointers; N and the row stride are dynamic."""
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[dtype]
    args = (
        make_ptr(cdt, 16, gmem, assumed_align=16),
        Int32(hidden),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        Int32(1),
        Float32(1e-6),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        make_ptr(Float32, 16, gmem, assumed_align=4),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        stream,
    )
    return RMSNormKernel(cdt, hidden, has_residual, combine_k, has_extra), args


def compiled_rms_norm(dtype: torch.dtype, hidden: int, has_residual: bool, combine_k: int = 0,
                      has_extra: bool = False):
    key = (dtype, hidden, has_residual, combine_k, has_extra)
    return _compiled.get(key, lambda: make_compile_args(dtype, hidden, has_residual, current_stream(), combine_k,
                                                        has_extra))


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        raise ValueError(f"x must be [N, H] with a contiguous last dim, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    n, hidden = x.shape
    ok, reason = supports(x.dtype, hidden)
    if not ok:
        raise ValueError(f"rms_norm kernel: {reason}")
    vec = _vec(x.dtype)
    if weight.shape != (hidden,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{hidden}] {x.dtype} tensor, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != (n, hidden) or t.dtype != x.dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{n}, {hidden}] {x.dtype} tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if x.stride(0) % vec or n * x.stride(0) >= 2**31 or n * hidden >= 2**31:
        raise ValueError(f"x row stride {x.stride(0)} must be a multiple of {vec} and N * stride < 2^31")
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("out", out)):
        if t is not None and t.data_ptr() % 16:
            raise ValueError(f"{name} must be 16-byte aligned (128-bit accesses)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """out [N, H] = RMSNorm(x (+ residual)) on the current stream; with residual, residual := x + residual
    (in place) first. Same rounding as light_moe.layers.norm.RMSNorm. No host sync (CUDA-graph capturable)."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check(x, weight, residual, out)
    if x.shape[0] == 0:
        return out
    fn = compiled_rms_norm(x.dtype, x.shape[1], residual is not None)
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[x.dtype]
    x_ptr = make_ptr(cdt, x.data_ptr(), gmem, assumed_align=16)
    fn(
        x_ptr,
        Int32(x.stride(0)),
        x_ptr if residual is None else make_ptr(cdt, residual.data_ptr(), gmem, assumed_align=16),
        make_ptr(cdt, weight.data_ptr(), gmem, assumed_align=16),
        make_ptr(cdt, out.data_ptr(), gmem, assumed_align=16),
        Int32(x.shape[0]),
        Float32(eps),
        *_unused_combine_args(x_ptr, x.data_ptr()),
        current_stream(),
    )
    return out


def _unused_combine_args(x_ptr, address: int) -> tuple:
    """Placeholders for the combine prologue's pointers of a kernel compiled without it (never read)."""
    gmem = cute.AddressSpace.gmem
    return (x_ptr, make_ptr(Int32, address, gmem, assumed_align=4), make_ptr(Float32, address, gmem, assumed_align=4),
            x_ptr)


def combine_rms_norm(y: torch.Tensor, reverse_index: torch.Tensor, topk_weights: torch.Tensor,
                     extra: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE combine fused into the next RMSNorm with residual: x = combine(y, reverse_index, topk_weights)
    (+ extra), residual := x + residual (in place), out [T, H] = norm(residual). One kernel; the same rounding as
    kernels/combine.py then rms_norm (bit for bit). y [T K, H] (rows sorted by expert), reverse_index [T K] int32,
    topk_weights [T, K] fp32, extra / residual [T, H], weight [H]: contiguous, one dtype. No host sync."""
    num_tokens, top_k = topk_weights.shape
    if residual.dim() != 2 or residual.shape[0] != num_tokens:
        raise ValueError(f"residual must be [{num_tokens}, H], got {tuple(residual.shape)}")
    hidden = residual.shape[1]
    if out is None:
        out = torch.empty_like(residual)
    _check(residual, weight, residual, out)
    ok, reason = combine_supports(residual.dtype, hidden, top_k)
    if not ok:
        raise ValueError(f"combine + rms_norm kernel: {reason}")
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        raise ValueError(f"topk_weights must be a contiguous [T, K] fp32 tensor, got {topk_weights.dtype}")
    if y.shape != (num_tokens * top_k, hidden) or y.dtype != residual.dtype or not y.is_contiguous() \
            or y.data_ptr() % 16:
        raise ValueError(f"y must be a contiguous, 16-byte aligned [{num_tokens * top_k}, {hidden}] "
                         f"{residual.dtype} tensor, got {tuple(y.shape)} {y.dtype}")
    if reverse_index.shape != (num_tokens * top_k,) or reverse_index.dtype != torch.int32 \
            or not reverse_index.is_contiguous():
        raise ValueError(f"reverse_index must be a contiguous [{num_tokens * top_k}] int32 tensor")
    if extra is not None and (extra.shape != residual.shape or extra.dtype != residual.dtype
                              or not extra.is_contiguous() or extra.data_ptr() % 16):
        raise ValueError(f"extra must be a contiguous, 16-byte aligned [{num_tokens}, {hidden}] {residual.dtype} "
                         f"tensor, got {tuple(extra.shape)} {extra.dtype}")
    if num_tokens == 0:
        return out
    fn = compiled_rms_norm(residual.dtype, hidden, True, top_k, extra is not None)
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[residual.dtype]
    res_ptr = make_ptr(cdt, residual.data_ptr(), gmem, assumed_align=16)
    fn(
        res_ptr,  # x: not read with the combine prologue
        Int32(hidden),
        res_ptr,
        make_ptr(cdt, weight.data_ptr(), gmem, assumed_align=16),
        make_ptr(cdt, out.data_ptr(), gmem, assumed_align=16),
        Int32(num_tokens),
        Float32(eps),
        make_ptr(cdt, y.data_ptr(), gmem, assumed_align=16),
        make_ptr(Int32, reverse_index.data_ptr(), gmem, assumed_align=4),
        make_ptr(Float32, topk_weights.data_ptr(), gmem, assumed_align=4),
        make_ptr(cdt, (extra if extra is not None else y).data_ptr(), gmem, assumed_align=16),
        current_stream(),
    )
    return out


def combine_supports(dtype: torch.dtype, hidden_size: int, top_k: int) -> tuple[bool, str]:
    """Whether combine_rms_norm takes this problem: the norm's rows and kernels/combine.py's top-k bound."""
    ok, reason = supports(dtype, hidden_size)
    if not ok:
        return ok, reason
    if not 1 <= top_k <= COMBINE_MAX_TOP_K:
        return False, f"top_k={top_k} outside [1, {COMBINE_MAX_TOP_K}]"
    return True, "ok"
