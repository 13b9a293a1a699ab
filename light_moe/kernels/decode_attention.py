"""Paged-attention decode (flash-decoding, split-KV): one new query token per sequence, keys and values read
in place from the paged KV cache through the block table.

Shape legend: B sequences, h query heads, g KV heads, r = h // g query heads per KV head (GQA; MHA when
r = 1), D head_dim, bs cache block size, NB cache blocks, MB table width, S KV splits, KT keys per warp tile.
    q [B, h, D] bf16/fp16, k_cache / v_cache [NB, bs, g, D] (q's dtype), block_tables [B, MB] int32 or int64
    (rows may be strided), ctx_lens [B] int32 or int64 -> out [B, h, D] in q's dtype:
    out[b, j] = softmax(q[b, j] K^T * scale) V over the keys 0 .. ctx_lens[b] - 1 of sequence b, key s at row
    s % bs of block block_tables[b, s // bs], KV head j // r; products and softmax in fp32.
(light_moe.ops.attention.paged_attention is the reference.)

Grid (S, g, B): one CTA of 4 warps per (split, KV head, sequence) handles all r query heads of its KV head,
so K and V are read once per KV head. Split s owns key tiles s * TPS .. (s + 1) * TPS - 1 (TPS tiles per
split); S and TPS depend only on host-known sizes (B, g, MB, bs, the SM count), never on ctx_lens, so the
launch is CUDA-graph capturable; splits past a sequence's end exit at once. Warp w of a CTA walks the tiles
w, w + 4, ... of its split with its own online softmax; the 4 warps merge through shared memory. With S > 1
each CTA writes (o / l, log2-sum-exp) for its rows to an fp32 workspace and the splits of each head are merged
either by a combine kernel or, given merge counters (one int32 per (sequence, KV head), zero before the launch),
by the last split CTA of each (sequence, KV head) to finish: every split with keys adds one to its counter after
its partials (bar.sync, then one acq_rel atomic: the partials of the CTA are released with it, and the one that
sees the count complete acquires everyone's), and the CTA that completes the count merges and sets the counter
back to zero for the next launch (the stream-K fix-up pattern). That saves the combine kernel's launch in every
layer of a decode step (what it is worth: docs/kernels.md). With S = 1 the CTA writes out directly.

A warp tile is KT keys (16 for D = 128, 32 for D = 64: 16 loads of 16 bytes per lane in flight) on the
warp-level tensor cores (mma.sync m16n8k16, fp32 accumulators), query heads on the 16 rows of M
(rows >= r are zero), straight from global memory to registers (no shared-memory staging: the only reuse
of a K/V row is inside one warp):
  * S = Q K^T: the B fragment of key n (lane // 4) needs d pairs (2c, 2c + 1) and (2c + 8, 2c + 9) per k-step
    (c = lane % 4). Any permutation of D applied to both Q and K leaves the dot products unchanged, so lane c
    loads 16-byte vectors 4i + c (d = 32i + 8c ... + 7) of its key and uses words 2u, 2u + 1 of vector i as
    k-step 2i + u; Q's A fragment is loaded with the same vectors. The four lanes of a key read 64
    contiguous bytes per load.
  * P V: the accumulator of QK^T (rows = heads, columns = keys) is the A fragment of PV as it is (FA2).
    The B fragment of column n (a d index) needs keys (2c, 2c + 1) packed in one register: lane n loads
    vectors 8u + n (d = 64u + 8n ... + 7) of keys 2c, 2c + 1, 2c + 8, 2c + 9 and pairs them with prmt,
    so n-tile 8u + e holds d = 64u + 8n + e; the accumulator of row m then sits at
    d = 64u + 16c + e (c0) and 64u + 16c + 8 + e (c1): two contiguous runs of 8 per lane.
Keys past ctx_lens[b] (only in a sequence's last tile) are read at key ctx_lens[b] - 1 instead (the
cache may hold NaN there, and 0 * NaN would reach the output through PV) and get score -inf.

gpt-oss (kernels/attention_variant.py; compile-time options, absent from the plain kernel's code):
  * sinks [h]: counted once, in the final normalisation only: by the combine kernel with S > 1 (it starts its
    merge from the sink as if it were a split with log2-sum-exp sink * log2 e and no values), by the CTA's warp
    merge with S = 1. The split CTAs' partials never include it, so no split can count it twice.
  * sliding window W: the query (position ctx - 1) sees keys ctx - W ... ctx - 1. Split s owns the tiles from
    the window's first tile, floor(max(ctx - W, 0) / KT), on, so the keys before the window's first tile are
    never read and the split count is sized for the window (W + KT - 1 keys at most), not the table width;
    inside the first tile the keys before the window are read at the window's first key instead (they may be
    gone from the cache) and get score -inf.
"""

from __future__ import annotations

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float16, Float32, Int32, Int64
from cutlass._mlir.dialects import llvm, nvvm
from cutlass._mlir.dialects.nvvm import AtomicOpKind, MemOrderKind, MemScopeKind
from cutlass.cute.runtime import make_ptr
from cutlass.cutlass_dsl import T, dsl_user_op

