"""Paged causal attention for prefill and chunked prefill, read in place from the paged KV cache.

Shape legend: N new tokens of the step (sequences concatenated), B sequences, h query heads, g KV heads
(r = h // g query heads per KV head), D head_dim, bs cache block size, NB cache blocks, MB table width.
    q [N, h, D] bf16, k_cache / v_cache [NB, bs, g, D] bf16, block_tables [B, MB] int32,
    query_start [B + 1] int32 (query_start[0] = 0), ctx_lens [B] int32 -> out [N, h, D] bf16
Sequence b owns query rows query_start[b] .. query_start[b + 1] - 1 (q_len of them) and ctx_lens[b] keys
(cached + new, the new ones already written). Its query i sits at position ctx_lens[b] - q_len + i and
attends to keys 0 .. that position. Key slot s lives at block block_tables[b, s // bs], row s % bs.
Softmax and both products accumulate in fp32 (light_moe.ops.attention.paged_attention is the reference).

FlashAttention-2 on the warp-level tensor cores (mma.sync m16n8k16, which sm_90a runs), one CTA of
4 warps per (query tile of BM rows, sequence, head): grid (ceil(max_query_len / BM), B, h). Tiles past a
sequence's q_len exit at once, so the grid needs only the host-known max_query_len, never a device value
(CUDA-graph capturable). The CTA walks its key tiles of BN = 64 slots from the last (diagonal) one down,
like the CUTLASS Ampere example: K of the next tile is in flight during the softmax and PV product of
this one, V during the QK^T product. A key tile is loaded through the block table with cp.async in
passes of 16 rows (128 threads x 16 bytes cover 16 rows of 64 columns); 16 <= bs makes each pass one
contiguous run of one cache block at row stride g * D, so no key is ever copied into a dense tensor.

Masking is needed only on the tiles that reach past the tile's first query position (at most
BM / BN + 1 of them); every other tile runs unmasked. Only the last key tile can hold slots >= ctx_len:
its rows there are zero-filled (the cache may hold NaN garbage past a sequence's end, and 0 * NaN would
reach the output through PV) and never read through the table, which may be narrower than that tile.

gpt-oss (kernels/attention_variant.py; compile-time options, absent from the plain kernel's code):
  * sinks [h]: the CTA's head's sink is read once and joins each row's denominator in the final normalisation:
    l = sum_j exp2((s_j - m) * scale log2 e) + exp2(sink log2 e - m * scale log2 e), m the row's running max.
  * sliding window W: row i (position p) sees keys p - W + 1 ... p. The CTA walks only the key tiles from the
    one holding its first row's first key (first_pos - W + 1) up; besides the causal tiles at the top, the tiles
    at the bottom that hold a key some row of the tile must not see (keys < last_pos - W + 1) are masked per
    row, the tiles between run unmasked. Every load zero-fills the rows below the first row's first key and
    never reads the table there (those blocks may be gone from the cache).
"""
# no `from __future__ import annotations`: the DSL reads the Constexpr annotations as objects, not strings
import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warp
from cutlass.cute.runtime import make_ptr

from light_moe.kernels import attention_variant
from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream, head_shape_problem, paged_attention_shapes

THREADS = 128  # 4 warps; each warp owns BM / 4 query rows of the tile
BLOCK_N = 64  # keys per tile
ROWS_PER_PASS = 16  # rows of a K/V tile one cp.async pass covers: 128 threads x 8 bf16, 8 threads a row
HEAD_DIMS = (64, 128)
MIN_BLOCK_SIZE = ROWS_PER_PASS  # a pass must not straddle two cache blocks
MAX_BLOCK_SIZE = 256
# Query rows per CTA. 128 (4 warps of 32 rows) halves the K/V reads per query but holds a 128 x D fp32
# accumulator in 128 threads: it spills registers and was no faster than 64 on the H100 for any of the
# benchmark cases (scripts/bench_prefill_attention.py), so 64 is the default and 128 stays selectable.
DEFAULT_BLOCK_M = 64
LOG2_E = 1.4426950408889634
_DTYPES = {torch.bfloat16: BFloat16}


