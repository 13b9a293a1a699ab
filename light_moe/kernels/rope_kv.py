"""Rotary embedding of q and k fused with the paged KV-cache write, one kernel per call.

Shape legend: N tokens in the step, h query heads, g KV heads, D head_dim, P table positions,
S = num_blocks * block_size cache slots.
q [N, h*D], k [N, g*D], v [N, g*D]: 2-D views whose rows may be strided (column slices of one fused qkv
[N, (h+2g)*D] buffer), last dim contiguous; positions [N] int64; cos, sin [P, D] fp32 (light_moe/layers/
rotary.py: emb = cat(freqs, freqs)); k_cache, v_cache [num_blocks, block_size, g, D] contiguous;
slot_mapping [N] int64 (slot = block * block_size + offset).

    q_out[t]              = rope(q[t])    -> [N, h, D] contiguous
    k_cache.view(S, g, D)[slot_mapping[t]] = rope(k[t]),  v_cache...[slot_mapping[t]] = v[t]

rope is the HF rotate-half form with torch's rounding per op (layers/rotary.py in the activation dtype):
c = cos[pos].to(dtype), s = sin[pos].to(dtype), out = q * c + rotate_half(q) * s, each product rounded to
dtype, then the sum rounded; so bf16 results match the reference bit for bit.

One CTA per token. Its work items are (head, pair-vector) for the rotations, each reading the 16-byte vector
at d and the one at d + D/2 of one head, plus one item per 16-byte vector of v; threads stride over them.
No host sync: the token count is an argument, padding rows of a CUDA graph must point at a valid slot.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float16, Float32, Int32, Int64
from cutlass.cute.runtime import make_ptr

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream, head_shape_problem
from light_moe.kernels.rms_norm import mul_rn

_DTYPES = {torch.bfloat16: BFloat16, torch.float16: Float16, torch.float32: Float32}
HEAD_DIMS = (64, 128)
MAX_THREADS = 512
TABLE_VEC = 4  # fp32 per 16-byte access of the cos/sin tables


def _vec(dtype: torch.dtype) -> int:
    return 16 // dtype.itemsize


def supports(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
             block_size: int) -> tuple[bool, str]:
    problem = head_shape_problem(dtype, _DTYPES, num_heads, num_kv_heads, head_dim, HEAD_DIMS)
    if problem is not None:
        return False, problem
    if block_size <= 0:
        return False, f"block_size={block_size} must be positive"
    return True, "ok"


def slot_row(dtype, cache_ptr: cute.Pointer, slot: Int64, width: int):
    """The `width`-element row of one cache slot (a cache addressed as [S, width]) as 16-byte vectors; the
    offset is formed in 64 bits because S * width may pass 2^31 elements. Traced inline (device side)."""
    addr = cache_ptr.toint() + slot * (width * (dtype.width // 8))
    row_ptr = cute.make_ptr(dtype, addr, cute.AddressSpace.gmem, assumed_align=16)
    row = cute.make_tensor(row_ptr, cute.make_layout((width,)))
    return cute.zipped_divide(row, (128 // dtype.width,))


def check_positions_and_tables(n: int, positions, slot_mapping, cos, sin, dim: int) -> None:
    """The host checks every rotary + cache-write wrapper shares: positions and slot_mapping contiguous [n] int64,
    cos and sin one contiguous, 16-byte aligned [P, dim] fp32 shape with P * dim < 2^31."""
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (n,) or t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{n}] int64 tensor, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != dim or t.dtype != torch.float32 or not t.is_contiguous() \
                or t.data_ptr() % 16:
            raise ValueError(f"{name} must be a contiguous [P, {dim}] fp32 tensor, got {tuple(t.shape)} {t.dtype}")
    if cos.shape != sin.shape or cos.shape[0] * dim >= 2**31:
        raise ValueError(f"cos and sin must have one shape [P, {dim}] with P * {dim} < 2^31")


def table_args(positions: torch.Tensor | None = None, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> tuple:
    """The launch arguments every rotary + cache-write kernel takes for its tables: (positions, cos, sin pointers,
    P); with no tensors, the placeholders make_compile_args compiles with."""
    gmem = cute.AddressSpace.gmem
    if positions is None:
        return (make_ptr(Int64, 16, gmem, assumed_align=8), make_ptr(Float32, 16, gmem, assumed_align=16),
                make_ptr(Float32, 16, gmem, assumed_align=16), Int32(4096))
    return (make_ptr(Int64, positions.data_ptr(), gmem, assumed_align=8),
            make_ptr(Float32, cos.data_ptr(), gmem, assumed_align=16),
            make_ptr(Float32, sin.data_ptr(), gmem, assumed_align=16), Int32(cos.shape[0]))


def launch(fn, rows: tuple, caches: tuple, positions, cos, sin, slot_mapping, q_out) -> None:
    """Calls a compiled rotary + cache-write kernel with the argument order they all share: the activation rows
    (pointers, then row strides), the tables, the caches, the slots, q_out, N, the stream."""
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[q_out.dtype]

    def act(t):
        return make_ptr(cdt, t.data_ptr(), gmem, assumed_align=16)

    fn(*(act(t) for t in rows), *(Int32(t.stride(0)) for t in rows), *table_args(positions, cos, sin),
       *(act(t) for t in caches), make_ptr(Int64, slot_mapping.data_ptr(), gmem, assumed_align=8), act(q_out),
       Int32(rows[0].shape[0]), current_stream())


def rotate_vectors(dtype, x_lo, x_hi, cos_row, sin_row, lo_start: int, hi_start, copy_t, out_lo, out_hi) -> None:
    """One rotation of vec elements: out_lo = x_lo c_lo - x_hi s_lo, out_hi = x_hi c_hi + x_lo s_hi, where the
    c / s of out_lo start at table vector lo_start of cos_row / sin_row (4-float vectors) and those of out_hi at
    hi_start. Rounded as torch's ops round in the activation dtype: the table values first (`.to(dtype)`), then
    each product, then the sum, so bf16 results match the reference bit for bit. out_* may be x_* (each element
    is read before it is written). Traced inline (device side): its loops unroll."""
    vec = 128 // dtype.width
    tables = cute.make_rmem_tensor((TABLE_VEC, vec // TABLE_VEC, 4), Float32)  # c_lo, c_hi, s_lo, s_hi
    for t, (table, start) in enumerate(((cos_row, lo_start), (cos_row, hi_start), (sin_row, lo_start),
                                        (sin_row, hi_start))):
        for j in range(vec // TABLE_VEC):
            cute.copy(copy_t, table[None, start + j], tables[None, j, t])

    def rnd(val):  # torch's rounding of one op's fp32 result to the activation dtype
        if dtype is Float32:
            return val
        return val.to(dtype).to(Float32)

    for e in range(vec):
        a, b = x_lo[e].to(Float32), x_hi[e].to(Float32)
        i, j = e % TABLE_VEC, e // TABLE_VEC
        c_lo, c_hi = rnd(tables[i, j, 0]), rnd(tables[i, j, 1])
        s_lo, s_hi = rnd(tables[i, j, 2]), rnd(tables[i, j, 3])
        # rotate_half(x) = (-x_hi, x_lo); -(b * s) rounds like (-b) * s
        out_lo[e] = (rnd(mul_rn(a, c_lo)) - rnd(mul_rn(b, s_lo))).to(dtype)
        out_hi[e] = (rnd(mul_rn(b, c_hi)) + rnd(mul_rn(a, s_hi))).to(dtype)


def token_prologue(dtype, positions, slots, cos, sin):
    """What a one-CTA-per-token rotary kernel starts from: (token, its cache slot in 64 bits, the 16-byte copy
    atoms of activations and of the fp32 tables, the token's cos and sin rows as 4-float vectors). Traced inline."""
    token, _, _ = cute.arch.block_idx()
    pos = Int32(positions[token])
    slot = Int64(slots[token])
    copy_x = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128)
    copy_t = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Float32, num_bits_per_copy=128)
    return (token, slot, copy_x, copy_t, cute.zipped_divide(cos[pos, None], (TABLE_VEC,)),
            cute.zipped_divide(sin[pos, None], (TABLE_VEC,)))