from light_moe.kernels import attention_variant
from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream, head_shape_problem, paged_attention_shapes, sm_count
from light_moe.kernels.router import mma_16bit

WARPS = 4
THREADS = 32 * WARPS
COMBINE_THREADS = 128
HEAD_DIMS = (64, 128)
MAX_GROUP = 16  # query heads per KV head: the 16 rows of one mma tile
# attention CTAs resident per SM, bounded by the kernel's registers (ptxas: D = 128 about 190 per thread, D = 64
# about 115): the split count fills one such wave of CTAs and no more (BENCHMARKS.md: a partial second wave or
# more splits than fill the first one cost time)
RESIDENT_CTAS_PER_SM = {128: 2, 64: 4}
SMEM_PAD = 4  # fp32 padding per row of the warp-merge buffer (rows 16 bytes apart in bank terms)
LOG2_E = 1.4426950408889634
_DTYPES = {torch.bfloat16: (BFloat16, "bf16"), torch.float16: (Float16, "f16")}
_INDEX_DTYPES = {torch.int32: Int32, torch.int64: Int64}
_NEG_INF = -math.inf


def supports(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
             sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> tuple[bool, str]:
    """Whether the kernel takes these shapes, and gpt-oss's sinks [h] / sliding window where given."""
    problem = head_shape_problem(dtype, _DTYPES, num_heads, num_kv_heads, head_dim, HEAD_DIMS)
    if problem is not None:
        return False, problem
    if num_heads // num_kv_heads > MAX_GROUP:
        return False, f"{num_heads // num_kv_heads} query heads per KV head > {MAX_GROUP} (one mma tile of rows)"
    if block_size <= 0 or block_size & (block_size - 1):
        return False, f"block_size={block_size} is not a power of two"
    return attention_variant.supports(sinks, sliding_window, num_heads)


def keys_per_tile(head_dim: int) -> int:
    """KT: 16 loads of 16 bytes per lane per tile (D = 128: 16 keys, D = 64: 32 keys)."""
    return 16 if head_dim == 128 else 32


def choose_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, tile_keys: int,
                  num_sms: int, num_splits: int | None = None, resident_ctas: int = 2,
                  window: int | None = None) -> tuple[int, int]:
    """(S, tiles per split) from host-known sizes only: as many splits as fill one wave of resident CTAs
    (resident_ctas per SM) without starting a second one, but never more than give every warp of a split a
    tile at the longest context the table allows (with a sliding window: the tiles W keys can touch);
    num_splits overrides the choice (benchmarks)."""
    max_keys = max_blocks * block_size
    if window is not None:  # W keys starting anywhere in a tile touch at most ceil((W + KT - 1) / KT) tiles
        max_keys = min(max_keys, window + tile_keys - 1)
    n_tiles = max(1, -(-max_keys // tile_keys))
    if num_splits is None:
        num_splits = min(resident_ctas * num_sms // max(1, batch * num_kv_heads), -(-n_tiles // WARPS))
    num_splits = max(1, min(num_splits, n_tiles))
    tiles_per_split = -(-n_tiles // num_splits)
    return -(-n_tiles // tiles_per_split), tiles_per_split


# --------------------------------------------------------------------------------------------
# Device helpers (inline PTX on 32-bit registers and 64-bit addresses)
# --------------------------------------------------------------------------------------------

@dsl_user_op
def load_v4(addr: Int64, *, loc=None, ip=None) -> list:
    """16 bytes at a global address as 4 x i32; L1 is bypassed (every K/V row is read once per CTA).
    has_side_effects keeps LLVM from hoisting it above griddepcontrol.wait."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32()] * 4), [Int64(addr).ir_value(loc=loc, ip=ip)],
        "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)
    return [Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


def _asm_b32(asm: str, constraints: str, values: list, loc, ip) -> Int32:
    """One 32-bit result ($0) of side-effect-free inline PTX."""
    return Int32(llvm.inline_asm(T.i32(), values, asm, constraints, has_side_effects=False, is_align_stack=False,
                                 asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def pair_halves(lo_src: Int32, hi_src: Int32, selector: int, *, loc=None, ip=None) -> Int32:
    """prmt.b32: 0x5410 -> (lo16 of lo_src, lo16 of hi_src), 0x7632 -> (hi16 of lo_src, hi16 of hi_src)."""
    values = [Int32(x).ir_value(loc=loc, ip=ip) for x in (lo_src, hi_src)]
    return _asm_b32(f"prmt.b32 $0, $1, $2, {selector:#x};", "=r,r,r", values, loc, ip)


@dsl_user_op
def pack2(lo: Float32, hi: Float32, instr: str, *, loc=None, ip=None) -> Int32:
    """Two fp32 -> bf16x2 / f16x2 (round to nearest), lo in the low half: one mma A register."""
    values = [Float32(x).ir_value(loc=loc, ip=ip) for x in (hi, lo)]
    return _asm_b32(f"cvt.rn.{instr}x2.f32 $0, $1, $2;", "=r,f,f", values, loc, ip)


@dsl_user_op
def arrive_acq_rel(ptr: cute.Pointer, *, loc=None, ip=None) -> Int32:
    """atom.acq_rel.gpu.global.add.u32 of 1 at ptr (an Int32 element of global memory); the old value. Release:
    what this CTA wrote before its bar.sync is visible to whoever reads the new count; acquire: what the
    CTAs that counted before wrote is visible to this one after its next bar.sync."""
    return Int32(nvvm.atomicrmw(T.i32(), AtomicOpKind.ADD, ptr.llvm_ptr, Int32(1).ir_value(loc=loc, ip=ip),
                                mem_order=MemOrderKind.ACQ_REL, syncscope=MemScopeKind.GPU, loc=loc, ip=ip))


@cute.jit
def merge_splits(ws_o: cute.Tensor, ws_lse: cute.Tensor, out: cute.Tensor, b: Int32, head: Int32, col: Int32,
                 n_valid: Int32, m_all: Float32, l_all: Float32, dtype: cutlass.Constexpr):
    """The split-KV merge of one (sequence b, head, 4 columns from col): the n_valid splits' partial outputs
    ws_o [B, h, S, D] weighted by their log2-sum-exp ws_lse [B, h, S] into out (zeros without keys), starting from
    the running max m_all / sum l_all (-inf / 0; a sink starts them at its logit / 1). One online pass, unrolled: the
    loads of several splits are in flight at once (a loop of dependent L2 round trips per split would dominate
    small batches with many splits). Shared with kernels/mla_decode_attention.py."""
    o = cute.make_rmem_tensor((4,), Float32)
    o.fill(0.0)
    for s in cutlass.range(n_valid, unroll=4):
        lse = ws_lse[b, head, s]
        m_new = cute.arch.fmax(m_all, lse)
        alpha = cute.math.exp2(m_all - m_new, fastmath=True)  # 0 on the first split (m_all = -inf, no sink)
        weight = cute.math.exp2(lse - m_new, fastmath=True)
        l_all = l_all * alpha + weight
        for x in cutlass.range_constexpr(4):
            o[x] = o[x] * alpha + ws_o[b, head, s, col + x] * weight
        m_all = m_new
    inv = cutlass.select_(n_valid > 0, 1.0 / l_all, Float32(0.0))  # no keys: zeros
    for x in cutlass.range_constexpr(4):
        out[b, head, col + x] = (o[x] * inv).to(dtype)


def online_softmax_rows(vals: list, rh: int, row_m, row_l, probs: list, acc, n_acc_tiles: int, zero_f: Float32):
    """Online-softmax update of row half rh (mma rows g or g + 8) from a tile's scaled scores `vals` (this lane's
    two columns per 8-key n-tile, -inf where masked; the tile must hold a valid key so the max stays finite):
    the row max over its 4 lanes (mma threadID_in_group), running max row_m / sum row_l, the probabilities into
    probs[n-tile][2 rh + e], and the accumulator rows 2 rh, 2 rh + 1 rescaled over n_acc_tiles. Traced inline;
    shared with kernels/mla_decode_attention.py."""
    tile_max = vals[0]
    for x in vals[1:]:
        tile_max = cute.arch.fmax(tile_max, x)
    for offset in (1, 2):
        tile_max = cute.arch.fmax(tile_max, cute.arch.shuffle_sync_bfly(tile_max, offset=offset))
    m_old = row_m[rh]
    m_new = cute.arch.fmax(m_old, tile_max)
    alpha = cute.math.exp2(m_old - m_new, fastmath=True)
    row_m[rh] = m_new
    p_sum = zero_f
    for idx in range(len(vals)):
        p = cute.math.exp2(vals[idx] - m_new, fastmath=True)
        probs[idx // 2][2 * rh + idx % 2] = p
        p_sum = p_sum + p
    row_l[rh] = row_l[rh] * alpha + p_sum
    for t in range(n_acc_tiles):
        acc[2 * rh, t] = acc[2 * rh, t] * alpha
        acc[2 * rh + 1, t] = acc[2 * rh + 1, t] * alpha


class DecodeAttentionSm90:
    """Compiled once per (dtype, index dtypes, h, g, D, bs, split, KT, sink type, window, merge in kernel); B, MB,
    S, TPS, the scale and the window's width are run-time arguments. sink_type: the CuTe type of the sinks, None
    without. merge_in_kernel (split only): the last split CTA of each (sequence, KV head) merges, no combine
    kernel."""

    def __init__(self, dtype_name: str, table_dtype, ctx_dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, split: bool, tile_keys: int, sink_type=None, window: bool = False,
                 merge_in_kernel: bool = False):
        assert head_dim in HEAD_DIMS and num_heads % num_kv_heads == 0
        assert num_heads // num_kv_heads <= MAX_GROUP and block_size & (block_size - 1) == 0
        assert tile_keys % 16 == 0 and tile_keys & (tile_keys - 1) == 0
        self.dtype_name = dtype_name
        self.dtype = BFloat16 if dtype_name == "bf16" else Float16
        self.table_dtype = table_dtype
        self.ctx_dtype = ctx_dtype
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.log_block = block_size.bit_length() - 1
        self.split = split
        self.tile_keys = tile_keys
        self.chunks = tile_keys // 16  # PV k-chunks of 16 keys per tile
        self.row_halves = 2 if self.group > 8 else 1  # mma rows 8..15 carry heads only when r > 8
        self.n_tiles = head_dim // 8  # PV n-tiles (8 columns of D each)
        self.sinks = sink_type is not None
        self.window = window
        self.merge_in_kernel = split and merge_in_kernel

    @cute.jit
    def __call__(self, q_ptr: cute.Pointer, k_ptr: cute.Pointer, v_ptr: cute.Pointer, table_ptr: cute.Pointer,
                 ctx_ptr: cute.Pointer, out_ptr: cute.Pointer, ws_ptr: cute.Pointer, batch: Int32,
                 table_stride: Int32, n_splits: Int32, tiles_per_split: Int32, scale_log2: Float32,
                 sinks_ptr: cute.Pointer, window: Int32, counters_ptr: cute.Pointer, stream: cuda.CUstream):
        """ws_ptr: fp32 workspace, B * h * S * (D + 1) floats (o / l, then the log2-sum-exp); unused when
        not split. sinks_ptr: [h] sink logits, read only with sinks; window: W, read only with the window;
        counters_ptr: [B * g] int32 zeros, left zero, read only with merge_in_kernel."""
        h, d = self.num_heads, self.head_dim
        table = cute.make_tensor(table_ptr, cute.make_layout((batch, table_stride), stride=(table_stride, 1)))
        ctx_lens = cute.make_tensor(ctx_ptr, cute.make_layout((batch,)))
        out = cute.make_tensor(out_ptr, cute.make_layout((batch, h, d), stride=(h * d, d, 1)))
        ws_o = cute.make_tensor(ws_ptr, cute.make_layout((batch, h, n_splits, d),
                                                         stride=(h * n_splits * d, n_splits * d, d, 1)))
        ws_lse = cute.make_tensor(ws_ptr + batch * h * n_splits * d,
                                  cute.make_layout((batch, h, n_splits), stride=(h * n_splits, n_splits, 1)))
        sinks = cute.make_tensor(sinks_ptr, cute.make_layout((h,)))
        counters = cute.make_tensor(counters_ptr, cute.make_layout((batch * self.num_kv_heads,)))
        self.attention_kernel(q_ptr, k_ptr, v_ptr, table, ctx_lens, out, ws_o, ws_lse, tiles_per_split,
                              scale_log2, sinks, window, counters).launch(
            grid=(n_splits, self.num_kv_heads, batch), block=(THREADS, 1, 1), stream=stream, use_pdl=True)
        if cutlass.const_expr(self.split and not self.merge_in_kernel):
            items = h * d // 4
            self.combine_kernel(ws_o, ws_lse, ctx_lens, out, tiles_per_split, sinks, window).launch(
                grid=((items + COMBINE_THREADS - 1) // COMBINE_THREADS, batch, 1), block=(COMBINE_THREADS, 1, 1),
                stream=stream, use_pdl=True)

    # Plain-Python helpers: traced inline (loops unroll at trace time, no DSL preprocessing).
    def load_q(self, q_base, b, kvh, lane_n, lane_c):
        """A-fragment words of this lane's query rows: [row half][vector i][word], zero for rows >= r."""
        r, d = self.group, self.head_dim
        rows = []
        for rh in range(self.row_halves):
            row = lane_n + 8 * rh
            head = (b * self.num_heads + kvh * r + cutlass.min(row, r - 1)).to(Int64)
            vecs = []
            for i in range(d // 32):
                words = load_v4(q_base + head * (2 * d) + 16 * (4 * i + lane_c))
                if r < 8 * (rh + 1):
                    words = [cutlass.select_(row < r, w, Int32(0)) for w in words]
                vecs.append(words)
            rows.append(vecs)
        return rows

    def key_rows(self, table, b, kvh, t0, last, key_offsets, first=None):
        """Byte offsets (Int64) in the cache of the rows of keys t0 + key_offsets[i] (KV head kvh); keys past
        `last` read key `last` instead, keys before `first` (the window's first key; None: no window) key
        `first`. Cache blocks are looked up once per block the tile touches."""
        bs, lbs = self.block_size, self.log_block
        row_bytes = self.num_kv_heads * self.head_dim * 2
        blocks = {}
        res = []
        for ko in key_offsets:
            key = cutlass.min(t0 + ko, last)
            if first is not None:  # first <= last: the clamped key stays in the sequence
                key = cutlass.max(key, first)
            lookup = ko // bs if bs >= 8 else None  # bs >= 8: an 8-key group never straddles two blocks
            if lookup is None or lookup not in blocks:
                group_key = key if lookup is None else cutlass.min(t0 + (ko // bs) * bs, last)
                if first is not None and lookup is not None:
                    group_key = cutlass.max(group_key, first)
                blk = Int64(table[b, group_key >> lbs])
                if lookup is not None:
                    blocks[lookup] = blk
            else:
                blk = blocks[lookup]
            slot = key & (bs - 1)
            res.append(blk * (bs * row_bytes) + ((slot * self.num_kv_heads + kvh) * (self.head_dim * 2)).to(Int64))
        return res

    def tile_step(self, k_base, v_base, table, b, kvh, ctx, tile, lane_n, lane_c, scale_log2, qf, acc, row_m,
                  row_l, win_start=None):
        """One warp tile of KT keys: loads, S = Q K^T, online softmax, O += P V. win_start: the window's first
        key (None: no window)."""
        kt, d, nch, rhs, instr = self.tile_keys, self.head_dim, self.chunks, self.row_halves, self.dtype_name
        t0 = tile * kt
        last = ctx - 1
        k_keys = [8 * j + lane_n for j in range(2 * nch)]  # B columns of S, n-tile j
        v_keys = [16 * q + 8 * hh + 2 * lane_c + e for q in range(nch) for hh in range(2) for e in range(2)]
        k_rows = self.key_rows(table, b, kvh, t0, last, k_keys, win_start)
        v_rows = self.key_rows(table, b, kvh, t0, last, v_keys, win_start)
        kw = [[load_v4(k_base + k_rows[j] + 16 * (4 * i + lane_c)) for i in range(d // 32)] for j in range(2 * nch)]
        # vw[q][hh][e][u]: key 16q + 8hh + 2c + e, d = 64u + 8n ... + 7
        vw = [[[[load_v4(v_base + v_rows[(q * 2 + hh) * 2 + e] + 16 * (8 * u + lane_n)) for u in range(d // 64)]
                for e in range(2)] for hh in range(2)] for q in range(nch)]
        zero_i = Int32(0)
        zero_f = Float32(0.0)

        scores = []  # [n-tile j] -> 4 accumulators (c0, c1: row n; c2, c3: row n + 8)
        for j in range(2 * nch):
            s = [zero_f] * 4
            for step in range(d // 16):
                i, u = step // 2, step % 2
                hi = qf[1] if rhs == 2 else None
                a = (qf[0][i][2 * u], hi[i][2 * u] if hi else zero_i, qf[0][i][2 * u + 1],
                     hi[i][2 * u + 1] if hi else zero_i)
                s = mma_16bit(a, (kw[j][i][2 * u], kw[j][i][2 * u + 1]), s, instr)
            scores.append(s)

        probs = [[zero_f] * 4 for _ in range(2 * nch)]
        for rh in range(rhs):
            vals = []
            for j in range(2 * nch):
                for e in range(2):
                    valid = t0 + (8 * j + 2 * lane_c + e) < ctx
                    if win_start is not None:
                        valid = valid & (t0 + (8 * j + 2 * lane_c + e) >= win_start)
                    vals.append(cutlass.select_(valid, scores[j][2 * rh + e] * scale_log2, Float32(_NEG_INF)))
            # finite row max: every tile has a valid key (window: from its first)
            online_softmax_rows(vals, rh, row_m, row_l, probs, acc, self.n_tiles, zero_f)

        for q in range(nch):
            p0, p1 = probs[2 * q], probs[2 * q + 1]
            a = (pack2(p0[0], p0[1], instr), pack2(p0[2], p0[3], instr) if rhs == 2 else zero_i,
                 pack2(p1[0], p1[1], instr), pack2(p1[2], p1[3], instr) if rhs == 2 else zero_i)
            for t in range(self.n_tiles):
                u, e = t // 8, t % 8
                word, sel = e // 2, (0x5410 if e % 2 == 0 else 0x7632)
                b0 = pair_halves(vw[q][0][0][u][word], vw[q][0][1][u][word], sel)
                b1 = pair_halves(vw[q][1][0][u][word], vw[q][1][1][u][word], sel)
                c = [acc[0, t], acc[1, t], acc[2, t] if rhs == 2 else zero_f, acc[3, t] if rhs == 2 else zero_f]
                res = mma_16bit(a, (b0, b1), c, instr)
                for x in range(2 * rhs):
                    acc[x, t] = res[x]

    @cute.kernel
    def attention_kernel(self, q_ptr: cute.Pointer, k_ptr: cute.Pointer, v_ptr: cute.Pointer, table: cute.Tensor,
                         ctx_lens: cute.Tensor, out: cute.Tensor, ws_o: cute.Tensor, ws_lse: cute.Tensor,
                         tiles_per_split: Int32, scale_log2: Float32, sinks: cute.Tensor, window: Int32,
                         counters: cute.Tensor):
        await_inputs()  # q and the new token's K/V: written by the kernels before this one
        r, d, kt, rhs = self.group, self.head_dim, self.tile_keys, self.row_halves
        split, kvh, b = cute.arch.block_idx()
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        lane_n = lane // 4  # mma groupID: query row / key of a K column / d column of V
        lane_c = lane % 4  # mma threadID_in_group

        smem = cutlass.utils.SmemAllocator()
        pitch = d + SMEM_PAD
        sm_o = smem.allocate_tensor(Float32, cute.make_layout((WARPS, r, d), stride=(r * pitch, pitch, 1)),
                                    byte_alignment=16)
        sm_m = smem.allocate_tensor(Float32, cute.make_layout((WARPS, r), stride=(r, 1)), byte_alignment=16)
        sm_l = smem.allocate_tensor(Float32, cute.make_layout((WARPS, r), stride=(r, 1)), byte_alignment=16)
        sm_count = None
        if cutlass.const_expr(self.merge_in_kernel):
            sm_count = smem.allocate_tensor(Int32, cute.make_layout((1,)), byte_alignment=4)

        # q first: its loads overlap the ctx_lens load that decides whether this split has keys at all
        qf = self.load_q(q_ptr.toint(), b, kvh, lane_n, lane_c)
        ctx = Int32(ctx_lens[b])
        n_tiles = (ctx + kt - 1) // kt
        t_begin = split * tiles_per_split
        win_start = None
        if cutlass.const_expr(self.window):  # the splits start at the window's first tile
            win_start = cutlass.max(ctx - window, 0)
            t_begin = t_begin + win_start // kt
        t_end = cutlass.min(t_begin + tiles_per_split, n_tiles)
        # splits holding keys of this sequence: 0 .. n_valid - 1 (the combine kernel counts them the same way)
        n_valid = (n_tiles - (t_begin - split * tiles_per_split) + tiles_per_split - 1) // tiles_per_split
        n_items = r * d // 4  # (row, 4 columns) items of the merge
        item_rounds = (n_items + THREADS - 1) // THREADS
        if t_begin < t_end:
            acc = cute.make_rmem_tensor((2 * rhs, self.n_tiles), Float32)
            acc.fill(0.0)
            row_m = cute.make_rmem_tensor((rhs,), Float32)
            row_m.fill(_NEG_INF)
            row_l = cute.make_rmem_tensor((rhs,), Float32)
            row_l.fill(0.0)
            k_base = k_ptr.toint()
            v_base = v_ptr.toint()
            n_mine = (cutlass.max(t_end - t_begin - warp, 0) + WARPS - 1) // WARPS
            for it in cutlass.range(n_mine, unroll=1):
                self.tile_step(k_base, v_base, table, b, kvh, ctx, t_begin + warp + it * WARPS, lane_n, lane_c,
                               scale_log2, qf, acc, row_m, row_l, win_start)

            for rh in cutlass.range_constexpr(rhs):
                total = row_l[rh]
                for offset in cutlass.range_constexpr(1, 3):
                    total = total + cute.arch.shuffle_sync_bfly(total, offset=offset)
                row = lane_n + 8 * rh
                if row < r:
                    for t in cutlass.range_constexpr(self.n_tiles):
                        col = 64 * (t // 8) + 16 * lane_c + t % 8
                        sm_o[warp, row, col] = acc[2 * rh, t]
                        sm_o[warp, row, col + 8] = acc[2 * rh + 1, t]
                    if lane_c == 0:
                        sm_m[warp, row] = row_m[rh]
                        sm_l[warp, row] = total
            cute.arch.sync_threads()

            for rnd in cutlass.range_constexpr(item_rounds):
                item = tidx + rnd * THREADS
                if item < n_items:
                    row = item // (d // 4)
                    col = item % (d // 4) * 4
                    m_all = sm_m[0, row]
                    for w in cutlass.range_constexpr(1, WARPS):
                        m_all = cute.arch.fmax(m_all, sm_m[w, row])
                    l_all = Float32(0.0)
                    if cutlass.const_expr(self.sinks and not self.split):  # split partials leave it to the combine
                        sink = sinks[kvh * r + row].to(Float32) * LOG2_E
                        m_all = cute.arch.fmax(m_all, sink)
                        l_all = cute.math.exp2(sink - m_all, fastmath=True)
                    o = cute.make_rmem_tensor((4,), Float32)
                    o.fill(0.0)
                    for w in cutlass.range_constexpr(WARPS):
                        weight = cute.math.exp2(sm_m[w, row] - m_all, fastmath=True)
                        l_all = l_all + sm_l[w, row] * weight
                        for x in cutlass.range_constexpr(4):
                            o[x] = o[x] + sm_o[w, row, col + x] * weight
                    inv = 1.0 / l_all
                    head = kvh * r + row
                    if cutlass.const_expr(self.split):
                        for x in cutlass.range_constexpr(4):
                            ws_o[b, head, split, col + x] = o[x] * inv
                        if col == 0:
                            ws_lse[b, head, split] = m_all + cute.math.log2(l_all, fastmath=True)
                    else:
                        for x in cutlass.range_constexpr(4):
                            out[b, head, col + x] = (o[x] * inv).to(self.dtype)
            if cutlass.const_expr(self.merge_in_kernel):
                self.merge_if_last(ws_o, ws_lse, out, sinks, counters, sm_count, b, kvh, tidx, n_valid,
                                   n_items, item_rounds)
        else:
            # no keys at all (ctx_lens[b] == 0): zeros, never garbage; with the merge in the kernel split 0 writes
            # them (no split has keys, so no CTA merges)
            if cutlass.const_expr(not self.split or self.merge_in_kernel):
                if split == 0:
                    self.write_zeros(out, b, kvh, tidx, n_items, item_rounds)

    @cute.jit
    def write_zeros(self, out: cute.Tensor, b: Int32, kvh: Int32, tidx: Int32, n_items: cutlass.Constexpr,
                    item_rounds: cutlass.Constexpr):
        """Zeros into this KV head's r query heads of sequence b."""
        r, d = self.group, self.head_dim
        for rnd in cutlass.range_constexpr(item_rounds):
            zero_item = tidx + rnd * THREADS
            if zero_item < n_items:
                for x in cutlass.range_constexpr(4):
                    out[b, kvh * r + zero_item // (d // 4), zero_item % (d // 4) * 4 + x] = Float32(0.0).to(self.dtype)

    @cute.jit
    def merge_if_last(self, ws_o: cute.Tensor, ws_lse: cute.Tensor, out: cute.Tensor, sinks: cute.Tensor,
                      counters: cute.Tensor, sm_count: cute.Tensor, b: Int32, kvh: Int32, tidx: Int32, n_valid: Int32,
                      n_items: cutlass.Constexpr, item_rounds: cutlass.Constexpr):
        """After this split's partials: count it; the split that completes the count of its (sequence, KV head)
        merges all n_valid splits into out (sink included) and resets the counter."""
        r, d = self.group, self.head_dim
        slot = b * self.num_kv_heads + kvh
        cute.arch.sync_threads()  # every thread's partial stores precede thread 0's release
        if tidx == 0:
            sm_count[0] = arrive_acq_rel(counters.iterator + slot)
        cute.arch.sync_threads()  # thread 0's acquire precedes every thread's loads of the other partials
        if sm_count[0] == n_valid - 1:
            if tidx == 0:
                counters[slot] = Int32(0)  # every split has counted: nobody else touches it in this launch
            for rnd in cutlass.range_constexpr(item_rounds):
                item = tidx + rnd * THREADS
                if item < n_items:
                    head = kvh * r + item // (d // 4)
                    m_all = Float32(_NEG_INF)
                    l_all = Float32(0.0)
                    if cutlass.const_expr(self.sinks):  # as in the combine kernel: once, in the final merge
                        m_all = sinks[head].to(Float32) * LOG2_E
                        l_all = Float32(1.0)
                    merge_splits(ws_o, ws_lse, out, b, head, item % (d // 4) * 4, n_valid, m_all, l_all, self.dtype)

    @cute.kernel
    def combine_kernel(self, ws_o: cute.Tensor, ws_lse: cute.Tensor, ctx_lens: cute.Tensor, out: cute.Tensor,
                       tiles_per_split: Int32, sinks: cute.Tensor, window: Int32):
        """One thread per (sequence, head, 4 columns): merges the splits that hold keys of the sequence (and the
        head's sink, counted here only)."""
        await_inputs()  # the attention kernel's partials
        d, kt = self.head_dim, self.tile_keys
        chunk, b, _ = cute.arch.block_idx()
        tidx, _, _ = cute.arch.thread_idx()
        item = chunk * COMBINE_THREADS + tidx
        if item < self.num_heads * d // 4:
            head = item // (d // 4)
            col = item % (d // 4) * 4
            ctx = Int32(ctx_lens[b])
            n_split_tiles = (ctx + kt - 1) // kt
            if cutlass.const_expr(self.window):
                n_split_tiles = n_split_tiles - cutlass.max(ctx - window, 0) // kt
            n_valid = (n_split_tiles + tiles_per_split - 1) // tiles_per_split
            m_all = Float32(_NEG_INF)
            l_all = Float32(0.0)
            if cutlass.const_expr(self.sinks):  # the sink as a split of log2-sum-exp sink * log2 e and no values
                m_all = sinks[head].to(Float32) * LOG2_E
                l_all = Float32(1.0)
            merge_splits(ws_o, ws_lse, out, b, head, col, n_valid, m_all, l_all, self.dtype)


_compiled = CompileCache("decode_attention")  # static config -> compiled function; never keyed on B, MB, S or W


def make_compile_args(dtype: torch.dtype, table_dtype: torch.dtype, ctx_dtype: torch.dtype, num_heads: int,
                      num_kv_heads: int, head_dim: int, block_size: int, split: bool, stream=None,
                      tile_keys: int | None = None, sinks_dtype: torch.dtype | None = None, window: bool = False,
                      merge_in_kernel: bool = False):
    """(jit function, arguments) for cute.compile with placeholder pointers; B, MB, S and W are dynamic.
    sinks_dtype: the sinks' dtype (None: no sinks); window: a sliding window; merge_in_kernel (split only): the
    last split CTA merges (merge counters), no combine kernel."""
    gmem = cute.AddressSpace.gmem
    cdt, name = _DTYPES[dtype]
    kernel = DecodeAttentionSm90(name, _INDEX_DTYPES[table_dtype], _INDEX_DTYPES[ctx_dtype], num_heads, num_kv_heads,
                                 head_dim, block_size, split, tile_keys or keys_per_tile(head_dim),
                                 attention_variant.sink_type(sinks_dtype), window, merge_in_kernel)
    args = (
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(_INDEX_DTYPES[table_dtype], 16, gmem, assumed_align=4),
        make_ptr(_INDEX_DTYPES[ctx_dtype], 16, gmem, assumed_align=4),
        make_ptr(cdt, 16, gmem, assumed_align=16),
        make_ptr(Float32, 16, gmem, assumed_align=16),
        Int32(1), Int32(1), Int32(1), Int32(1), Float32(1.0),
        attention_variant.placeholder_sinks_pointer(sinks_dtype), Int32(1),
        make_ptr(Int32, 16, gmem, assumed_align=4),
        stream,
    )
    return kernel, args


def _compiled_fn(key):
    return _compiled.get(key, lambda: make_compile_args(*key[:8], current_stream(), *key[8:]))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     ctx_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None, *,
                     num_splits: int | None = None, tile_keys: int | None = None, sinks: torch.Tensor | None = None,
                     sliding_window: int | None = None, merge_counters: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V of one query token per sequence over its paged keys -> out [B, h, D] (allocated
    if None). No host synchronisation: capturable in a CUDA graph and correct on replay with new q, tables and
    ctx_lens in the same buffers (the split count depends on B, MB and the window only). num_splits / tile_keys
    override the tuned choices (benchmarks). gpt-oss: sinks [h] (fp32 / bf16 / fp16) join every softmax
    denominator; sliding_window W limits the query to the keys ctx - W ... ctx - 1 (ops.attention
    paged_attention_sinks). merge_counters: int32 zeros, at least B * g of them, on q's device, which every call
    leaves zero: where the keys are split, the last split CTA of each (sequence, KV head) then merges the splits
    itself (one launch instead of two; the caller keeps one buffer per stream: two calls in flight at once on
    different streams must not share it); None: a combine kernel merges."""
    batch, num_heads, head_dim, block_size, num_kv_heads = paged_attention_shapes(
        "decode attention kernel", supports, q, k_cache, v_cache)
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.stride(1) != 1 \
            or block_tables.dtype not in _INDEX_DTYPES:
        raise ValueError(f"block_tables must be [B={batch}, MB] int32/int64 with unit column stride, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype} strides {block_tables.stride()}")
    if ctx_lens.shape != (batch,) or not ctx_lens.is_contiguous() or ctx_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"ctx_lens must be a contiguous [{batch}] int32/int64 tensor, got {tuple(ctx_lens.shape)} "
                         f"{ctx_lens.dtype}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor")
    if any(t.data_ptr() % 16 for t in (q, k_cache, v_cache, out)):
        raise ValueError("q, k_cache, v_cache and out must be 16-byte aligned (128-bit accesses)")
    attention_variant.check(sinks, sliding_window, num_heads, q.device)
    if merge_counters is not None and (merge_counters.dtype != torch.int32 or not merge_counters.is_contiguous()
                                       or merge_counters.device != q.device
                                       or merge_counters.numel() < batch * num_kv_heads):
        raise ValueError(f"merge_counters must be a contiguous int32 tensor of at least B * g = {batch * num_kv_heads} "
                         f"zeros on {q.device}, got {tuple(merge_counters.shape)} {merge_counters.dtype} on "
                         f"{merge_counters.device}")
    if batch == 0:
        return out
    tile_keys = tile_keys or keys_per_tile(head_dim)
    n_splits, tiles_per_split = choose_splits(batch, num_kv_heads, block_tables.shape[1], block_size, tile_keys,
                                              sm_count(q.device), num_splits, RESIDENT_CTAS_PER_SM[head_dim],
                                              sliding_window)
    split = n_splits > 1
    merge_in_kernel = split and merge_counters is not None
    key = (q.dtype, block_tables.dtype, ctx_lens.dtype, num_heads, num_kv_heads, head_dim, block_size, split,
           tile_keys, None if sinks is None else sinks.dtype, sliding_window is not None, merge_in_kernel)
    fn = _compiled_fn(key)
    ws = out  # unused placeholder when not split
    if split:
        ws = torch.empty(batch * num_heads * n_splits * (head_dim + 1), dtype=torch.float32, device=q.device)
    gmem = cute.AddressSpace.gmem
    cdt, _ = _DTYPES[q.dtype]
    fn(
        make_ptr(cdt, q.data_ptr(), gmem, assumed_align=16),
        make_ptr(cdt, k_cache.data_ptr(), gmem, assumed_align=16),
        make_ptr(cdt, v_cache.data_ptr(), gmem, assumed_align=16),
        make_ptr(_INDEX_DTYPES[block_tables.dtype], block_tables.data_ptr(), gmem, assumed_align=4),
        make_ptr(_INDEX_DTYPES[ctx_lens.dtype], ctx_lens.data_ptr(), gmem, assumed_align=4),
        make_ptr(cdt, out.data_ptr(), gmem, assumed_align=16),
        make_ptr(Float32, ws.data_ptr(), gmem, assumed_align=16),
        Int32(batch), Int32(block_tables.stride(0)), Int32(n_splits), Int32(tiles_per_split),
        Float32(scale * LOG2_E), attention_variant.sinks_pointer(sinks, out), Int32(sliding_window or 1),
        make_ptr(Int32, (merge_counters if merge_in_kernel else ctx_lens).data_ptr(), gmem, assumed_align=4),
        current_stream(),
    )
    return out