def supports(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
             sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> tuple[bool, str]:
    """Whether the kernel takes these shapes, and gpt-oss's sinks [h] / sliding window where given."""
    problem = head_shape_problem(dtype, _DTYPES, num_heads, num_kv_heads, head_dim, HEAD_DIMS)
    if problem is not None:
        return False, problem
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        return False, f"block_size={block_size}: need a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]"
    return attention_variant.supports(sinks, sliding_window, num_heads)


class PrefillAttentionSm90:
    """Compiled once per (h, g, D, bs, BM, sink type, window); N, B, NB, MB, the grid, the scale and the window's
    width are run-time arguments. sink_type: the CuTe type of the sinks, None without."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, block_m: int,
                 sink_type=None, window: bool = False):
        assert head_dim in HEAD_DIMS and block_m in (64, 128) and num_heads % num_kv_heads == 0
        assert MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.block_m = block_m
        self.max_masked = block_m // BLOCK_N + 1  # key tiles that can reach past a query tile's first position
        self.sinks = sink_type is not None
        self.window = window

    @cute.jit
    def __call__(
        self,
        q_ptr: cute.Pointer,
        k_ptr: cute.Pointer,
        v_ptr: cute.Pointer,
        table_ptr: cute.Pointer,
        query_start_ptr: cute.Pointer,
        ctx_ptr: cute.Pointer,
        out_ptr: cute.Pointer,
        n_tokens: Int32,
        batch: Int32,
        num_blocks: Int32,
        max_blocks: Int32,
        m_tiles: Int32,
        scale_log2: Float32,
        sinks_ptr: cute.Pointer,
        window: Int32,
        stream: cuda.CUstream,
    ):
        h, g, d, bs = self.num_heads, self.num_kv_heads, self.head_dim, self.block_size
        dtype = BFloat16
        q = cute.make_tensor(q_ptr, cute.make_layout((n_tokens, h, d), stride=(h * d, d, 1)))
        out = cute.make_tensor(out_ptr, cute.make_layout((n_tokens, h, d), stride=(h * d, d, 1)))
        cache_layout = cute.make_layout((num_blocks, bs, g, d), stride=(bs * g * d, g * d, d, 1))
        k_cache = cute.make_tensor(k_ptr, cache_layout)
        v_cache = cute.make_tensor(v_ptr, cache_layout)
        tables = cute.make_tensor(table_ptr, cute.make_layout((batch, max_blocks), stride=(max_blocks, 1)))
        query_start = cute.make_tensor(query_start_ptr, cute.make_layout((batch + 1,)))
        ctx_lens = cute.make_tensor(ctx_ptr, cute.make_layout((batch,)))
        sinks = cute.make_tensor(sinks_ptr, cute.make_layout((h,)))  # read only with sinks

        # Shared memory: 8-row x 64-column atoms, 16-byte chunks XOR-swizzled by row so that ldmatrix of
        # eight rows hits eight different bank groups.
        atom = cute.make_composed_layout(cute.make_swizzle(3, 3, 3), 0, cute.make_layout((8, 64), stride=(64, 1)))
        sq_layout = cute.tile_to_shape(atom, (self.block_m, d), (0, 1))
        skv_layout = cute.tile_to_shape(atom, (BLOCK_N, d), (0, 1))

        @cute.struct
        class SharedStorage:
            sq: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sq_layout)], 1024]
            sk: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(skv_layout)], 1024]
            sv: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(skv_layout)], 1024]

        # Global -> shared: 16-byte cp.async, 8 threads per 64-column chunk of a row, 16 rows per pass.
        vec = 128 // dtype.width
        thr_layout = cute.make_layout((THREADS // 8, 8), stride=(8, 1))
        val_layout = cute.make_layout((1, vec))
        load_atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dtype,
                                        num_bits_per_copy=128)
        store_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128)
        gmem_load = cute.make_tiled_copy_tv(load_atom, thr_layout, val_layout)
        gmem_store = cute.make_tiled_copy_tv(store_atom, thr_layout, val_layout)

        tiled_mma = cute.make_tiled_mma(warp.MmaF16BF16Op(dtype, Float32, (16, 8, 16)), (THREADS // 32, 1, 1),
                                        permutation_mnk=(THREADS // 32 * 16, 16, 16))

        self.kernel(q, k_cache, v_cache, tables, query_start, ctx_lens, out, scale_log2, sq_layout, skv_layout,
                    gmem_load, gmem_store, tiled_mma, SharedStorage, sinks, window).launch(
            grid=(m_tiles, batch, h), block=(THREADS, 1, 1), stream=stream, use_pdl=True)

    @cute.kernel
    def kernel(
        self,
        q: cute.Tensor,
        k_cache: cute.Tensor,
        v_cache: cute.Tensor,
        tables: cute.Tensor,
        query_start: cute.Tensor,
        ctx_lens: cute.Tensor,
        out: cute.Tensor,
        scale_log2: Float32,
        sq_layout: cute.ComposedLayout,
        skv_layout: cute.ComposedLayout,
        gmem_load: cute.TiledCopy,
        gmem_store: cute.TiledCopy,
        tiled_mma: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
        sinks: cute.Tensor,
        window: Int32,
    ):
        await_inputs()
        bm, d = self.block_m, self.head_dim
        tidx, _, _ = cute.arch.thread_idx()
        m_tile_rev, seq, head = cute.arch.block_idx()
        m_tiles, _, _ = cute.arch.grid_dim()
        m_tile = m_tiles - 1 - m_tile_rev  # the costliest (latest) query tiles start first: a shorter tail
        q_start = query_start[seq]
        q_len = query_start[seq + 1] - q_start
        row0 = m_tile * bm
        if row0 < q_len:
            ctx_len = ctx_lens[seq]
            kv_head = head // self.group
            rows_valid = cutlass.min(q_len - row0, bm)
            first_pos = ctx_len - q_len + row0  # position of the tile's first query row
            last_pos = first_pos + rows_valid - 1
            n_tiles = last_pos // BLOCK_N + 1  # key tiles holding keys 0 .. last_pos
            n_unmasked = (first_pos + 1) // BLOCK_N  # key tiles wholly at or below first_pos
            # the last tile is always taken as masked, also where it needs no mask (one query row at the end of
            # a key tile): then n_tiles == n_unmasked, and the unmasked loop must not take it a second time
            n_masked = cutlass.max(n_tiles - n_unmasked, 1)  # <= self.max_masked
            bounds = ()  # the window's: (W, first key, first key tile)
            if cutlass.const_expr(self.window):
                lo_key = cutlass.max(first_pos - window + 1, 0)  # the first row's first key: no row sees below
                lo_tile = lo_key // BLOCK_N
                n_walk = n_tiles - lo_tile  # key tiles walked, from n_tiles - 1 down to lo_tile
                n_masked = cutlass.min(n_masked, n_walk)
                # keys below last_pos - W + 1 are outside the last row's window: the tiles that hold any are masked
                n_low = (cutlass.max(last_pos - window + 1, 0) + BLOCK_N - 1) // BLOCK_N - lo_tile
                n_low = cutlass.max(cutlass.min(n_low, n_walk - n_masked), 0)
                bounds = (window, lo_key, lo_tile)

            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(SharedStorage)
            sq = storage.sq.get_tensor(sq_layout)
            sk = storage.sk.get_tensor(skv_layout)
            sv = storage.sv.get_tensor(skv_layout)
            svt = cute.composition(sv, cute.make_layout((d, BLOCK_N), stride=(BLOCK_N, 1)))  # V^T view (D, BN)

            thr_load = gmem_load.get_slice(tidx)
            # Q tile: rows q_start + row0 .. of head `head`; rows past q_len belong to the next sequence
            gq = cute.local_tile(cute.domain_offset((q_start + row0, 0), q[None, head, None]), (bm, d), (0, 0))
            tq_g = thr_load.partition_S(gq)
            tq_s = thr_load.partition_D(sq)
            tq_c = thr_load.partition_S(cute.make_identity_tensor((bm, d)))
            tk_s = thr_load.partition_D(sk)
            tv_s = thr_load.partition_D(sv)
            tkv_c = thr_load.partition_S(cute.make_identity_tensor((BLOCK_N, d)))

            thr_mma = tiled_mma.get_slice(tidx)
            ts_rq = thr_mma.make_fragment_A(thr_mma.partition_A(sq))
            ts_rk = thr_mma.make_fragment_B(thr_mma.partition_B(sk))
            to_rvt = thr_mma.make_fragment_B(thr_mma.partition_B(svt))
            acc_o = cute.make_rmem_tensor(thr_mma.partition_shape_C((bm, d)), Float32)
            acc_o.fill(0.0)

            ldmatrix = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), BFloat16)
            ldmatrix_t = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), BFloat16)
            lds_q = cute.make_tiled_copy_A(ldmatrix, tiled_mma)
            lds_k = cute.make_tiled_copy_B(ldmatrix, tiled_mma)
            lds_v = cute.make_tiled_copy_B(ldmatrix_t, tiled_mma)  # V is [keys, D] in smem, the B operand V^T
            thr_lds_q = lds_q.get_slice(tidx)
            thr_lds_k = lds_k.get_slice(tidx)
            thr_lds_v = lds_v.get_slice(tidx)
            smem_views = (
                lds_q, thr_lds_q.partition_S(sq), thr_lds_q.retile(ts_rq),
                lds_k, thr_lds_k.partition_S(sk), thr_lds_k.retile(ts_rk),
                lds_v, thr_lds_v.partition_S(svt), thr_lds_v.retile(to_rvt),
            )

            # prologue: Q and the last (diagonal) K tile
            for m in cutlass.range_constexpr(cute.size(tq_s.shape[1])):
                if tq_c[0, m, 0][0] < rows_valid:
                    cute.copy(gmem_load, tq_g[None, m, None], tq_s[None, m, None])
                else:
                    tq_s[None, m, None].fill(0)
            kv = (k_cache, v_cache, tables, seq, kv_head, ctx_len, thr_load, tkv_c) + bounds[1:2]
            self.load_kv_tile(gmem_load, kv, 0, tk_s, n_tiles - 1, True)
            cute.arch.cp_async_commit_group()

            n_rows = acc_o.shape[0][0] * acc_o.shape[1]  # query rows this thread holds: 2 per m16 atom
            row_max = cute.make_rmem_tensor((n_rows,), Float32)
            row_sum = cute.make_rmem_tensor((n_rows,), Float32)
            row_max.fill(-Float32.inf)
            row_sum.fill(0.0)
            state = (thr_mma, tiled_mma, ts_rq, ts_rk, to_rvt, acc_o, row_max, row_sum, scale_log2, first_pos) + bounds
            loads = (gmem_load, kv, tk_s, tv_s)

            # masked tiles first (the highest one holds the diagonal and, alone, slots >= ctx_len)
            for t in cutlass.range_constexpr(self.max_masked):
                if cutlass.const_expr(t == 0):
                    self.one_key_tile(state, loads, smem_views, n_tiles - 1, True, True)
                else:
                    if t < n_masked:
                        self.one_key_tile(state, loads, smem_views, n_tiles - 1 - t, False, True)
            if cutlass.const_expr(self.window):  # unmasked tiles, then the window's masked ones at the bottom
                for t in cutlass.range(n_masked, n_walk - n_low, 1, unroll=1):
                    self.one_key_tile(state, loads, smem_views, n_tiles - 1 - t, False, False)
                for t in cutlass.range(n_walk - n_low, n_walk, 1, unroll=1):
                    self.one_key_tile(state, loads, smem_views, n_tiles - 1 - t, False, True)
            else:
                for t in cutlass.range(n_masked, n_tiles, 1, unroll=1):
                    self.one_key_tile(state, loads, smem_views, n_tiles - 1 - t, False, False)

            sink = ()
            if cutlass.const_expr(self.sinks):
                sink = (sinks[head].to(Float32) * LOG2_E, row_max, scale_log2)
            self.store_output(acc_o, row_sum, sq, sq_layout, out, q_start + row0, head, rows_valid,
                              gmem_store, tiled_mma, tidx, sink)

    @cute.jit
    def load_kv_tile(self, gmem_load: cute.TiledCopy, kv, which: cutlass.Constexpr, dst: cute.Tensor,
                     n_block: Int32, check_bounds: cutlass.Constexpr):
        """cp.async key tile n_block of K (which=0) or V (which=1) into dst, one 16-row pass per cache run.
        check_bounds: the tile may hold slots >= ctx_len (only the last one can); they are zero-filled and the
        table is read at most at the sequence's last block. With the window, slots below its first key (kv[8])
        are zero-filled too and the table is read from that key's block on."""
        k_cache, v_cache, tables, seq, kv_head, ctx_len, thr_load, tkv_c = kv[:8]
        cache = k_cache if cutlass.const_expr(which == 0) else v_cache
        bs = self.block_size
        for n in cutlass.range_constexpr(BLOCK_N // ROWS_PER_PASS):
            slot0 = n_block * BLOCK_N + n * ROWS_PER_PASS
            table_col = slot0 // bs
            if cutlass.const_expr(check_bounds):
                table_col = cutlass.min(table_col, (ctx_len - 1) // bs)
            if cutlass.const_expr(self.window):
                table_col = cutlass.max(table_col, kv[8] // bs)
            block = Int64(tables[seq, table_col])  # block * bs * g * D may pass 2^31 elements in a large cache
            run = cute.local_tile(cache[block, None, kv_head, None], (ROWS_PER_PASS, self.head_dim),
                                  ((slot0 % bs) // ROWS_PER_PASS, 0))
            src = thr_load.partition_S(run)
            if cutlass.const_expr(self.window):
                slot = n_block * BLOCK_N + tkv_c[0, n, 0][0]
                in_range = slot >= kv[8]
                if cutlass.const_expr(check_bounds):
                    in_range = in_range & (slot < ctx_len)
                if in_range:
                    cute.copy(gmem_load, src[None, 0, None], dst[None, n, None])
                else:
                    dst[None, n, None].fill(0)
            elif cutlass.const_expr(check_bounds):
                if n_block * BLOCK_N + tkv_c[0, n, 0][0] < ctx_len:
                    cute.copy(gmem_load, src[None, 0, None], dst[None, n, None])
                else:
                    dst[None, n, None].fill(0)
            else:
                cute.copy(gmem_load, src[None, 0, None], dst[None, n, None])

    @cute.jit
    def one_key_tile(self, state, loads, smem_views, n_block: Int32, is_first: cutlass.Constexpr,
                     masked: cutlass.Constexpr):
        """S = Q K^T for key tile n_block, online softmax, O += P V; prefetches K of tile n_block - 1 (with the
        window: unless n_block is the first key tile, state[12])."""
        thr_mma, tiled_mma, ts_rq, ts_rk, to_rvt, acc_o, row_max, row_sum, scale_log2, first_pos = state[:10]
        gmem_load, kv, tk_s, tv_s = loads
        lds_q, ts_sq, ts_rq_view, lds_k, ts_sk, ts_rk_view, lds_v, to_svt, to_rvt_view = smem_views

        acc_s = cute.make_rmem_tensor(thr_mma.partition_shape_C((self.block_m, BLOCK_N)), Float32)
        acc_s.fill(0.0)
        cute.arch.cp_async_wait_group(0)  # K of this tile landed (this thread's part) ...
        cute.arch.barrier()  # ... everyone's; and every warp is done with the previous tile's V
        self.load_kv_tile(gmem_load, kv, 1, tv_s, n_block, is_first)
        cute.arch.cp_async_commit_group()

        k_steps = cute.size(ts_sq.shape[2])
        cute.copy(lds_q, ts_sq[None, None, 0], ts_rq_view[None, None, 0])
        cute.copy(lds_k, ts_sk[None, None, 0], ts_rk_view[None, None, 0])
        for k in cutlass.range_constexpr(k_steps):
            if cutlass.const_expr(k + 1 < k_steps):  # fetch the next k-step's fragments during this mma
                cute.copy(lds_q, ts_sq[None, None, k + 1], ts_rq_view[None, None, k + 1])
                cute.copy(lds_k, ts_sk[None, None, k + 1], ts_rk_view[None, None, k + 1])
            cute.gemm(tiled_mma, acc_s, ts_rq[None, None, k], ts_rk[None, None, k], acc_s)

        cute.arch.cp_async_wait_group(0)  # V landed
        cute.arch.barrier()  # and every warp is done reading this K tile
        if cutlass.const_expr(self.window):
            if n_block > state[12]:
                self.load_kv_tile(gmem_load, kv, 0, tk_s, n_block - 1, False)
                cute.arch.cp_async_commit_group()
        else:
            if n_block > 0:
                self.load_kv_tile(gmem_load, kv, 0, tk_s, n_block - 1, False)
                cute.arch.cp_async_commit_group()

        self.online_softmax(thr_mma, acc_s, acc_o, row_max, row_sum, scale_log2, first_pos, n_block, is_first,
                            masked, state[10:11])

        # P (bf16) as the A operand: the m16n8 accumulator pairs of two n8 blocks form one m16k16 A fragment
        r_p = cute.make_fragment_like(acc_s, BFloat16)
        r_p.store(acc_s.load().to(BFloat16))
        split = cute.logical_divide(r_p.layout, (None, None, 2))
        p_layout = cute.make_layout(
            ((split.shape[0], split.shape[2][0]), split.shape[1], split.shape[2][1]),
            stride=((split.stride[0], split.stride[2][0]), split.stride[1], split.stride[2][1]),
        )
        to_rp = cute.make_tensor(r_p.iterator, p_layout)
        v_steps = cute.size(to_rp.shape[2])
        cute.copy(lds_v, to_svt[None, None, 0], to_rvt_view[None, None, 0])
        for k in cutlass.range_constexpr(v_steps):
            if cutlass.const_expr(k + 1 < v_steps):
                cute.copy(lds_v, to_svt[None, None, k + 1], to_rvt_view[None, None, k + 1])
            cute.gemm(tiled_mma, acc_o, to_rp[None, None, k], to_rvt[None, None, k], acc_o)

    @cute.jit
    def online_softmax(self, thr_mma, acc_s: cute.Tensor, acc_o: cute.Tensor, row_max: cute.Tensor,
                       row_sum: cute.Tensor, scale_log2: Float32, first_pos: Int32, n_block: Int32,
                       is_first: cutlass.Constexpr, masked: cutlass.Constexpr, window):
        """acc_s <- exp2((S - max) * scale * log2 e) with the running max; rescales acc_o and the (per-thread
        partial) row sums. A row may see no key in a masked tile: its max stays -inf and 0 stands in for it
        in the exponent, so nothing becomes NaN. window: (W,) with the window (masked tiles then also hide the
        keys <= position - W), else ()."""
        s_mn = _mn_view(acc_s)
        o_mn = _mn_view(acc_o)
        coords = None
        if cutlass.const_expr(masked):
            coords = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((self.block_m, BLOCK_N))))
        for r in cutlass.range_constexpr(cute.size(row_max)):
            if cutlass.const_expr(masked):
                # key n_block * BN + c is visible to row i iff it is <= first_pos + i
                limit = first_pos + coords[r, 0][0] - n_block * BLOCK_N
                for c in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                    if coords[0, c][1] > limit:
                        s_mn[r, c] = -Float32.inf
                    if cutlass.const_expr(self.window):
                        if coords[0, c][1] <= limit - window[0]:
                            s_mn[r, c] = -Float32.inf
            row = s_mn[r, None].load()
            new_max = _quad_max(row.reduce(cute.ReductionOp.MAX, -Float32.inf, 0))
            if cutlass.const_expr(not is_first):
                new_max = cute.arch.fmax(row_max[r], new_max)
            safe_max = 0.0 if new_max == -Float32.inf else new_max
            probs = cute.math.exp2(row * scale_log2 - safe_max * scale_log2, fastmath=True)
            total = probs.reduce(cute.ReductionOp.ADD, Float32.zero, 0)
            if cutlass.const_expr(not is_first):
                rescale = cute.math.exp2(row_max[r] * scale_log2 - safe_max * scale_log2, fastmath=True)
                total = total + row_sum[r] * rescale
                o_mn[r, None] = o_mn[r, None].load() * rescale
            row_max[r] = new_max
            row_sum[r] = total
            s_mn[r, None] = probs

    @cute.jit
    def store_output(self, acc_o: cute.Tensor, row_sum: cute.Tensor, sq: cute.Tensor, sq_layout, out: cute.Tensor,
                     first_row: Int32, head: Int32, rows_valid: Int32, gmem_store: cute.TiledCopy,
                     tiled_mma: cute.TiledMma, tidx: Int32, sink):
        """O / row sum -> bf16 -> shared memory (over Q) -> 16-byte stores of the tile's valid rows. sink:
        (sink * log2 e, row maxima, scale * log2 e) with sinks (the sink joins each row's sum), else ()."""
        bm, d = self.block_m, self.head_dim
        o_mn = _mn_view(acc_o)
        for r in cutlass.range_constexpr(cute.size(row_sum)):
            total = _quad_sum(row_sum[r])
            if cutlass.const_expr(self.sinks):
                # relative to the row's max of the logits: a sink far above them overflows the sum to inf, and
                # the row to 0, its limit
                sink_log2, row_max, scale_log2 = sink
                total = total + cute.math.exp2(sink_log2 - row_max[r] * scale_log2, fastmath=True)
            inv = 1.0 if total == 0.0 or total != total else cute.arch.rcp_approx(total)
            o_mn[r, None] = o_mn[r, None].load() * inv
        r_o = cute.make_fragment_like(acc_o, BFloat16)
        r_o.store(acc_o.load().to(BFloat16))
        so = cute.make_tensor(sq.iterator, sq_layout)
        sts = cute.make_tiled_copy_C(cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BFloat16), tiled_mma)
        thr_sts = sts.get_slice(tidx)
        cute.arch.barrier()  # every warp is done reading Q
        cute.copy(sts, thr_sts.retile(r_o), thr_sts.partition_D(so))
        cute.arch.barrier()

        thr_store = gmem_store.get_slice(tidx)
        go = cute.local_tile(cute.domain_offset((first_row, 0), out[None, head, None]), (bm, d), (0, 0))
        to_s = thr_store.partition_S(so)
        to_g = thr_store.partition_D(go)
        to_c = thr_store.partition_D(cute.make_identity_tensor((bm, d)))
        to_r = cute.make_fragment_like(to_g, BFloat16)
        cute.copy(gmem_store, to_s, to_r)
        for m in cutlass.range_constexpr(cute.size(to_r.shape[1])):
            if to_c[0, m, 0][0] < rows_valid:
                cute.copy(gmem_store, to_r[None, m, None], to_g[None, m, None])


def _mn_view(acc: cute.Tensor) -> cute.Tensor:
    """An mma.sync C-partitioned tensor ((2, 2), MMA_M, MMA_N) viewed as (rows, columns) of this thread:
    ((2, MMA_M), (2, MMA_N)); each m16n8 atom gives a thread 2 rows (g, g + 8) of 2 adjacent columns."""
    flat = cute.make_layout(acc.layout.shape)
    mn = cute.make_layout(
        ((flat.shape[0][1], flat.shape[1]), (flat.shape[0][0], flat.shape[2])),
        stride=((flat.stride[0][1], flat.stride[1]), (flat.stride[0][0], flat.stride[2])),
    )
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


def _quad_max(val: Float32) -> Float32:
    """Max over the 4 lanes of a quad, which together hold one accumulator row."""
    val = cute.arch.fmax(val, cute.arch.shuffle_sync_bfly(val, offset=2))
    return cute.arch.fmax(val, cute.arch.shuffle_sync_bfly(val, offset=1))


def _quad_sum(val: Float32) -> Float32:
    val = val + cute.arch.shuffle_sync_bfly(val, offset=2)
    return val + cute.arch.shuffle_sync_bfly(val, offset=1)


_compiled = CompileCache("prefill_attention")  # (h, g, D, bs, BM, sinks, window); never keyed on N, B, lengths, W


def make_compile_args(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, block_m: int,
                      stream=None, sinks_dtype: torch.dtype | None = None, window: bool = False):
    """(jit function, arguments) for cute.compile with placeholder pointers; every size is dynamic.
    sinks_dtype: the sinks' dtype (None: no sinks); window: a sliding window (its width is dynamic)."""
    gmem = cute.AddressSpace.gmem
    args = (
        make_ptr(BFloat16, 16, gmem, assumed_align=16),
        make_ptr(BFloat16, 16, gmem, assumed_align=16),
        make_ptr(BFloat16, 16, gmem, assumed_align=16),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        make_ptr(BFloat16, 16, gmem, assumed_align=16),
        Int32(1), Int32(1), Int32(1), Int32(1), Int32(1), Float32(1.0),
        attention_variant.placeholder_sinks_pointer(sinks_dtype), Int32(1),
        stream,
    )
    kernel = PrefillAttentionSm90(num_heads, num_kv_heads, head_dim, block_size, block_m,
                                  attention_variant.sink_type(sinks_dtype), window)
    return kernel, args


def compiled_prefill_attention(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, block_m: int,
                               sinks_dtype: torch.dtype | None = None, window: bool = False):
    key = (num_heads, num_kv_heads, head_dim, block_size, block_m, sinks_dtype, window)
    return _compiled.get(key, lambda: make_compile_args(*key[:5], current_stream(), *key[5:]))


def _check_int32(name: str, t: torch.Tensor, shape: tuple) -> None:
    if t.dtype != torch.int32 or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous int32 tensor of shape {list(shape)}, "
                         f"got {t.dtype} {list(t.shape)}")


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start: torch.Tensor, ctx_lens: torch.Tensor, max_query_len: int, scale: float,
                      out: torch.Tensor | None = None, block_m: int = DEFAULT_BLOCK_M, *,
                      sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """Causal paged attention of q [N, h, D] -> out [N, h, D] on the current stream (see the module docstring).

    max_query_len must be >= every q_len (it sizes the grid; rows of longer sequences would stay unwritten).
    Reads no device value on the host. block_m: query rows per CTA, 64 or 128. gpt-oss: sinks [h] (fp32 / bf16
    / fp16) join every softmax denominator; sliding_window W limits position p to the keys p - W + 1 ... p
    (ops.attention paged_attention_sinks)."""
    n_tokens, num_heads, head_dim, block_size, num_kv_heads = paged_attention_shapes(
        "prefill attention kernel", supports, q, k_cache, v_cache)
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [B, max_blocks], got {list(block_tables.shape)}")
    batch, max_blocks = block_tables.shape
    _check_int32("block_tables", block_tables, (batch, max_blocks))
    _check_int32("query_start", query_start, (batch + 1,))
    _check_int32("ctx_lens", ctx_lens, (batch,))
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {list(q.shape)} {q.dtype} tensor")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name} must be 16-byte aligned (cp.async / 128-bit stores)")
    attention_variant.check(sinks, sliding_window, num_heads, q.device)
    if n_tokens == 0 or batch == 0 or max_query_len <= 0:
        return out  # a zero grid dimension is an invalid launch
    if block_m not in (64, 128):
        raise ValueError(f"block_m={block_m}: 64 or 128")
    fn = compiled_prefill_attention(num_heads, num_kv_heads, head_dim, block_size, block_m,
                                    None if sinks is None else sinks.dtype, sliding_window is not None)
    gmem = cute.AddressSpace.gmem
    fn(
        make_ptr(BFloat16, q.data_ptr(), gmem, assumed_align=16),
        make_ptr(BFloat16, k_cache.data_ptr(), gmem, assumed_align=16),
        make_ptr(BFloat16, v_cache.data_ptr(), gmem, assumed_align=16),
        make_ptr(Int32, block_tables.data_ptr(), gmem, assumed_align=4),
        make_ptr(Int32, query_start.data_ptr(), gmem, assumed_align=4),
        make_ptr(Int32, ctx_lens.data_ptr(), gmem, assumed_align=4),
        make_ptr(BFloat16, out.data_ptr(), gmem, assumed_align=16),
        Int32(n_tokens), Int32(batch), Int32(k_cache.shape[0]), Int32(max_blocks),
        Int32(math.ceil(max_query_len / block_m)), Float32(scale * LOG2_E),
        attention_variant.sinks_pointer(sinks, out), Int32(sliding_window or 1),
        current_stream(),
    )
    return out
