"""Multi-head latent attention's rotary embedding fused with the latent-cache write, one kernel per call.

Shape legend: N tokens in the step, h query heads, Dn no-rope and R rotary dims of a query head, L latent dims
(kv_lora_rank), P table positions, S = num_blocks * block_size cache slots.
q [N, h * (Dn + R)] (rows may be strided), latent [N, L] (the normalised latent; rows may be strided), k_pe
[N, R] (the shared rotary key, a column slice of kv_a_proj_with_mqa's output), positions [N] int64, cos / sin
[P, R] fp32 (emb = cat(freqs, freqs), layers/rotary.py), latent_cache [num_blocks, block_size, L + R]
contiguous, slot_mapping [N] int64:

    q_out[t]                    = [q_nope[t], rope(q_pe[t])]   -> [N, h, Dn + R] contiguous
    latent_cache.view(S, L + R)[slot_mapping[t]] = [latent[t], rope(k_pe[t])]

rope is ops/reference.py's: rotate-half (apply_rope) or, with `interleave` (DeepSeek's weights), the pairs
(x0, x1), (x2, x3), ... rotated by the first half of the table and written de-interleaved (apply_rope_interleaved).
Each product is rounded to the activation dtype and then their sum, as the reference's ops round, so bf16
results match it bit for bit (the table values are rounded to the dtype first, as `.to(q.dtype)` does).

One CTA per token; its work items are the 16-byte vectors of q's no-rope part and of the latent (copies), and
one item per output vector pair of each rotary part (q's h heads and k_pe): threads stride over them. It
replaces the reference's dozen small torch ops per layer (gathers of the tables, splits, rotations, concats,
the index_copy), which at decode were each a launch of their own. No host sync: the token count is an
argument; padding rows of a CUDA graph must point at a valid slot.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass.cute as cute
import torch
from cutlass import Int32, Int64
from cutlass.cute.runtime import make_ptr

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream
from light_moe.kernels.rope_kv import (
    _DTYPES,
    TABLE_VEC,
    _vec,
    check_positions_and_tables,
    launch,
    rotate_vectors,
    slot_row,
    table_args,
    token_prologue,
)

MAX_THREADS = 512
MAX_HEADS = 128


def supports(dtype: torch.dtype, num_heads: int, nope_dim: int, rope_dim: int, latent_dim: int) -> tuple[bool, str]:
    """Whether the kernel takes this shape; the reason names what it does not take."""
    if dtype not in _DTYPES:
        return False, f"dtype {dtype} unsupported (bf16, fp16, fp32)"
    vec = _vec(dtype)
    if not 1 <= num_heads <= MAX_HEADS:
        return False, f"num_heads={num_heads} outside [1, {MAX_HEADS}]"
    if rope_dim <= 0 or rope_dim % (2 * vec) or rope_dim % (2 * TABLE_VEC):
        return False, f"rope dims {rope_dim}: need a positive multiple of {2 * vec} (two 16-byte vectors per pair)"
    if nope_dim < 0 or nope_dim % vec:
        return False, f"no-rope dims {nope_dim}: need a multiple of {vec} (16-byte vectors)"
    if latent_dim <= 0 or latent_dim % vec:
        return False, f"latent dims {latent_dim}: need a positive multiple of {vec}"
    return True, "ok"


class MlaRopeKVKernel:
    """Compiled once per (dtype, h, Dn, R, L, interleave); N, the row strides of q / latent / k_pe and P are
    run-time arguments. The cache is addressed by slot (its [S, L + R] view), so block_size is not a parameter."""

    def __init__(self, dtype, num_heads: int, nope_dim: int, rope_dim: int, latent_dim: int, interleave: bool):
        self.dtype = dtype
        self.num_heads, self.nope, self.rope, self.latent = num_heads, nope_dim, rope_dim, latent_dim
        self.interleave = interleave
        self.vec = 128 // dtype.width
        self.head_vecs = (nope_dim + rope_dim) // self.vec  # 16-byte vectors of one query head
        self.nope_vecs = nope_dim // self.vec
        self.pairs = rope_dim // 2 // self.vec  # output vector pairs (first half, second half) of one rotary part
        self.q_copy_items = num_heads * self.nope_vecs
        self.q_rope_items = num_heads * self.pairs
        self.latent_items = latent_dim // self.vec
        items = self.q_copy_items + self.q_rope_items + self.latent_items + self.pairs
        self.threads = min(MAX_THREADS, -(-items // 32) * 32)

    @cute.jit
    def __call__(
        self,
        q_ptr: cute.Pointer,
        latent_ptr: cute.Pointer,
        kpe_ptr: cute.Pointer,
        q_row_stride: Int32,
        latent_row_stride: Int32,
        kpe_row_stride: Int32,
        positions_ptr: cute.Pointer,
        cos_ptr: cute.Pointer,
        sin_ptr: cute.Pointer,
        n_positions: Int32,
        cache_ptr: cute.Pointer,
        slot_ptr: cute.Pointer,
        q_out_ptr: cute.Pointer,
        n_tokens: Int32,
        stream: cuda.CUstream,
    ):
        vec = self.vec
        q_width = self.num_heads * (self.nope + self.rope)

        def rows(ptr, stride, width):
            # row strides divisible by vec keep every row 16-byte aligned, which the 128-bit copies verify
            layout = cute.make_layout((n_tokens, width), stride=(cute.assume(stride, divby=vec), 1))
            return cute.make_tensor(ptr, layout)

        q = rows(q_ptr, q_row_stride, q_width)
        latent = rows(latent_ptr, latent_row_stride, self.latent)
        k_pe = rows(kpe_ptr, kpe_row_stride, self.rope)
        positions = cute.make_tensor(positions_ptr, cute.make_layout((n_tokens,)))
        slots = cute.make_tensor(slot_ptr, cute.make_layout((n_tokens,)))
        cos = cute.make_tensor(cos_ptr, cute.make_layout((n_positions, self.rope), stride=(self.rope, 1)))
        sin = cute.make_tensor(sin_ptr, cute.make_layout((n_positions, self.rope), stride=(self.rope, 1)))
        q_out = cute.make_tensor(q_out_ptr, cute.make_layout((n_tokens, q_width), stride=(q_width, 1)))
        self.kernel(q, latent, k_pe, positions, cos, sin, cache_ptr, slots, q_out).launch(
            grid=(n_tokens, 1, 1), block=(self.threads, 1, 1), stream=stream, use_pdl=True)

    def _slot_row(self, cache_ptr: cute.Pointer, slot: Int64):
        """The [L + R] row of one cache slot as 16-byte vectors."""
        return slot_row(self.dtype, cache_ptr, slot, self.latent + self.rope)

    def _rotate(self, src, src_base, dst, dst_base, pair, cos_row, sin_row, copy_x, copy_t):
        """Output vectors `pair` of the first and of the second half of one rotary part: src / dst are rows as
        16-byte vectors and *_base the index of the part's first vector in them; cos_row / sin_row one table
        row as 4-float vectors. Rotate-half reads input vectors pair and pairs + pair and the table's two
        halves; interleaved reads input vectors 2 pair and 2 pair + 1 (vec (even, odd) pairs) and the table's
        first half for both outputs. A plain Python helper: its loops and branches unroll while tracing."""
        dtype, vec, pairs = self.dtype, self.vec, self.pairs
        a_in = cute.make_rmem_tensor((vec,), dtype)  # the first members of this pair item's vec rotations
        b_in = cute.make_rmem_tensor((vec,), dtype)  # their partners
        if self.interleave:  # the 2 vec inputs x[2e], x[2e + 1] of output e, from two consecutive vectors
            lo = cute.make_rmem_tensor((vec,), dtype)
            hi = cute.make_rmem_tensor((vec,), dtype)
            cute.copy(copy_x, src[None, src_base + 2 * pair], lo)
            cute.copy(copy_x, src[None, src_base + 2 * pair + 1], hi)
            for e in range(vec):
                part = lo if 2 * e < vec else hi
                a_in[e] = part[2 * e % vec]
                b_in[e] = part[(2 * e + 1) % vec]
        else:
            cute.copy(copy_x, src[None, src_base + pair], a_in)
            cute.copy(copy_x, src[None, src_base + pairs + pair], b_in)
        per_vec = vec // TABLE_VEC
        hi_start = (0 if self.interleave else self.rope // 2 // TABLE_VEC) + pair * per_vec  # interleaved: 1st half
        out_lo = cute.make_rmem_tensor((vec,), dtype)
        out_hi = cute.make_rmem_tensor((vec,), dtype)
        rotate_vectors(dtype, a_in, b_in, cos_row, sin_row, pair * per_vec, hi_start, copy_t, out_lo, out_hi)
        cute.copy(copy_x, out_lo, dst[None, dst_base + pair])
        cute.copy(copy_x, out_hi, dst[None, dst_base + pairs + pair])

    @cute.kernel
    def kernel(self, q: cute.Tensor, latent: cute.Tensor, k_pe: cute.Tensor, positions: cute.Tensor,
               cos: cute.Tensor, sin: cute.Tensor, cache_ptr: cute.Pointer, slots: cute.Tensor, q_out: cute.Tensor):
        await_inputs()
        vec, pairs, nope_vecs, head_vecs = self.vec, self.pairs, self.nope_vecs, self.head_vecs
        q_copy, q_rope, latent_items = self.q_copy_items, self.q_rope_items, self.latent_items
        tidx, _, _ = cute.arch.thread_idx()
        token, slot, copy_x, copy_t, cos_row, sin_row = token_prologue(self.dtype, positions, slots, cos, sin)
        q_row = cute.zipped_divide(q[token, None], (vec,))
        q_out_row = cute.zipped_divide(q_out[token, None], (vec,))
        frag = cute.make_rmem_tensor((vec,), self.dtype)

        for item in range(tidx, q_copy + q_rope + latent_items + pairs, self.threads):
            if item < q_copy:  # q's no-rope vectors, copied (traced even without any: Dn = 0 divides by 1)
                at = (item // max(nope_vecs, 1)) * head_vecs + item % max(nope_vecs, 1)
                cute.copy(copy_x, q_row[None, at], frag)
                cute.copy(copy_x, frag, q_out_row[None, at])
            elif item < q_copy + q_rope:  # q's rotary part of one head
                r = item - q_copy
                base = (r // pairs) * head_vecs + nope_vecs
                self._rotate(q_row, base, q_out_row, base, r % pairs, cos_row, sin_row, copy_x, copy_t)
            elif item < q_copy + q_rope + latent_items:  # the latent into the cache row
                at = item - q_copy - q_rope
                cute.copy(copy_x, cute.zipped_divide(latent[token, None], (vec,))[None, at], frag)
                cute.copy(copy_x, frag, self._slot_row(cache_ptr, slot)[None, at])
            else:  # the rotated shared key after it
                self._rotate(cute.zipped_divide(k_pe[token, None], (vec,)), 0, self._slot_row(cache_ptr, slot),
                             self.latent // vec, item - q_copy - q_rope - latent_items, cos_row, sin_row, copy_x,
                             copy_t)


_compiled = CompileCache("mla_rope_kv")  # (dtype, h, Dn, R, L, interleave) -> compiled function; never keyed on N


def make_compile_args(dtype: torch.dtype, num_heads: int, nope_dim: int, rope_dim: int, latent_dim: int,
                      interleave: bool, stream=None):
    """(jit function, arguments) for cute.compile with placeholder pointers; N, strides and P are dynamic."""
    gmem = cute.AddressSpace.gmem
    cdt = _DTYPES[dtype]

    def act():
        return make_ptr(cdt, 16, gmem, assumed_align=16)

    args = (
        act(), act(), act(),
        Int32(num_heads * (nope_dim + rope_dim)), Int32(latent_dim), Int32(latent_dim + rope_dim),
        *table_args(),
        act(),
        make_ptr(Int64, 16, gmem, assumed_align=8),
        act(),
        Int32(1),
        stream,
    )
    return MlaRopeKVKernel(cdt, num_heads, nope_dim, rope_dim, latent_dim, interleave), args


def compiled_mla_rope_write(dtype: torch.dtype, num_heads: int, nope_dim: int, rope_dim: int, latent_dim: int,
                            interleave: bool):
    key = (dtype, num_heads, nope_dim, rope_dim, latent_dim, bool(interleave))
    return _compiled.get(key, lambda: make_compile_args(*key, current_stream()))


def _rows_ok(name: str, t: torch.Tensor, n: int, width: int, dtype: torch.dtype) -> None:
    vec = _vec(dtype)
    if t.dim() != 2 or t.shape != (n, width):
        raise ValueError(f"{name} must be [{n}, {width}], got {tuple(t.shape)}")
    if t.dtype != dtype or t.stride(1) != 1 or t.stride(0) % vec or t.data_ptr() % 16:
        raise ValueError(f"{name} must be {dtype} with a contiguous last dim, a row stride that is a multiple of "
                         f"{vec} and a 16-byte aligned start; got {t.dtype} strides {t.stride()}")
    if n * t.stride(0) >= 2**31:
        raise ValueError(f"{name}: N * row stride must stay below 2^31 elements")


def _check(q, latent, k_pe, positions, cos, sin, latent_cache, slot_mapping, q_out) -> tuple[int, int, int, int]:
    """Validates the call (q as [N, h, Dn + R]); returns (h, Dn, R, L)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [N, h, Dn + R], got {tuple(q.shape)}")
    n, h, qk_dim = q.shape
    if k_pe.dim() != 2 or latent.dim() != 2 or latent_cache.dim() != 3:
        raise ValueError(f"k_pe [N, R], latent [N, L] and latent_cache [blocks, block_size, L + R] expected, got "
                         f"{tuple(k_pe.shape)}, {tuple(latent.shape)}, {tuple(latent_cache.shape)}")
    rope, lat = k_pe.shape[1], latent.shape[1]
    nope = qk_dim - rope
    ok, reason = supports(q.dtype, h, nope, rope, lat)
    if not ok:
        raise ValueError(f"mla_rope_write kernel: {reason}")
    if latent_cache.shape[2] != lat + rope:
        raise ValueError(f"latent_cache rows must hold L + R = {lat + rope}, got {latent_cache.shape[2]}")
    if q.stride(2) != 1 or q.stride(1) != qk_dim:
        raise ValueError(f"q's heads must be packed rows (strides [*, {qk_dim}, 1]), got {q.stride()}")
    _rows_ok("q", q.view(n, h * qk_dim) if n else q.reshape(0, h * qk_dim), n, h * qk_dim, q.dtype)
    _rows_ok("latent", latent, n, lat, q.dtype)
    _rows_ok("k_pe", k_pe, n, rope, q.dtype)
    if latent_cache.dtype != q.dtype or not latent_cache.is_contiguous() or latent_cache.data_ptr() % 16:
        raise ValueError(f"latent_cache must be a contiguous, 16-byte aligned {q.dtype} tensor")
    check_positions_and_tables(n, positions, slot_mapping, cos, sin, rope)
    if q_out.shape != q.shape or q_out.dtype != q.dtype or not q_out.is_contiguous() or q_out.data_ptr() % 16:
        raise ValueError(f"q_out must be a contiguous {tuple(q.shape)} {q.dtype} tensor, got {tuple(q_out.shape)}")
    return h, nope, rope, lat


def mla_rope_write(q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, latent_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   interleave: bool, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """ops/reference.py mla_rope_write on the current stream: q with its rotary part rotated -> q_out [N, h, Dn + R];
    [latent, rotated k_pe] written to the latent cache at slot_mapping. Positions must lie in [0, P) and slots
    in [0, S) (not checked: no host sync)."""
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    h, nope, rope, lat = _check(q, latent, k_pe, positions, cos, sin, latent_cache, slot_mapping, q_out)
    n = q.shape[0]
    if n == 0:
        return q_out
    fn = compiled_mla_rope_write(q.dtype, h, nope, rope, lat, interleave)
    launch(fn, (q, latent, k_pe), (latent_cache,), positions, cos, sin, slot_mapping, q_out)
    return q_out
