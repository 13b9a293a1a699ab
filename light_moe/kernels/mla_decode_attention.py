"""Absorbed multi-head latent attention (DeepSeek MLA) decode over the paged latent cache: one new query token
per sequence, the latents read in place through the block table (FlashMLA's structure on mma.sync).

Shape legend: B sequences, h query heads, L latent width (kv_lora_rank, 512), R rotary width (64), D = L + R (576),
bs cache block size, NB cache blocks, MB table width, HG heads per CTA (16 or 32), S KV splits, KT = 32 keys per
tile, TPS tiles per split.
    q_abs [B, h, D] bf16 (q_nope W_UK, then the rotated q_pe: layers/mla.py), latent_cache [NB, bs, D] bf16,
    block_tables [B, MB] int32 (rows may be strided), ctx_lens [B] int32 -> out [B, h, L] bf16:
    out[b, j] = softmax(q_abs[b, j] C^T * scale) C[:, :L], C the D-wide latent rows 0 .. ctx_lens[b] - 1 of
    sequence b (row s at slot s % bs of block block_tables[b, s // bs]); products and softmax in fp32.
(light_moe.ops.attention.paged_mla_attention, its max_query_len == 1 branch, is the reference.)

Every head of a sequence attends to the same latent rows (one shared "KV head", keys = the whole D-wide row,
values its first L columns), so a CTA takes HG heads and loads each latent row of its key range once into
shared memory for all of them. Grid (S, h / HG, B); split s owns key tiles s * TPS .. (s + 1) * TPS - 1; S and
TPS depend only on B, h, MB and the SM count, never on ctx_lens (CUDA-graph capturable); splits past a
sequence's end exit at once. With S > 1 each CTA writes (o / l, log2-sum-exp) per head to an fp32 workspace
and a combine kernel merges the splits; with S = 1 the CTA writes out directly.

A CTA is 4 warps per 16 heads (HG / 16 m-tiles of mma.sync m16n8k16, heads on the 16 rows of M, fp32
accumulators): warp w works on m-tile w // 4 and quarter p = w % 4 of both products.
  * Tile loads: KT latent rows, 16-byte cp.async chunks through the block table into a ring of `stages`
    shared-memory buffers (rows PITCH = D * 2 + 32 bytes apart), issued stages - 1 tiles ahead.
  * S = Q C^T split over D: warp quarter p multiplies dims 144p .. 144p + 143 (9 k-steps) for all KT keys;
    its 36 A-fragment registers of q_abs stay in registers for the whole kernel. The 4 partial S of an m-tile
    meet in shared memory and every warp of the m-tile sums them in the same order, so all four hold the same
    fp32 scores and run the same online softmax (no cross-warp reduction of maxima or sums).
  * O += P V split over L: warp quarter p owns value columns 128p .. 128p + 127 (16 n-tiles, 64 accumulator
    registers: the 16 x 512 fp32 accumulator of an m-tile spread over its 4 warps, as FlashMLA splits it); P is
    the S accumulator re-packed to bf16 as the A fragment (FA2), V comes from the same shared rows as the keys.
  * Fragment layouts (lane = 4 g + c): any permutation of the reduction dims applied to both operands leaves a
    product unchanged, so for a k-step over dims 16s .. 16s + 15 lane c loads 8 bytes at dim 16s + 4c of its
    query rows / key and uses the two words as k-pairs (2c, 2c + 1) and (2c + 8, 2c + 9). Key columns are
    permuted too: column n of S n-tile j is the tile's key 8j + sigma(n), sigma(n) = n ^ (n >> 2), which keeps
    both shared-memory access patterns free of bank conflicts with PITCH = 74 x 16 bytes (the S loads: 16
    lanes at keys sigma(g) and offsets 8c; the V loads: 8 lanes at keys 2c, 2c + 1 and offsets 16g). V's B
    fragment: lane (g, c) loads 16 bytes of its four keys at value dims 64u + 8g and pairs their halves with
    prmt, so n-tile 8u + e holds dim 64u + 8g + e in column g, and accumulator c0 / c1 of row g sits at dims
    64u + 16c + e / 64u + 16c + 8 + e: two runs of 8 contiguous dims per lane and row, one 16-byte store each.
Keys past ctx_lens[b] (only in a sequence's last tile) are loaded from row ctx_lens[b] - 1 instead (the cache
may hold NaN there, and 0 * NaN would reach the output through PV) and get score -inf.

Why mma.sync and not wgmma: wgmma's M is 64 rows per warpgroup, 4x the 16 heads of V2-Lite (or of a
tensor-parallel slice of V3's 128), and its accumulator layout cannot be re-fed as a register A operand of
the next product as directly as mma.sync's (P stays in registers here). At 16-32 heads per latent row the
kernel does 2 * HG * (D + L) / (2 * D) = 30-60 flops per byte read, below what mma.sync sustains per byte of
HBM bandwidth, so the simpler instruction costs no time at decode.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cute.runtime import make_ptr
from cutlass.cutlass_dsl import T, dsl_user_op

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.decode_attention import LOG2_E, merge_splits, online_softmax_rows, pack2, pair_halves
from light_moe.kernels.launch import await_inputs, current_stream, sm_count
from light_moe.kernels.router import mma_16bit

LATENT_DIM = 512  # L: kv_lora_rank of every DeepSeek V2 / V2-Lite / V3
ROPE_DIM = 64  # R: qk_rope_head_dim
KEY_DIM = LATENT_DIM + ROPE_DIM  # D
ROW_BYTES = KEY_DIM * 2
ROW_CHUNKS = ROW_BYTES // 16  # 16-byte cp.async chunks per latent row
TILE_KEYS = 32  # KT
PITCH = ROW_BYTES + 32  # shared-memory row pitch: 74 x 16 bytes (conflict-free fragment loads, module docstring)
QUARTER_DIMS = KEY_DIM // 4  # S: dims per warp quarter (9 k-steps)
QUARTER_COLS = LATENT_DIM // 4  # PV: value columns per warp quarter (16 n-tiles)
SX_PITCH = TILE_KEYS + 8  # fp32 row pitch of the partial-S exchange (8-byte accesses conflict-free)
COMBINE_THREADS = 128
HEADS_PER_CTA = (16, 32)
# stages of the latent-tile ring per HG: HG = 16 (4 warps, 86 KB) leaves room for two CTAs per SM, HG = 32 (8 warps)
# runs one CTA per SM and keeps three tiles in flight instead
STAGES = {16: 2, 32: 4}
# CTAs resident per SM (shared memory above) and the fewest tiles a split gets (the ring's prologue is paid per split)
RESIDENT_CTAS_PER_SM = {16: 2, 32: 1}
MIN_TILES_PER_SPLIT = 2
_NEG_INF = float("-inf")


def supports(dtype: torch.dtype, num_heads: int, latent_dim: int, rope_dim: int, block_size: int) -> tuple[bool, str]:
    """Whether the kernel takes these shapes: bf16, L = 512, R = 64, h a positive multiple of 16, a power-of-two
    block size (every block size the engine allows: config.CacheConfig)."""
    if dtype != torch.bfloat16:
        return False, f"dtype {dtype} unsupported (bfloat16)"
    if (latent_dim, rope_dim) != (LATENT_DIM, ROPE_DIM):
        return False, f"latent {latent_dim} + rope {rope_dim} unsupported ({LATENT_DIM} + {ROPE_DIM})"
    if num_heads <= 0 or num_heads % 16:
        return False, f"num_heads={num_heads} is not a positive multiple of 16 (the mma tile's rows)"
    if block_size <= 0 or block_size & (block_size - 1):
        return False, f"block_size={block_size} is not a power of two"
    return True, "ok"


def heads_per_cta(num_heads: int) -> int:
    """HG: 32 where h allows (half the CTAs re-reading each latent tile from L2), else 16."""
    return 32 if num_heads % 32 == 0 else 16


def choose_splits(batch: int, num_heads: int, max_blocks: int, block_size: int, num_sms: int, group: int,
                  num_splits: int | None = None) -> tuple[int, int]:
    """(S, TPS) from host-known sizes only: as many splits as fill one wave of resident CTAs without starting a
    second, but at least MIN_TILES_PER_SPLIT tiles each at the longest context the table allows; num_splits
    overrides the choice (tests, benchmarks)."""
    n_tiles = max(1, -(-max_blocks * block_size // TILE_KEYS))
    if num_splits is None:
        ctas = batch * (num_heads // group)
        num_splits = min(RESIDENT_CTAS_PER_SM[group] * num_sms // max(1, ctas), -(-n_tiles // MIN_TILES_PER_SPLIT))
    num_splits = max(1, min(num_splits, n_tiles))
    tiles_per_split = -(-n_tiles // num_splits)
    return -(-n_tiles // tiles_per_split), tiles_per_split


def smem_bytes(group: int, stages: int) -> int:
    """Shared memory of one CTA: the latent-tile ring and the partial-S exchange."""
    return stages * TILE_KEYS * PITCH + (group // 4) * 16 * SX_PITCH * 4


# --------------------------------------------------------------------------------------------
# Device helpers (inline PTX; shared-memory addresses are 32-bit, global ones 64-bit). Every memory access is
# marked as having side effects: LLVM must neither hoist a shared-memory load above the barrier that publishes
# its data nor merge loads of the same address in successive tiles.
# --------------------------------------------------------------------------------------------

def _words(res, n: int, loc, ip, ty=None) -> list:
    ty = ty or T.i32()
    wrap = Int32 if ty == T.i32() else Float32
    return [wrap(llvm.extractvalue(ty, res, [i], loc=loc, ip=ip)) for i in range(n)]


def _asm(result_types, values, asm: str, constraints: str, loc, ip):
    res_type = None if not result_types else llvm.StructType.get_literal(result_types)
    return llvm.inline_asm(res_type, values, asm, constraints, has_side_effects=True, is_align_stack=False,
                           asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@dsl_user_op
def cp_async_16(smem_addr: Int32, gmem_addr: Int64, *, loc=None, ip=None) -> None:
    """16 bytes global -> shared, L1 bypassed (a latent row is read once per CTA)."""
    _asm(None, [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
         "cp.async.cg.shared.global [$0], [$1], 16;", "r,l", loc, ip)


@dsl_user_op
def lds_v2(addr: Int32, *, loc=None, ip=None) -> list:
    res = _asm([T.i32()] * 2, [Int32(addr).ir_value(loc=loc, ip=ip)], "ld.shared.v2.b32 {$0, $1}, [$2];",
               "=r,=r,r", loc, ip)
    return _words(res, 2, loc, ip)


@dsl_user_op
def lds_v4(addr: Int32, *, loc=None, ip=None) -> list:
    res = _asm([T.i32()] * 4, [Int32(addr).ir_value(loc=loc, ip=ip)], "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];",
               "=r,=r,=r,=r,r", loc, ip)
    return _words(res, 4, loc, ip)


@dsl_user_op
def lds_v2_f32(addr: Int32, *, loc=None, ip=None) -> list:
    res = _asm([T.f32()] * 2, [Int32(addr).ir_value(loc=loc, ip=ip)], "ld.shared.v2.f32 {$0, $1}, [$2];",
               "=f,=f,r", loc, ip)
    return _words(res, 2, loc, ip, T.f32())


@dsl_user_op
def sts_v2_f32(addr: Int32, lo: Float32, hi: Float32, *, loc=None, ip=None) -> None:
    values = [Int32(addr).ir_value(loc=loc, ip=ip)] + [Float32(x).ir_value(loc=loc, ip=ip) for x in (lo, hi)]
    _asm(None, values, "st.shared.v2.f32 [$0], {$1, $2};", "r,f,f", loc, ip)


@dsl_user_op
def ldg_v2(addr: Int64, *, loc=None, ip=None) -> list:
    """8 bytes of a read-only global tensor (q_abs) as 2 x i32."""
    res = _asm([T.i32()] * 2, [Int64(addr).ir_value(loc=loc, ip=ip)], "ld.global.nc.v2.b32 {$0, $1}, [$2];",
               "=r,=r,l", loc, ip)
    return _words(res, 2, loc, ip)


@dsl_user_op
def stg_v4(addr: Int64, words: list, *, loc=None, ip=None) -> None:
    values = [Int64(addr).ir_value(loc=loc, ip=ip)] + [Int32(w).ir_value(loc=loc, ip=ip) for w in words]
    _asm(None, values, "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r", loc, ip)


@dsl_user_op
def stg_v4_f32(addr: Int64, vals: list, *, loc=None, ip=None) -> None:
    values = [Int64(addr).ir_value(loc=loc, ip=ip)] + [Float32(v).ir_value(loc=loc, ip=ip) for v in vals]
    _asm(None, values, "st.global.v4.f32 [$0], {$1, $2, $3, $4};", "l,f,f,f,f", loc, ip)


def key_column(n):
    """sigma(n): the tile key in column n (0..7) of an 8-key n-tile; n an int or an Int32."""
    return n ^ (n >> 2)


class MLADecodeSm90:
    """Compiled once per (h, bs, HG, split, stages); B, MB, S, TPS and the scale are run-time arguments."""

    def __init__(self, num_heads: int, block_size: int, group: int, split: bool, stages: int):
        assert num_heads % group == 0 and group in HEADS_PER_CTA and stages >= 2
        assert block_size > 0 and block_size & (block_size - 1) == 0
        self.num_heads = num_heads
        self.block_size = block_size
        self.log_block = block_size.bit_length() - 1
        self.group = group
        self.split = split
        self.stages = stages
        self.warps = 4 * (group // 16)
        self.threads = 32 * self.warps
        self.threads_per_key = self.threads // TILE_KEYS  # cp.async: consecutive threads walk one row's chunks
        assert ROW_CHUNKS % self.threads_per_key == 0
        self.stage_bytes = TILE_KEYS * PITCH

    @cute.jit
    def __call__(self, q_ptr: cute.Pointer, cache_ptr: cute.Pointer, table_ptr: cute.Pointer, ctx_ptr: cute.Pointer,
                 out_ptr: cute.Pointer, ws_ptr: cute.Pointer, batch: Int32, table_stride: Int32, n_splits: Int32,
                 tiles_per_split: Int32, scale_log2: Float32, stream: cuda.CUstream):
        """ws_ptr: fp32 workspace, B * h * S * (L + 1) floats (o / l, then the log2-sum-exp); unused when not
        split."""
        h = self.num_heads
        table = cute.make_tensor(table_ptr, cute.make_layout((batch, table_stride), stride=(table_stride, 1)))
        ctx_lens = cute.make_tensor(ctx_ptr, cute.make_layout((batch,)))
        out = cute.make_tensor(out_ptr, cute.make_layout((batch, h, LATENT_DIM), stride=(h * LATENT_DIM,
                                                                                          LATENT_DIM, 1)))
        ws_o = cute.make_tensor(ws_ptr, cute.make_layout((batch, h, n_splits, LATENT_DIM), stride=(
            h * n_splits * LATENT_DIM, n_splits * LATENT_DIM, LATENT_DIM, 1)))
        ws_lse = cute.make_tensor(ws_ptr + batch * h * n_splits * LATENT_DIM,
                                  cute.make_layout((batch, h, n_splits), stride=(h * n_splits, n_splits, 1)))
        self.attention_kernel(q_ptr, cache_ptr, table, ctx_lens, out_ptr, ws_ptr, ws_lse, n_splits, tiles_per_split,
                              scale_log2).launch(grid=(n_splits, h // self.group, batch), block=(self.threads, 1, 1),
                                                 stream=stream, use_pdl=True)
        if cutlass.const_expr(self.split):
            items = h * LATENT_DIM // 4
            self.combine_kernel(ws_o, ws_lse, ctx_lens, out, tiles_per_split).launch(
                grid=((items + COMBINE_THREADS - 1) // COMBINE_THREADS, batch, 1), block=(COMBINE_THREADS, 1, 1),
                stream=stream, use_pdl=True)

    # Plain-Python helpers: traced inline (loops unroll at trace time, no DSL preprocessing).
    def load_q(self, q_base, b, head0, quarter, lane_g, lane_c):
        """A fragments of this lane's rows g, g + 8 over the quarter's 9 k-steps: [k-step] -> 4 x i32."""
        frags = []
        rows = [((b * self.num_heads + head0 + lane_g + 8 * half) * KEY_DIM).to(Int64) for half in range(2)]
        for step in range(QUARTER_DIMS // 16):
            dim = quarter * QUARTER_DIMS + 16 * step + 4 * lane_c
            lo = ldg_v2(q_base + (rows[0] + dim.to(Int64)) * 2)
            hi = ldg_v2(q_base + (rows[1] + dim.to(Int64)) * 2)
            frags.append((lo[0], hi[0], lo[1], hi[1]))
        return frags

    def load_tile(self, cache_base, table, b, ctx, tile, ring, stage, tidx):
        """cp.async of tile `tile`'s KT latent rows into ring stage `stage`; keys past the context read its last row."""
        tpk = self.threads_per_key
        row = tidx // tpk
        part = tidx % tpk
        key = cutlass.min(tile * TILE_KEYS + row, ctx - 1)
        blk = Int64(table[b, key >> self.log_block])
        src = cache_base + (blk * self.block_size + (key & (self.block_size - 1)).to(Int64)) * ROW_BYTES
        dst = ring + stage * self.stage_bytes + row * PITCH
        for i in range(ROW_CHUNKS // tpk):
            chunk = part + tpk * i
            cp_async_16(dst + 16 * chunk, src + (16 * chunk).to(Int64))

    def partial_scores(self, base, quarter, lane_g, lane_c, qf):
        """This warp's quarter of S = Q C^T for the tile at `base`: [n-tile j] -> 4 fp32 (c0, c1: row g; c2, c3:
        row g + 8; columns 2c, 2c + 1 = keys 8j + sigma(2c), 8j + sigma(2c + 1))."""
        zero = Float32(0.0)
        scores = []
        for j in range(TILE_KEYS // 8):
            row = base + (8 * j + key_column(lane_g)) * PITCH + quarter * (QUARTER_DIMS * 2) + 8 * lane_c
            s = [zero] * 4
            for step in range(QUARTER_DIMS // 16):
                s = mma_16bit(qf[step], lds_v2(row + 32 * step), s, "bf16")
            scores.append(s)
        return scores

    def tile_softmax_pv(self, base, scores, t0, ctx, quarter, lane_g, lane_c, scale_log2, acc, row_m, row_l):
        """Online softmax of the tile's full scores and O += P V over the quarter's value columns."""
        zero_f = Float32(0.0)
        sig = [key_column(2 * lane_c + e) for e in range(2)]
        probs = [[zero_f] * 4 for _ in range(TILE_KEYS // 8)]
        for rh in range(2):
            vals = []
            for j in range(TILE_KEYS // 8):
                for e in range(2):
                    valid = t0 + 8 * j + sig[e] < ctx
                    vals.append(cutlass.select_(valid, scores[j][2 * rh + e] * scale_log2, Float32(_NEG_INF)))
            # finite row max: every tile holds a key of the context
            online_softmax_rows(vals, rh, row_m, row_l, probs, acc, QUARTER_COLS // 8, zero_f)

        for q in range(TILE_KEYS // 16):
            p0, p1 = probs[2 * q], probs[2 * q + 1]
            a = (pack2(p0[0], p0[1], "bf16"), pack2(p0[2], p0[3], "bf16"), pack2(p1[0], p1[1], "bf16"),
                 pack2(p1[2], p1[3], "bf16"))
            # B rows: keys (2c, 2c + 1) of n-tile 2q for b0, of n-tile 2q + 1 for b1
            keys = [16 * q + 8 * hh + sig[e] for hh in range(2) for e in range(2)]
            for u in range(QUARTER_COLS // 64):
                col_bytes = (quarter * QUARTER_COLS + 64 * u + 8 * lane_g) * 2
                vecs = [lds_v4(base + k * PITCH + col_bytes) for k in keys]
                for e in range(8):
                    t = 8 * u + e
                    word, sel = e // 2, (0x5410 if e % 2 == 0 else 0x7632)
                    b0 = pair_halves(vecs[0][word], vecs[1][word], sel)
                    b1 = pair_halves(vecs[2][word], vecs[3][word], sel)
                    res = mma_16bit(a, (b0, b1), [acc[0, t], acc[1, t], acc[2, t], acc[3, t]], "bf16")
                    for x in range(4):
                        acc[x, t] = res[x]

    @cute.kernel
    def attention_kernel(self, q_ptr: cute.Pointer, cache_ptr: cute.Pointer, table: cute.Tensor,
                         ctx_lens: cute.Tensor, out_ptr: cute.Pointer, ws_ptr: cute.Pointer, ws_lse: cute.Tensor,
                         n_splits: Int32, tiles_per_split: Int32, scale_log2: Float32):
        await_inputs()  # q_abs and this step's latent rows: written by the kernels before this one
        h = self.num_heads
        split, hgroup, b = cute.arch.block_idx()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        lane_g = lane // 4  # mma groupID: query row / key of an S column / value column of a PV n-tile
        lane_c = lane % 4  # mma threadID_in_group
        m_tile = warp // 4
        quarter = warp % 4
        head0 = hgroup * self.group + 16 * m_tile

        smem = cutlass.utils.SmemAllocator()
        ring_t = smem.allocate_tensor(Int32, cute.make_layout((self.stages * self.stage_bytes // 4,)),
                                      byte_alignment=128)
        sx_t = smem.allocate_tensor(Float32, cute.make_layout((self.warps * 16 * SX_PITCH,)), byte_alignment=128)
        ring = ring_t.iterator.toint()
        sx = sx_t.iterator.toint()

        # q first: its loads overlap the ctx_lens load that decides whether this split has keys at all
        qf = self.load_q(q_ptr.toint(), b, head0, quarter, lane_g, lane_c)
        ctx = Int32(ctx_lens[b])
        n_tiles = (ctx + TILE_KEYS - 1) // TILE_KEYS
        t_begin = split * tiles_per_split
        t_end = cutlass.min(t_begin + tiles_per_split, n_tiles)
        rows = [head0 + lane_g, head0 + lane_g + 8]
        if t_begin < t_end:
            n_mine = t_end - t_begin
            acc = cute.make_rmem_tensor((4, QUARTER_COLS // 8), Float32)
            acc.fill(0.0)
            row_m = cute.make_rmem_tensor((2,), Float32)
            row_m.fill(_NEG_INF)
            row_l = cute.make_rmem_tensor((2,), Float32)
            row_l.fill(0.0)
            cache_base = cache_ptr.toint()
            for s in cutlass.range_constexpr(self.stages - 1):  # prologue: the ring's first stages - 1 tiles
                if s < n_mine:
                    self.load_tile(cache_base, table, b, ctx, t_begin + s, ring, s, tidx)
                cute.arch.cp_async_commit_group()  # one group per tile, empty or not: the wait counts groups
            # partial-S exchange: [warp][row 16][SX_PITCH] fp32, this lane's (row, column pair) of n-tile j
            sx_mine = sx + ((warp * 16 + lane_g) * SX_PITCH + 2 * lane_c) * 4
            sx_tile = sx + ((m_tile * 4 * 16 + lane_g) * SX_PITCH + 2 * lane_c) * 4
            for it in cutlass.range(n_mine, unroll=1):
                cute.arch.cp_async_wait_group(self.stages - 2)  # this thread's copies of tile `it` landed
                cute.arch.sync_threads()  # everyone's copies landed; everyone is done with tile it - 1
                ahead = it + self.stages - 1
                if ahead < n_mine:  # into the stage tile it - 1 used
                    self.load_tile(cache_base, table, b, ctx, t_begin + ahead, ring, ahead % self.stages, tidx)
                cute.arch.cp_async_commit_group()
                base = ring + (it % self.stages) * self.stage_bytes
                scores = self.partial_scores(base, quarter, lane_g, lane_c, qf)
                for j in cutlass.range_constexpr(TILE_KEYS // 8):
                    for rh in cutlass.range_constexpr(2):
                        sts_v2_f32(sx_mine + (8 * rh * SX_PITCH + 8 * j) * 4, scores[j][2 * rh], scores[j][2 * rh + 1])
                cute.arch.sync_threads()  # the four quarters' partial scores of every m-tile are in
                full = []
                for j in cutlass.range_constexpr(TILE_KEYS // 8):
                    s4 = []
                    for rh in cutlass.range_constexpr(2):
                        tot = [Float32(0.0), Float32(0.0)]
                        for w in cutlass.range_constexpr(4):  # the same order in every warp: identical sums
                            part = lds_v2_f32(sx_tile + ((w * 16 + 8 * rh) * SX_PITCH + 8 * j) * 4)
                            tot = [tot[0] + part[0], tot[1] + part[1]]
                        s4 += tot
                    full.append(s4)
                self.tile_softmax_pv(base, full, (t_begin + it) * TILE_KEYS, ctx, quarter, lane_g, lane_c,
                                     scale_log2, acc, row_m, row_l)
            cute.arch.cp_async_wait_group(0)  # no copy may outlive the CTA (the last groups are empty)

            for rh in cutlass.range_constexpr(2):
                total = row_l[rh]
                for offset in cutlass.range_constexpr(1, 3):
                    total = total + cute.arch.shuffle_sync_bfly(total, offset=offset)
                inv = 1.0 / total
                head = rows[rh]
                for u in cutlass.range_constexpr(QUARTER_COLS // 64):
                    for run in cutlass.range_constexpr(2):  # c0: dims 64u + 16c + e, c1: 64u + 16c + 8 + e
                        col = quarter * QUARTER_COLS + 64 * u + 16 * lane_c + 8 * run
                        vals = [acc[2 * rh + run, 8 * u + e] * inv for e in range(8)]
                        if cutlass.const_expr(self.split):
                            slot = ((b * h + head) * n_splits + split).to(Int64) * LATENT_DIM + col.to(Int64)
                            stg_v4_f32(ws_ptr.toint() + slot * 4, vals[:4])
                            stg_v4_f32(ws_ptr.toint() + slot * 4 + 16, vals[4:])
                        else:
                            slot = (b * h + head).to(Int64) * LATENT_DIM + col.to(Int64)
                            stg_v4(out_ptr.toint() + slot * 2,
                                   [pack2(vals[2 * k], vals[2 * k + 1], "bf16") for k in range(4)])
                if cutlass.const_expr(self.split):
                    if quarter == 0:
                        if lane_c == 0:
                            ws_lse[b, head, split] = row_m[rh] + cute.math.log2(total, fastmath=True)
        else:
            if cutlass.const_expr(not self.split):  # no keys at all (ctx_lens[b] == 0): zeros, never garbage
                for rh in cutlass.range_constexpr(2):
                    slot = (b * h + rows[rh]).to(Int64) * LATENT_DIM
                    for u in cutlass.range_constexpr(QUARTER_COLS // 64):
                        for run in cutlass.range_constexpr(2):
                            col = quarter * QUARTER_COLS + 64 * u + 16 * lane_c + 8 * run
                            stg_v4(out_ptr.toint() + (slot + col.to(Int64)) * 2, [Int32(0)] * 4)

    @cute.kernel
    def combine_kernel(self, ws_o: cute.Tensor, ws_lse: cute.Tensor, ctx_lens: cute.Tensor, out: cute.Tensor,
                       tiles_per_split: Int32):
        """One thread per (sequence, head, 4 columns): merges the splits that hold keys of the sequence."""
        await_inputs()  # the attention kernel's partials
        chunk, b, _ = cute.arch.block_idx()
        tidx, _, _ = cute.arch.thread_idx()
        item = chunk * COMBINE_THREADS + tidx
        if item < self.num_heads * LATENT_DIM // 4:
            head = item // (LATENT_DIM // 4)
            col = item % (LATENT_DIM // 4) * 4
            ctx = Int32(ctx_lens[b])
            n_valid = ((ctx + TILE_KEYS - 1) // TILE_KEYS + tiles_per_split - 1) // tiles_per_split
            merge_splits(ws_o, ws_lse, out, b, head, col, n_valid, Float32(_NEG_INF), Float32(0.0), BFloat16)


_compiled = CompileCache("mla_decode_attention")  # static config -> compiled function; never keyed on B, MB or S


def make_compile_args(num_heads: int, block_size: int, group: int, split: bool, stages: int | None = None,
                      stream=None):
    """(jit function, arguments) for cute.compile with placeholder pointers; B, MB, S and TPS are dynamic."""
    gmem = cute.AddressSpace.gmem
    kernel = MLADecodeSm90(num_heads, block_size, group, split, stages or STAGES[group])
    args = (
        make_ptr(BFloat16, 16, gmem, assumed_align=16),
        make_ptr(BFloat16, 16, gmem, assumed_align=16),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        make_ptr(BFloat16, 16, gmem, assumed_align=16),
        make_ptr(Float32, 16, gmem, assumed_align=16),
        Int32(1), Int32(1), Int32(1), Int32(1), Float32(1.0),
        stream,
    )
    return kernel, args


def _check_inputs(q_abs, latent_cache, block_tables, ctx_lens, latent_dim: int, out) -> tuple[int, int, int]:
    """The wrapper's argument checks; returns (B, h, bs). Raises ValueError naming the offending tensor."""
    if q_abs.dim() != 3 or not q_abs.is_contiguous():
        raise ValueError(f"MLA decode kernel: q_abs must be a contiguous [B, h, L + R] tensor, got "
                         f"{list(q_abs.shape)}")
    batch, num_heads, key_dim = q_abs.shape
    if latent_cache.dim() != 3 or latent_cache.shape[-1] != key_dim or not latent_cache.is_contiguous() \
            or latent_cache.dtype != q_abs.dtype:
        raise ValueError(f"MLA decode kernel: latent_cache must be a contiguous [blocks, block_size, {key_dim}] "
                         f"{q_abs.dtype} tensor, got {list(latent_cache.shape)} {latent_cache.dtype}")
    block_size = latent_cache.shape[1]
    ok, reason = supports(q_abs.dtype, num_heads, latent_dim, key_dim - latent_dim, block_size)
    if not ok:
        raise ValueError(f"MLA decode kernel: {reason}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.stride(1) != 1 \
            or block_tables.dtype != torch.int32:
        raise ValueError(f"MLA decode kernel: block_tables must be [B={batch}, MB] int32 with unit column stride, "
                         f"got {tuple(block_tables.shape)} {block_tables.dtype} strides {block_tables.stride()}")
    if ctx_lens.shape != (batch,) or not ctx_lens.is_contiguous() or ctx_lens.dtype != torch.int32:
        raise ValueError(f"MLA decode kernel: ctx_lens must be a contiguous [{batch}] int32 tensor, got "
                         f"{tuple(ctx_lens.shape)} {ctx_lens.dtype}")
    if out is not None and (out.shape != (batch, num_heads, latent_dim) or out.dtype != q_abs.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"MLA decode kernel: out must be a contiguous [{batch}, {num_heads}, {latent_dim}] "
                         f"{q_abs.dtype} tensor, got {list(out.shape)} {out.dtype}")
    tensors = [q_abs, latent_cache, block_tables, ctx_lens] + ([] if out is None else [out])
    if any(t.device != q_abs.device for t in tensors) or q_abs.device.type != "cuda":
        raise ValueError(f"MLA decode kernel: every tensor must be on one CUDA device, got "
                         f"{[str(t.device) for t in tensors]}")
    if any(t.data_ptr() % 16 for t in (q_abs, latent_cache) + (() if out is None else (out,))):
        raise ValueError("MLA decode kernel: q_abs, latent_cache and out must be 16-byte aligned (16-byte accesses)")
    return batch, num_heads, block_size


def mla_decode_attention(q_abs: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
                         ctx_lens: torch.Tensor, scale: float, latent_dim: int = LATENT_DIM,
                         out: torch.Tensor | None = None, *, num_splits: int | None = None,
                         group: int | None = None, stages: int | None = None) -> torch.Tensor:
    """softmax(q_abs C^T * scale) C[:, :L] of one absorbed query token per sequence over its paged latent rows
    C -> out [B, h, L] (allocated if None). No host synchronisation: capturable in a CUDA graph and correct on
    replay with new q_abs, tables and ctx_lens in the same buffers (the split count depends on B, h and MB only).
    num_splits, group (HG) and stages override the tuned choices (tests, benchmarks)."""
    batch, num_heads, block_size = _check_inputs(q_abs, latent_cache, block_tables, ctx_lens, latent_dim, out)
    group = group or heads_per_cta(num_heads)
    if group not in HEADS_PER_CTA or num_heads % group:
        raise ValueError(f"MLA decode kernel: {group} heads per CTA must be one of {HEADS_PER_CTA} and divide "
                         f"h={num_heads}")
    stages = stages or STAGES[group]
    if out is None:
        out = torch.empty(batch, num_heads, latent_dim, dtype=q_abs.dtype, device=q_abs.device)
    if batch == 0:
        return out
    n_splits, tiles_per_split = choose_splits(batch, num_heads, block_tables.shape[1], block_size,
                                              sm_count(q_abs.device), group, num_splits)
    split = n_splits > 1
    key = (num_heads, block_size, group, split, stages)
    fn = _compiled.get(key, lambda: make_compile_args(*key, current_stream()))
    ws = out  # unused placeholder when not split
    if split:
        ws = torch.empty(batch * num_heads * n_splits * (latent_dim + 1), dtype=torch.float32, device=q_abs.device)
    gmem = cute.AddressSpace.gmem
    fn(
        make_ptr(BFloat16, q_abs.data_ptr(), gmem, assumed_align=16),
        make_ptr(BFloat16, latent_cache.data_ptr(), gmem, assumed_align=16),
        make_ptr(Int32, block_tables.data_ptr(), gmem, assumed_align=4),
        make_ptr(Int32, ctx_lens.data_ptr(), gmem, assumed_align=4),
        make_ptr(BFloat16, out.data_ptr(), gmem, assumed_align=16),
        make_ptr(Float32, ws.data_ptr(), gmem, assumed_align=16),
        Int32(batch), Int32(block_tables.stride(0)), Int32(n_splits), Int32(tiles_per_split),
        Float32(scale * LOG2_E), current_stream(),
    )
    return out