class RopeKVKernel:
    """Compiled once per (dtype, h, g, D, block_size); N, the row strides of q/k/v and P are run-time
    arguments. The cache is addressed by slot (its [S, g, D] view), so block_size only names the config."""

    def __init__(self, dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        self.dtype = dtype
        self.num_heads, self.num_kv_heads, self.head_dim, self.block_size = (
            num_heads, num_kv_heads, head_dim, block_size)
        self.vec = 128 // dtype.width
        self.pairs = head_dim // 2 // self.vec  # 16-byte vectors in half a head
        self.q_items = num_heads * self.pairs
        self.k_items = num_kv_heads * self.pairs
        self.v_items = num_kv_heads * head_dim // self.vec
        items = self.q_items + self.k_items + self.v_items
        self.threads = min(MAX_THREADS, -(-items // 32) * 32)

    @cute.jit
    def __call__(
        self,
        q_ptr: cute.Pointer,
        k_ptr: cute.Pointer,
        v_ptr: cute.Pointer,
        q_row_stride: Int32,
        k_row_stride: Int32,
        v_row_stride: Int32,
        positions_ptr: cute.Pointer,
        cos_ptr: cute.Pointer,
        sin_ptr: cute.Pointer,
        n_positions: Int32,
        k_cache_ptr: cute.Pointer,
        v_cache_ptr: cute.Pointer,
        slot_ptr: cute.Pointer,
        q_out_ptr: cute.Pointer,
        n_tokens: Int32,
        stream: cuda.CUstream,
    ):
        h, g, d, vec = self.num_heads, self.num_kv_heads, self.head_dim, self.vec

        def rows(ptr, stride, width):
            # row strides divisible by vec keep every row 16-byte aligned, which the 128-bit copies verify
            layout = cute.make_layout((n_tokens, width), stride=(cute.assume(stride, divby=vec), 1))
            return cute.make_tensor(ptr, layout)

        q, k, v = rows(q_ptr, q_row_stride, h * d), rows(k_ptr, k_row_stride, g * d), rows(v_ptr, v_row_stride, g * d)
        positions = cute.make_tensor(positions_ptr, cute.make_layout((n_tokens,)))
        slots = cute.make_tensor(slot_ptr, cute.make_layout((n_tokens,)))
        cos = cute.make_tensor(cos_ptr, cute.make_layout((n_positions, d), stride=(d, 1)))
        sin = cute.make_tensor(sin_ptr, cute.make_layout((n_positions, d), stride=(d, 1)))
        q_out = cute.make_tensor(q_out_ptr, cute.make_layout((n_tokens, h * d), stride=(h * d, 1)))
        self.kernel(q, k, v, positions, cos, sin, k_cache_ptr, v_cache_ptr, slots, q_out).launch(
            grid=(n_tokens, 1, 1), block=(self.threads, 1, 1), stream=stream, use_pdl=True)

    def _slot_row(self, cache_ptr: cute.Pointer, slot: Int64):
        """The [g*D] row of one cache slot as 16-byte vectors."""
        return slot_row(self.dtype, cache_ptr, slot, self.num_kv_heads * self.head_dim)

    def _rotate(self, src, dst, head, pair, cos_row, sin_row, copy_x, copy_t):
        """dst = rope(src) for the vector `pair` of the first half of `head` and its partner in the second
        half; src/dst are one row as 16-byte vectors, cos_row/sin_row one table row as 4-float vectors.
        A plain Python helper (not preprocessed by the DSL): its loops and branches unroll while tracing."""
        vec, pairs = self.vec, self.pairs
        lo = head * 2 * pairs + pair
        hi = lo + pairs
        x_lo = cute.make_rmem_tensor((vec,), self.dtype)
        x_hi = cute.make_rmem_tensor((vec,), self.dtype)
        cute.copy(copy_x, src[None, lo], x_lo)
        cute.copy(copy_x, src[None, hi], x_hi)
        start = pair * (vec // TABLE_VEC)
        rotate_vectors(self.dtype, x_lo, x_hi, cos_row, sin_row, start, self.head_dim // 2 // TABLE_VEC + start,
                       copy_t, x_lo, x_hi)
        cute.copy(copy_x, x_lo, dst[None, lo])
        cute.copy(copy_x, x_hi, dst[None, hi])

    @cute.kernel
    def kernel(self, q: cute.Tensor, k: cute.Tensor, v: cute.Tensor, positions: cute.Tensor, cos: cute.Tensor,
               sin: cute.Tensor, k_cache_ptr: cute.Pointer, v_cache_ptr: cute.Pointer, slots: cute.Tensor,
               q_out: cute.Tensor):
        await_inputs()
        vec, pairs = self.vec, self.pairs
        q_items, k_items, v_items = self.q_items, self.k_items, self.v_items
        tidx, _, _ = cute.arch.thread_idx()
        token, slot, copy_x, copy_t, cos_row, sin_row = token_prologue(self.dtype, positions, slots, cos, sin)

        for item in range(tidx, q_items + k_items + v_items, self.threads):
            if item < q_items:
                self._rotate(cute.zipped_divide(q[token, None], (vec,)), cute.zipped_divide(q_out[token, None], (vec,)),
                             item // pairs, item % pairs, cos_row, sin_row, copy_x, copy_t)
            elif item < q_items + k_items:
                kv_item = item - q_items
                self._rotate(cute.zipped_divide(k[token, None], (vec,)), self._slot_row(k_cache_ptr, slot),
                             kv_item // pairs, kv_item % pairs, cos_row, sin_row, copy_x, copy_t)
            else:
                v_vec = item - q_items - k_items
                frag = cute.make_rmem_tensor((vec,), self.dtype)
                cute.copy(copy_x, cute.zipped_divide(v[token, None], (vec,))[None, v_vec], frag)
                cute.copy(copy_x, frag, self._slot_row(v_cache_ptr, slot)[None, v_vec])


_compiled = CompileCache("rope_kv")  # (dtype, h, g, D, block_size) -> compiled function; never keyed on N


def make_compile_args(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                      stream=None):
    """(jit function, arguments) for cute.compile with placeholder pointers; N, strides and P are dynamic."""
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[dtype]

    def act():
        return make_ptr(cdt, 16, gmem, assumed_align=16)

    fused_stride = (num_heads + 2 * num_kv_heads) * head_dim
    args = (
        act(), act(), act(),
        Int32(fused_stride), Int32(fused_stride), Int32(fused_stride),
        *table_args(),
        act(), act(),
        make_ptr(Int64, 16, gmem, assumed_align=8),
        act(),
        Int32(1),
        stream,
    )
    return RopeKVKernel(cdt, num_heads, num_kv_heads, head_dim, block_size), args


def compiled_rope_write_kv(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
    key = (dtype, num_heads, num_kv_heads, head_dim, block_size)
    return _compiled.get(key, lambda: make_compile_args(*key, current_stream()))


def _check(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_out) -> tuple[int, int, int, int]:
    """Validates the call; returns (h, g, D, block_size)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [blocks, block_size, g, D], got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    _, block_size, g, d = k_cache.shape
    n = q.shape[0]
    if q.dim() != 2 or q.shape[1] % d:
        raise ValueError(f"q must be [N, h*D] with D={d}, got {tuple(q.shape)}")
    h = q.shape[1] // d
    ok, reason = supports(q.dtype, h, g, d, block_size)
    if not ok:
        raise ValueError(f"rope_write_kv kernel: {reason}")
    vec = _vec(q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 2 or t.shape != (n, g * d):
            raise ValueError(f"{name} must be [{n}, {g * d}], got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != q.dtype or t.stride(1) != 1 or t.stride(0) % vec or t.data_ptr() % 16:
            raise ValueError(f"{name} must be {q.dtype} with a contiguous last dim, a row stride that is a multiple "
                             f"of {vec} and a 16-byte aligned start; got {t.dtype} strides {t.stride()}")
        if n * t.stride(0) >= 2**31:
            raise ValueError(f"{name}: N * row stride must stay below 2^31 elements")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"{name} must be a contiguous, 16-byte aligned {q.dtype} tensor")
    check_positions_and_tables(n, positions, slot_mapping, cos, sin, d)
    if q_out.shape != (n, h, d) or q_out.dtype != q.dtype or not q_out.is_contiguous() or q_out.data_ptr() % 16:
        raise ValueError(f"q_out must be a contiguous [{n}, {h}, {d}] {q.dtype} tensor, got {tuple(q_out.shape)}")
    return h, g, d, block_size


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  q_out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotated q -> q_out [N, h, D]; rotated k and v written to the caches at slot_mapping, on the current
    stream. Positions must lie in [0, P) and slots in [0, S) (not checked: no host sync)."""
    if q_out is None:
        d = k_cache.shape[-1]
        q_out = torch.empty(q.shape[0], q.shape[1] // d, d, dtype=q.dtype, device=q.device)
    h, g, d, block_size = _check(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_out)
    n = q.shape[0]
    if n == 0:
        return q_out
    fn = compiled_rope_write_kv(q.dtype, h, g, d, block_size)
    launch(fn, (q, k, v), (k_cache, v_cache), positions, cos, sin, slot_mapping, q_out)
    return q_out
