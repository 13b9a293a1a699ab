"""Device helpers both grouped GEMMs share (grouped_gemm.py: bf16 weights by TMA, w4a16_gemm.py: int4 weights in
registers), traced inline into their kernels: the persistent tile schedule, the producer's token-row gather and
its full-barrier signalling, the consumers' wait, and the epilogue (registers -> shared staging tile -> 16-byte
stores of the valid rows).

Shape legend: E experts, M routed rows sorted by expert (rows of expert e are expert_offsets[e]:expert_offsets[e+1]),
tile_t token rows per tile (wgmma N), w_tiles weight tiles per expert (N / tile_w).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from light_moe.kernels.expert_epilogue import DEFAULT_EPILOGUE, gated_activation
from light_moe.kernels.gemm_host import TILE_K, VEC


@dsl_user_op
def prefetch_l2(addr: Int64, num_bytes: int, *, loc=None, ip=None) -> None:
    """cp.async.bulk.prefetch.L2 of num_bytes (a multiple of 16) from global address addr (16-byte aligned): a hint,
    nothing waits for it and nothing is written to shared memory."""
    llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Int32(num_bytes).ir_value(loc=loc, ip=ip)],
                    "cp.async.bulk.prefetch.L2.global [$0], $1;", "l,r", has_side_effects=True,
                    is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@cute.jit
def build_tile_schedule(expert_offsets: cute.Tensor, s_rows: cute.Tensor, s_prefix: cute.Tensor, lane: Int32,
                        n_exp: cutlass.Constexpr, tile_t: cutlass.Constexpr, w_tiles: cutlass.Constexpr):
    """Warp 0 of a CTA (shared with the W4A16 kernel): s_rows[e] = first routed row of expert e (s_rows[E]: the
    total), s_prefix[e] = persistent tiles before expert e, where expert e has ceil(rows_e / tile_t) *
    w_tiles tiles (s_prefix[E]: all tiles). A warp-wide inclusive scan over per-lane partial sums."""
    per_lane = (n_exp + 31) // 32
    counts = cute.make_rmem_tensor((per_lane,), Int32)
    lane_sum = Int32(0)
    for j in cutlass.range_constexpr(per_lane):
        e = lane * per_lane + j
        c = Int32(0)
        if e < n_exp:
            lo = expert_offsets[e]
            s_rows[e] = lo
            c = (expert_offsets[e + 1] - lo + (tile_t - 1)) // tile_t * w_tiles
        counts[j] = c
        lane_sum = lane_sum + c
    inclusive = lane_sum
    for d in cutlass.range_constexpr(5):
        other = cute.arch.shuffle_sync_up(inclusive, 1 << d, mask_and_clamp=0)
        if lane >= (1 << d):
            inclusive = inclusive + other
    running = inclusive - lane_sum
    for j in cutlass.range_constexpr(per_lane):
        e = lane * per_lane + j
        if e < n_exp:
            s_prefix[e] = running
        running = running + counts[j]
    if lane == 31:
        s_prefix[n_exp] = inclusive
        s_rows[n_exp] = expert_offsets[n_exp]


@cute.jit
def locate_tile(tile: Int32, e: Int32, s_rows: cute.Tensor, s_prefix: cute.Tensor, tile_t: cutlass.Constexpr):
    """Persistent tile index -> (e, rows_lo, rows_hi, w_tile, row_start): its expert, the expert's routed
    rows [rows_lo, rows_hi), its weight tile and its first token row. Tiles are expert-major, token tiles
    fastest within a weight tile; e is the expert of the CTA's previous tile (a CTA's tiles only grow)."""
    while tile >= s_prefix[e + 1]:
        e = e + 1
    rows_lo = s_rows[e]
    rows_hi = s_rows[e + 1]
    n_t_tiles = (rows_hi - rows_lo + (tile_t - 1)) // tile_t
    local = tile - s_prefix[e]
    w_tile = local // n_t_tiles
    row_start = rows_lo + (local - w_tile * n_t_tiles) * tile_t
    return e, rows_lo, rows_hi, w_tile, row_start


@cute.jit
def gather_sources(src_rows: cute.Tensor, gather_index: cute.Tensor, row_start: Int32, rows_hi: Int32, row0: Int32,
                   n_slots: cutlass.Constexpr, gated: cutlass.Constexpr):
    """A producer thread's token rows of a tile (shared with the W4A16 kernel): routed row r = row_start + row0 +
    16 j -> its row of `tokens` (gather_index[r] in the gated up-projection, r in the down-projection), or -1
    past the expert's end. Such rows are not loaded: their smem rows hold stale data, which only reaches
    output columns (tokens) that the epilogue never stores."""
    for j in cutlass.range_constexpr(n_slots):
        r = row_start + row0 + 16 * j
        src_row = Int32(-1)
        if r < rows_hi:
            if cutlass.const_expr(gated):
                src_row = gather_index[r]
            else:
                src_row = r
        src_rows[j] = src_row


@cute.jit
def copy_token_rows(g2s: cute.CopyAtom, tokens: cute.Tensor, s_t_raw: cute.Tensor, src_rows: cute.Tensor, row0: Int32,
                    chunk: Int32, chunk_sw: Int32, kt: Int32, stage: Int32, n_slots: cutlass.Constexpr):
    """cp.async of this thread's 16-byte chunk of k-tile kt of its token rows into `stage` (swizzled chunk)."""
    for j in cutlass.range_constexpr(n_slots):
        if src_rows[j] >= 0:
            src = cute.zipped_divide(tokens[src_rows[j], None], (VEC,))
            dst = cute.zipped_divide(s_t_raw[row0 + 16 * j, None, stage], (VEC,))
            cute.copy(g2s, src[None, kt * (TILE_K // VEC) + chunk], dst[None, chunk_sw])


@cute.jit
def signal_full(full, stage: Int32, issued: Int32, stages: cutlass.Constexpr, fence_mode: cutlass.Constexpr,
                lag: cutlass.Constexpr = 1):
    """The producer thread's copies of `stage` are issued: let the full barrier count them. cp.async writes
    through the generic proxy and wgmma reads through the async proxy, so someone must fence in between: in
    "producer" mode this thread waits for its copies of stage (issued - lag), fences, then arrives (lag <
    stages: the stage it refills next was signalled); otherwise the arrival rides on the copies' completion and
    the consumers fence (wait_full)."""
    if cutlass.const_expr(fence_mode == "producer"):
        cute.arch.cp_async_commit_group()
        if issued >= lag:
            cute.arch.cp_async_wait_group(lag)
            cute.arch.fence_proxy(cute.arch.ProxyKind.async_shared, space=cute.arch.SharedSpace.shared_cta)
            cute.arch.mbarrier_arrive(full + (issued - lag) % stages)
    else:
        cute.arch.cp_async_mbarrier_arrive_noinc(full + stage)


@cute.jit
def drain_producer(full, issued: Int32, stages: cutlass.Constexpr, fence_mode: cutlass.Constexpr,
                   lag: cutlass.Constexpr = 1):
    """After the producer's last stage: wait for all its copies; in "producer" mode signal the stages that
    signal_full still owes."""
    cute.arch.cp_async_commit_group()
    cute.arch.cp_async_wait_group(0)
    if cutlass.const_expr(fence_mode == "producer"):
        cute.arch.fence_proxy(cute.arch.ProxyKind.async_shared, space=cute.arch.SharedSpace.shared_cta)
        for d in cutlass.range_constexpr(lag, 0, -1):
            if issued >= d:
                cute.arch.mbarrier_arrive(full + (issued - d) % stages)


@cute.jit
def wait_full(full, stage: Int32, phase: Int32, fence_mode: cutlass.Constexpr):
    """Consumer: wait until the producer filled `stage`; in "consumer" fence mode also make its cp.async writes
    visible to the async proxy (wgmma reads the token rows from shared memory)."""
    cute.arch.mbarrier_wait(full + stage, phase)
    if cutlass.const_expr(fence_mode == "consumer"):
        cute.arch.fence_proxy(cute.arch.ProxyKind.async_shared, space=cute.arch.SharedSpace.shared_cta)


@cute.jit
def store_out_chunk(s_out: cute.Tensor, out: cute.Tensor, out_frag: cute.Tensor, copy128: cute.CopyAtom, ctid: Int32,
                    row0: Int32, valid_rows: Int32, col_chunk0: Int32, chunks_per_row: cutlass.Constexpr,
                    n_chunks: cutlass.Constexpr, n_threads: cutlass.Constexpr):
    """Epilogue (shared with the W4A16 kernel): the staged chunk s_out [token, column] -> out rows row0 + token,
    16-byte stores by n_threads consumer threads, only tokens < valid_rows (the expert's last tile is partial)."""
    for it in cutlass.range_constexpr((n_chunks + n_threads - 1) // n_threads):
        q = ctid + it * n_threads
        tok = q // chunks_per_row
        ch = q - tok * chunks_per_row
        if q < n_chunks and tok < valid_rows:
            src = cute.zipped_divide(s_out[tok, None], (VEC,))
            cute.autovec_copy(src[None, ch], out_frag)
            dst = cute.zipped_divide(out[row0 + tok, None], (VEC,))
            cute.copy(copy128, out_frag, dst[None, col_chunk0 + ch])


@cute.jit
def stage_out_chunk(acc: cute.Tensor, s_out: cute.Tensor, t_cc: cute.Tensor, ec: cutlass.Constexpr,
                    mma_m: cutlass.Constexpr, tile_t: cutlass.Constexpr, epi_t: cutlass.Constexpr,
                    gated: cutlass.Constexpr, epilogue: cutlass.Constexpr = DEFAULT_EPILOGUE,
                    bias_frag: cute.Tensor | None = None):
    """Epilogue chunk ec (shared with the W4A16 kernel): this thread's accumulator values of tokens
    ec * epi_t ... -> s_out [token, column], as the activation of gate and up (SiLU(gate) * up or the epilogue's
    clamped SwiGLU) when gated. Fragment value v + m * tile_t / 2 (m: the warpgroup's m64 atom, mma_m of them)
    holds column 8 * (v // 4) + (lane % 4) * 2 + v % 2 and row r + 8 * ((v % 4) // 2), so a chunk of tokens is a
    static set of values. bias_frag (expert_epilogue.load_bias, when epilogue.bias): the fp32 bias of this thread's
    rows r and r + 8 of each atom, added to the accumulator first."""
    for vi in cutlass.range_constexpr(mma_m * epi_t // 2):
        v = (vi % (epi_t // 2)) + ec * epi_t // 2 + (vi // (epi_t // 2)) * (tile_t // 2)
        coord = t_cc[v]
        wrow = coord[0]
        tok = coord[1] - ec * epi_t
        m = v // (tile_t // 2)
        if cutlass.const_expr(gated):
            # values come as (col, col+1) x (row, row+8): v % 4 < 2 is a gate row, v + 2 the matching
            # up row 8 below it (prepare_expert_weights interleaves by 8 rows).
            if cutlass.const_expr(v % 4 < 2):
                gate = acc[v]
                up = acc[v + 2]
                if cutlass.const_expr(epilogue.bias):
                    gate = gate + bias_frag[2 * m]
                    up = up + bias_frag[2 * m + 1]
                act = gated_activation(gate, up, epilogue)
                s_out[tok, (wrow // 16) * 8 + wrow % 8] = act.to(BFloat16)
        else:
            if cutlass.const_expr(epilogue.bias):
                s_out[tok, wrow] = (acc[v] + bias_frag[2 * m + (v % 4) // 2]).to(BFloat16)
            else:
                s_out[tok, wrow] = acc[v].to(BFloat16)
