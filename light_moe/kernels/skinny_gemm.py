"""Skinny bf16 GEMM for decode-time dense projections: y = x W^T (+ bias) with few token rows, streaming W at
the HBM bandwidth (the attention's fused q/k/v and o projections; any bf16 nn.Linear at M <= 64).

Shape legend: M token rows (1..64, dynamic), N out features, K in features, BN weight rows per CTA (64 or 128),
BK = 64 reduction columns per k-tile, KT = K / BK k-tiles, S K-splits (CTAs per output tile, 1/2/4/8), KPS
k-tiles per split, MT = 8, 16, 32 or 64 token rows held by the tensor-core tile (M rounded up to one of them).
    x [M, K] bf16, W [N, K] bf16 (the nn.Linear weight as loaded: row-major, no repacking), bias [N] bf16 or
    None -> y [M, N] bf16; products and sums in fp32, rounded once (torch.nn.functional.linear is the
    reference).

Decode is a weight-streaming problem: M <= 64 rows make every weight byte worth 2 M flops, so the kernel is
built for bytes in flight, not for flops (at M = 64 a k-tile's mma.sync work is still about a third of the
time its weight bytes take at the HBM rate per SM).
  * Grid (S, N / BN): CTA (s, t) reads weight rows t * BN ... + BN - 1 over k-tiles s * KPS ... (s + 1) * KPS - 1.
    S is the smallest power of two that gives every SM a CTA (N / BN * S >= SMs, S <= 8), chosen on the host
    from N, K and the SM count (choose_plan), never from device data: the launch is CUDA-graph capturable.
  * Per CTA, one producer warp and 4 consumer warps. The producer's elected lane streams each k-tile by TMA into
    a ring of `stages` (4..8) shared-memory stages: the weight tile [BN, 64] and the token tile [MT, 64], both
    128-byte swizzled, one mbarrier "full" per stage counting their bytes. Token rows past M are outside the
    TMA tensor [M, K], so TMA fills them with zeros: masking costs nothing and M never enters the code.
  * Programmatic dependent launch: the weights are no kernel's output, so the producer issues the ring's first
    `stages` weight tiles *before* griddepcontrol.wait: the weight stream starts while the previous kernel
    (the norm, attention) drains; the token tiles of those stages follow once the wait returns.
  * Consumers: warp-level tensor cores (mma.sync m16n8k16, fp32 accumulators) with the weights as the M operand
    ("swap AB": y^T = W x^T) and the tokens as N = 8 (MT = 8) or MT / 8 n8 tiles (MT = 16, 32, 64). Warp w owns
    weight rows w * BN / 4 ... of the tile; per k-tile and m16 block it loads its A fragments with ldmatrix.x4
    (conflict-free under the 128-byte swizzle: the 8 rows of a matrix sit in 8 different 16-byte bank groups), the
    token fragments likewise, then arrives on the stage's "empty" mbarrier (one arrival per warp) for the producer.
  * K-split reduction, deterministic, in the same kernel: the S CTAs of an output tile form a thread-block
    cluster (S, 1, 1). Each CTA writes its fp32 partial tile [MT, BN] to its own shared memory; after a cluster
    barrier CTA rank r sums columns r * BN / S ... of all S partials through distributed shared memory
    (mapa + ld.shared::cluster) in rank order 0..S-1, adds the bias, rounds to bf16 and stores its slice of y;
    a second cluster barrier keeps every CTA's shared memory alive until its peers have read it. Why a cluster
    and not fp32 partials in global memory: no workspace to size, allocate or keep per stream (graph safety for
    free), no counters to reset, no second kernel (a launch boundary costs about as much as the whole reduce),
    and the partials never leave the SMs. The price is that a cluster's S CTAs are co-scheduled on one GPC;
    with S <= 8 and one or two CTAs per SM that does not limit the grid.
With S = 1 there is no cluster: a CTA barrier, then the same reduction over its own partial tile.

The wrapper `skinny_linear(x, weight, bias=None, out=None)` checks its inputs, allocates nothing but `out` (when
not given), and launches on torch's current stream; `supports(dtype, M, N, K, bias)` says what it takes.
Design notes and measurements: docs/kernels.md, "Skinny GEMM".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
import torch
from cutlass import BFloat16, Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cute.runtime import make_ptr
from cutlass.cutlass_dsl import T, dsl_user_op

from light_moe.config import SKINNY_GEMM_MAX_ROWS
from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.decode_attention import pack2
from light_moe.kernels.launch import await_inputs, current_stream, sm_count
from light_moe.kernels.router import mma_16bit

BLOCK_K = 64  # reduction columns per k-tile: one 128-byte swizzle row of bf16
ROW_BYTES = BLOCK_K * 2
CONSUMER_WARPS = 4
PRODUCER_WARP = CONSUMER_WARPS  # the last warp issues the TMA
THREADS = 32 * (CONSUMER_WARPS + 1)
MAX_M = SKINNY_GEMM_MAX_ROWS  # token rows: eight n8 tiles of mma.sync
TOKEN_TILES = (8, 16, 32, 64)
BLOCK_N_CHOICES = (64, 128)
DEFAULT_BLOCK_N = 64
MAX_SPLITS = 8  # the portable thread-block cluster size
MAX_STAGES = 8
MIN_STAGES = 2
PARTIAL_PAD = 4  # fp32 padding per token row of the partial tile: the fragment stores hit 32 distinct banks
SMEM_PER_SM = 232448
SMEM_RESERVED_PER_CTA = 1024
CTAS_PER_SM = 2  # the ring is sized so that two CTAs fit one SM (a second CTA hides the first one's epilogue)


def token_tile(num_rows: int) -> int:
    """MT: the token rows of the tensor-core tile, the smallest of TOKEN_TILES that holds M."""
    return next(mt for mt in TOKEN_TILES if num_rows <= mt)


def supports(dtype: torch.dtype, num_rows: int, n_out: int, k_dim: int, bias: bool = False) -> tuple[bool, str]:
    """Whether skinny_linear takes y [M, N] = x [M, K] W^T (+ bias [N] when `bias`) in `dtype`."""
    if dtype != torch.bfloat16:
        return False, f"dtype {dtype} unsupported (bfloat16)"
    if not 1 <= num_rows <= MAX_M:
        return False, f"M={num_rows} token rows outside [1, {MAX_M}]"
    if n_out <= 0 or n_out % DEFAULT_BLOCK_N:
        return False, f"N={n_out} is not a positive multiple of {DEFAULT_BLOCK_N} (the weight rows of a CTA)"
    if k_dim <= 0 or k_dim % BLOCK_K:
        return False, f"K={k_dim} is not a positive multiple of {BLOCK_K} (the k-tile)"
    return True, "ok"


def smem_bytes(block_n: int, m_tile: int, stages: int) -> int:
    """Shared memory of one CTA: 2 mbarriers per stage, the fp32 partial tile, the weight and token rings."""
    return 16 * stages + m_tile * (block_n + PARTIAL_PAD) * 4 + stages * (block_n + m_tile) * ROW_BYTES + 2048


class SkinnyPlan(NamedTuple):
    block_n: int  # BN: weight rows per CTA
    splits: int  # S: CTAs per output tile along K (one cluster when > 1)
    k_tiles_per_split: int  # KPS; the last split may have fewer, none has zero
    stages: int  # ring depth


@functools.lru_cache(maxsize=1024)  # a pure function of sizes, asked on every eager call
def choose_plan(n_out: int, k_dim: int, num_sms: int, m_tile: int = MAX_M, block_n: int | None = None,
                splits: int | None = None) -> SkinnyPlan:
    """The launch plan from host-known sizes only (graph-safe). S: 1 when the N / BN tiles fill half the SMs or
    more (each CTA then streams its K alone: measured faster than splitting, the partials' reduction costs more
    than the idle SMs lose; BENCHMARKS.md, skinny GEMM sweep); else the smallest power of two <= 8 for which the
    N / BN * S CTAs give every SM one, halved while a split would be left without k-tiles. block_n / splits
    override the choice (tests, benchmarks). stages: as deep as MAX_STAGES, the split's k-tiles and two CTAs per
    SM allow."""
    block_n = block_n or DEFAULT_BLOCK_N
    if block_n not in BLOCK_N_CHOICES or n_out % block_n:
        raise ValueError(f"block_n={block_n} must be one of {BLOCK_N_CHOICES} and divide N={n_out}")
    n_tiles, k_tiles = n_out // block_n, k_dim // BLOCK_K
    if splits is None:
        splits = 1
        while 2 * n_tiles < num_sms and n_tiles * splits < num_sms and splits < MAX_SPLITS:
            splits *= 2
    elif splits not in (1, 2, 4, 8):
        raise ValueError(f"splits={splits} must be 1, 2, 4 or 8 (a power-of-two cluster of at most {MAX_SPLITS})")
    while splits > 1 and -(-k_tiles // splits) * (splits - 1) >= k_tiles:  # the last split would be empty
        splits //= 2
    kps = -(-k_tiles // splits)
    budget = SMEM_PER_SM // CTAS_PER_SM - SMEM_RESERVED_PER_CTA
    per_stage = (block_n + m_tile) * ROW_BYTES + 16
    fixed = smem_bytes(block_n, m_tile, 0)
    stages = max(MIN_STAGES, min(MAX_STAGES, kps, (budget - fixed) // per_stage))
    return SkinnyPlan(block_n, splits, kps, stages)


# --------------------------------------------------------------------------------------------
# Device helpers (inline PTX for what CuTe DSL 4.3.5 does not wrap). Shared-memory addresses are 32-bit, global
# ones 64-bit. Every memory access is marked as having side effects, so LLVM neither hoists a load above the
# barrier that publishes its data nor merges loads of one address in successive k-tiles.
# --------------------------------------------------------------------------------------------

def _asm(result_types, values, asm: str, constraints: str, loc, ip):
    res_type = None if not result_types else llvm.StructType.get_literal(result_types)
    return llvm.inline_asm(res_type, values, asm, constraints, has_side_effects=True, is_align_stack=False,
                           asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@dsl_user_op
def ldmatrix_x4(addr: Int32, *, loc=None, ip=None) -> list:
    """Four 8x8 b16 matrices; lane l gives the row address of row l % 8 of matrix l // 8 and gets, in register j,
    the two elements (row l // 4, columns 2 (l % 4), + 1) of matrix j: an mma.sync A fragment (or two B ones)."""
    res = _asm([T.i32()] * 4, [Int32(addr).ir_value(loc=loc, ip=ip)],
               "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r", loc, ip)
    return [Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def cluster_address(addr: Int32, rank: Int32, *, loc=None, ip=None) -> Int32:
    """The shared::cluster address of shared::cta address `addr` in the cluster's CTA `rank`."""
    values = [Int32(addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip)]
    return Int32(llvm.inline_asm(T.i32(), values, "mapa.shared::cluster.u32 $0, $1, $2;", "=r,r,r",
                                 has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
                                 loc=loc, ip=ip))


def _load4_f32(asm: str, addr: Int32, loc, ip) -> list:
    res = _asm([T.f32()] * 4, [Int32(addr).ir_value(loc=loc, ip=ip)], asm, "=f,=f,=f,=f,r", loc, ip)
    return [Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def ld_cluster_v4_f32(addr: Int32, *, loc=None, ip=None) -> list:
    """16 bytes of a cluster peer's shared memory (an address from cluster_address) as 4 x f32."""
    return _load4_f32("ld.shared::cluster.v4.f32 {$0, $1, $2, $3}, [$4];", addr, loc, ip)


@dsl_user_op
def lds_v4_f32(addr: Int32, *, loc=None, ip=None) -> list:
    return _load4_f32("ld.shared.v4.f32 {$0, $1, $2, $3}, [$4];", addr, loc, ip)


@dsl_user_op
def stg_v2(addr: Int64, lo: Int32, hi: Int32, *, loc=None, ip=None) -> None:
    """8 bytes (four bf16) to global memory."""
    values = [Int64(addr).ir_value(loc=loc, ip=ip)] + [Int32(w).ir_value(loc=loc, ip=ip) for w in (lo, hi)]
    _asm(None, values, "st.global.v2.b32 [$0], {$1, $2};", "l,r,r", loc, ip)


# --------------------------------------------------------------------------------------------
# Fragment addressing (plain Python on ints or Int32, traced inline; tests/kernels/test_skinny_gemm_compile.py checks
# it against mma.sync's fragment layouts and for bank conflicts). A stage holds rows of 128 bytes whose 16-byte
# chunk c sits at chunk c ^ (row % 8) (the TMA's 128-byte swizzle); ldmatrix.x4 lane l addresses row l % 8 of
# matrix l // 8.
# --------------------------------------------------------------------------------------------

def weight_fragment_offset(block16, kstep, lane):
    """Byte offset in a weight stage of lane's ldmatrix.x4 row for the A fragment of weight rows 16 * block16 ...
    + 15, k-step `kstep` (columns 16 kstep ...): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
    (rows 8-15, k 8-15) are registers a0..a3 of mma.sync m16n8k16's A fragment."""
    lrow, lmat = lane % 8, lane // 8
    row = 16 * block16 + lrow + 8 * (lmat % 2)
    return row * ROW_BYTES + ((2 * kstep + lmat // 2) ^ lrow) * 16


def token_loads_per_stage(m_tile: int) -> int:
    """ldmatrix.x4 of the token tile per stage: MT / 16 per k-step for MT >= 16, one per two k-steps for MT = 8."""
    return BLOCK_K // 16 * (m_tile // 16) if m_tile >= 16 else BLOCK_K // 32


def token_fragment_offset(idx, lane, m_tile: int):
    """Byte offset in a token stage of lane's ldmatrix.x4 row for load idx. MT >= 16, load idx = k-step q * MT / 16
    + token block t: matrices (tokens 16t + 0-7, k 0-7), (16t + 0-7, k 8-15), (16t + 8-15, k 0-7), (16t + 8-15,
    k 8-15) = (b0, b1) of token n-tiles 2t and 2t + 1 (the 128-byte swizzle XORs with the row mod 8 = lrow).
    MT = 8, load idx = k-step pair p: matrices (tokens 0-7, k 32p ...), ... in 8-column steps = (b0, b1) of
    k-steps 2p and 2p + 1."""
    lrow, lmat = lane % 8, lane // 8
    if m_tile >= 16:
        q, t = divmod(idx, m_tile // 16)
        return (16 * t + lrow + 8 * (lmat // 2)) * ROW_BYTES + ((2 * q + lmat % 2) ^ lrow) * 16
    return lrow * ROW_BYTES + ((4 * idx + lmat) ^ lrow) * 16


class SkinnyGemmSm90:
    """y [M, N] = x [M, K] W^T (+ bias): compiled once per (N, K, MT, plan, bias); M is a run-time argument."""

    def __init__(self, n_out: int, k_dim: int, m_tile: int, plan: SkinnyPlan, has_bias: bool):
        assert m_tile in TOKEN_TILES and plan.block_n in BLOCK_N_CHOICES and n_out % plan.block_n == 0
        assert k_dim % BLOCK_K == 0 and plan.splits in (1, 2, 4, 8) and plan.stages >= MIN_STAGES
        self.n_out = n_out
        self.k_dim = k_dim
        self.m_tile = m_tile
        self.block_n = plan.block_n
        self.splits = plan.splits
        self.kps = plan.k_tiles_per_split
        self.stages = plan.stages
        self.has_bias = has_bias
        self.k_tiles = k_dim // BLOCK_K
        self.n_tiles = n_out // plan.block_n
        self.m16_per_warp = plan.block_n // (16 * CONSUMER_WARPS)  # m16 blocks of weight rows per consumer warp
        self.tok_tiles = m_tile // 8  # n8 tiles of tokens
        self.w_stage_bytes = plan.block_n * ROW_BYTES
        self.x_stage_bytes = m_tile * ROW_BYTES
        self.pitch = plan.block_n + PARTIAL_PAD  # fp32 per token row of the partial tile
        self.cols_per_rank = plan.block_n // plan.splits  # output columns of a tile each cluster rank reduces

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, bias_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 num_rows: Int32, stream: cuda.CUstream):
        """bias_ptr: [N] bf16, read only when compiled with a bias (any valid pointer otherwise)."""
        n, k, mt, bn = self.n_out, self.k_dim, self.m_tile, self.block_n
        x = cute.make_tensor(x_ptr, cute.make_layout((num_rows, k), stride=(k, 1)))
        w = cute.make_tensor(w_ptr, cute.make_layout((n, k), stride=(k, 1)))
        bias = cute.make_tensor(bias_ptr, cute.make_layout((n,)))
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(utils.LayoutEnum.ROW_MAJOR, BFloat16, BLOCK_K), BFloat16)
        # K-major 8-row x 64-column 128-byte swizzle atoms stacked along the rows, then the stages: row r of a
        # stage starts r * 128 bytes in, its 16-byte chunk c sits at chunk c ^ (r % 8) (stage bases 1024-aligned)
        w_layout = cute.tile_to_shape(atom, (bn, BLOCK_K, self.stages), order=(0, 1, 2))
        x_layout = cute.tile_to_shape(atom, (mt, BLOCK_K, self.stages), order=(0, 1, 2))
        tma_atom_w, tma_w = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), w, cute.slice_(w_layout, (None, None, 0)), (bn, BLOCK_K))
        tma_atom_x, tma_x = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), x, cute.slice_(x_layout, (None, None, 0)), (mt, BLOCK_K))

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[Int64, self.stages]
            empty_bar: cute.struct.MemRange[Int64, self.stages]
            partial: cute.struct.Align[cute.struct.MemRange[Float32, mt * self.pitch], 16]
            s_w: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(w_layout)], 1024]
            s_x: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(x_layout)], 1024]

        self.shared_storage = SharedStorage
        cluster = None
        if cutlass.const_expr(self.splits > 1):
            cluster = (self.splits, 1, 1)
        self.kernel(tma_atom_w, tma_w, tma_atom_x, tma_x, w_layout, x_layout, bias, out_ptr, num_rows).launch(
            grid=(self.splits, self.n_tiles, 1), block=(THREADS, 1, 1), cluster=cluster, stream=stream, use_pdl=True)

    @cute.kernel
    def kernel(self, tma_atom_w: cute.CopyAtom, mW: cute.Tensor, tma_atom_x: cute.CopyAtom, mX: cute.Tensor,
               w_layout: cute.ComposedLayout, x_layout: cute.ComposedLayout, bias: cute.Tensor,
               out_ptr: cute.Pointer, num_rows: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        split, n_tile, _ = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        storage = utils.SmemAllocator().allocate(self.shared_storage)
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        if warp == PRODUCER_WARP:
            cpasync.prefetch_descriptor(tma_atom_w)
            cpasync.prefetch_descriptor(tma_atom_x)
        if tidx == 0:
            for s in cutlass.range_constexpr(self.stages):
                cute.arch.mbarrier_init(full + s, 1)  # the producer's expect-tx arrival; TMA completes the bytes
                cute.arch.mbarrier_init(empty + s, CONSUMER_WARPS)  # one arrival per consumer warp
            cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        k_begin = split * self.kps
        n_k = cutlass.min(self.kps, self.k_tiles - k_begin)  # >= 1: choose_plan leaves no split empty
        if warp == PRODUCER_WARP:
            self.produce(storage, tma_atom_w, mW, tma_atom_x, mX, w_layout, x_layout, full, empty, n_tile, k_begin,
                         n_k)
        else:
            await_inputs()  # nothing to read before the producer's token tiles; orders y's stores after the wait
            self.consume(storage, full, empty, warp, lane, n_k)
        self.reduce_store(storage, bias, out_ptr, num_rows, split, n_tile, tidx)

    @cute.jit
    def produce(self, storage, tma_atom_w: cute.CopyAtom, mW: cute.Tensor, tma_atom_x: cute.CopyAtom, mX: cute.Tensor,
                w_layout: cute.ComposedLayout, x_layout: cute.ComposedLayout, full, empty, n_tile: Int32,
                k_begin: Int32, n_k: Int32):
        """Producer warp: per k-tile, one expect-tx arrival (weight + token tile bytes) and two TMA copies (each
        cute.copy of a TMA atom elects its own issuing lane, so the whole warp calls it)."""
        s_w = storage.s_w.get_tensor(w_layout.outer, swizzle=w_layout.inner)  # (BN, 64, stages)
        s_x = storage.s_x.get_tensor(x_layout.outer, swizzle=x_layout.inner)  # (MT, 64, stages)
        g_w = cute.local_tile(mW, (self.block_n, BLOCK_K), (None, None))  # (BN, 64, N tiles, K tiles)
        g_x = cute.local_tile(mX, (self.m_tile, BLOCK_K), (0, None))  # (MT, 64, K tiles); rows >= M: zero-filled
        t_ws, t_wg = cpasync.tma_partition(tma_atom_w, 0, cute.make_layout(1), cute.group_modes(s_w, 0, 2),
                                           cute.group_modes(g_w, 0, 2))
        t_xs, t_xg = cpasync.tma_partition(tma_atom_x, 0, cute.make_layout(1), cute.group_modes(s_x, 0, 2),
                                           cute.group_modes(g_x, 0, 2))
        tx_bytes = self.w_stage_bytes + self.x_stage_bytes
        # The ring's first stages: weights before the dependency wait (no kernel writes them), tokens after it
        n_pre = cutlass.min(n_k, self.stages)
        for kt in cutlass.range(n_pre, unroll=1):
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(full + kt, tx_bytes)
            cute.copy(tma_atom_w, t_wg[(None, n_tile, k_begin + kt)], t_ws[(None, kt)], tma_bar_ptr=full + kt)
        await_inputs()  # x: the previous kernel's output
        for kt in cutlass.range(n_pre, unroll=1):
            cute.copy(tma_atom_x, t_xg[(None, k_begin + kt)], t_xs[(None, kt)], tma_bar_ptr=full + kt)
        for kt in cutlass.range(n_pre, n_k, unroll=1):
            stage = kt % self.stages
            cute.arch.mbarrier_wait(empty + stage, ((kt // self.stages) & 1) ^ 1)  # all consumer warps are done
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(full + stage, tx_bytes)
            cute.copy(tma_atom_w, t_wg[(None, n_tile, k_begin + kt)], t_ws[(None, stage)], tma_bar_ptr=full + stage)
            cute.copy(tma_atom_x, t_xg[(None, k_begin + kt)], t_xs[(None, stage)], tma_bar_ptr=full + stage)

    @cute.jit
    def consume(self, storage, full, empty, warp: Int32, lane: Int32, n_k: Int32):
        """Consumer warp: mma.sync over its weight rows and all token rows, k-tile after k-tile, then its fp32
        partial tile into shared memory (partial[token][weight row], rows PARTIAL_PAD floats apart)."""
        mpw, ntt = self.m16_per_warp, self.tok_tiles
        w_base = storage.s_w.data_ptr().toint()
        x_base = storage.s_x.data_ptr().toint()
        a_off = [[weight_fragment_offset(warp * mpw + i, q, lane) for q in range(BLOCK_K // 16)] for i in range(mpw)]
        b_off = [token_fragment_offset(idx, lane, self.m_tile) for idx in range(token_loads_per_stage(self.m_tile))]
        acc = cute.make_rmem_tensor((mpw * ntt * 4,), Float32)
        acc.fill(0.0)
        for kt in cutlass.range(n_k, unroll=1):
            stage = kt % self.stages
            cute.arch.mbarrier_wait(full + stage, (kt // self.stages) & 1)
            w_stage = w_base + stage * self.w_stage_bytes
            x_stage = x_base + stage * self.x_stage_bytes
            bf = []  # bf[q][j] = (b0, b1) of k-step q, token n-tile j
            if cutlass.const_expr(ntt == 1):
                for bo in b_off:
                    r = ldmatrix_x4(x_stage + bo)
                    bf.append([(r[0], r[1])])
                    bf.append([(r[2], r[3])])
            else:
                blocks = ntt // 2  # 16-token blocks: one ldmatrix.x4 each per k-step
                for q in cutlass.range_constexpr(BLOCK_K // 16):
                    row = []
                    for t in cutlass.range_constexpr(blocks):
                        r = ldmatrix_x4(x_stage + b_off[q * blocks + t])
                        row += [(r[0], r[1]), (r[2], r[3])]
                    bf.append(row)
            af = [[ldmatrix_x4(w_stage + a_off[i][q]) for q in range(BLOCK_K // 16)] for i in range(mpw)]
            for i in cutlass.range_constexpr(mpw):
                for j in cutlass.range_constexpr(ntt):
                    base = (i * ntt + j) * 4
                    c = [acc[base], acc[base + 1], acc[base + 2], acc[base + 3]]
                    for q in cutlass.range_constexpr(BLOCK_K // 16):
                        c = mma_16bit(af[i][q], bf[q][j], c, "bf16")
                    for e in cutlass.range_constexpr(4):
                        acc[base + e] = c[e]
            # the mma consumed every lane's fragments, so the warp's reads of the stage are done
            if lane == 0:
                cute.arch.mbarrier_arrive(empty + stage)

        # C fragment of m16 block i, n-tile j: c0, c1 = (weight row g, tokens 2c, 2c + 1), c2, c3 = (row g + 8, ...)
        part = storage.partial.get_tensor(cute.make_layout((self.m_tile, self.block_n), stride=(self.pitch, 1)))
        g = lane // 4
        c4 = lane % 4
        for i in cutlass.range_constexpr(mpw):
            for j in cutlass.range_constexpr(ntt):
                base = (i * ntt + j) * 4
                row = warp * 16 * mpw + 16 * i + g
                tok = 8 * j + 2 * c4
                part[tok, row] = acc[base]
                part[tok + 1, row] = acc[base + 1]
                part[tok, row + 8] = acc[base + 2]
                part[tok + 1, row + 8] = acc[base + 3]

    @cute.jit
    def reduce_store(self, storage, bias: cute.Tensor, out_ptr: cute.Pointer, num_rows: Int32, split: Int32,
                     n_tile: Int32, tidx: Int32):
        """Every thread of the CTA: sum the S partial tiles of columns split * BN / S ... (all CTAs of the cluster,
        rank order), + bias, bf16 rows of y. Items are (token, 4 columns)."""
        s = self.splits
        groups = self.cols_per_rank // 4
        n_items = self.m_tile * groups
        rounds = (n_items + THREADS - 1) // THREADS
        p_base = storage.partial.data_ptr().toint()
        # the bias (no kernel's output) is loaded before the barrier, its latency hidden behind the slowest peer;
        # its column n_tile * BN + col is in range for every item, valid or not
        bias_vals = []
        for rnd in cutlass.range_constexpr(rounds):
            n = n_tile * self.block_n + split * self.cols_per_rank + ((tidx + rnd * THREADS) % groups) * 4
            if cutlass.const_expr(self.has_bias):
                bias_vals.append([bias[n + e].to(Float32) for e in range(4)])
        if cutlass.const_expr(s > 1):
            cute.arch.cluster_arrive()  # release: this CTA's partial tile is written
            cute.arch.cluster_wait()  # acquire: so are its peers'
        else:
            cute.arch.sync_threads()
        out_base = out_ptr.toint()
        for rnd in cutlass.range_constexpr(rounds):
            item = tidx + rnd * THREADS
            tok = item // groups
            col = split * self.cols_per_rank + (item % groups) * 4  # column of the tile
            if item < n_items and tok < num_rows:
                addr = p_base + (tok * self.pitch + col) * 4
                total = [Float32(0.0)] * 4
                if cutlass.const_expr(s > 1):
                    for r in cutlass.range_constexpr(s):  # rank order: the same sum on every run
                        part = ld_cluster_v4_f32(cluster_address(addr, Int32(r)))
                        total = [total[e] + part[e] for e in range(4)]
                else:
                    total = lds_v4_f32(addr)
                if cutlass.const_expr(self.has_bias):
                    total = [total[e] + bias_vals[rnd][e] for e in range(4)]
                n = n_tile * self.block_n + col
                dst = out_base + (tok.to(Int64) * self.n_out + n.to(Int64)) * 2
                stg_v2(dst, pack2(total[0], total[1], "bf16"), pack2(total[2], total[3], "bf16"))
        if cutlass.const_expr(s > 1):
            cute.arch.cluster_arrive()  # this CTA's reads of its peers are done ...
            cute.arch.cluster_wait()  # ... and theirs of it: only now may any CTA of the cluster exit


# ------------------------------------------------------------------------------------------------
# Host side: compile cache and launch wrapper.
# ------------------------------------------------------------------------------------------------

_compiled = CompileCache("skinny_gemm")  # (N, K, MT, plan, bias) -> compiled function; never keyed on M


def make_compile_args(n_out: int, k_dim: int, m_tile: int, plan: SkinnyPlan, has_bias: bool, stream=None):
    """(jit function, arguments) for cute.compile with placeholder pointers; M is dynamic."""
    gmem = cute.AddressSpace.gmem
    args = (make_ptr(BFloat16, 16, gmem, assumed_align=16), make_ptr(BFloat16, 16, gmem, assumed_align=16),
            make_ptr(BFloat16, 16, gmem, assumed_align=2), make_ptr(BFloat16, 16, gmem, assumed_align=16),
            Int32(1), stream)
    return SkinnyGemmSm90(n_out, k_dim, m_tile, plan, has_bias), args


def _check(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> None:
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype != torch.bfloat16:
        raise ValueError(f"skinny_linear: weight must be a contiguous [N, K] bf16 tensor, got {list(weight.shape)} "
                         f"{weight.dtype}")
    n_out, k_dim = weight.shape
    if x2.shape[1] != k_dim or x2.dtype != torch.bfloat16 or not x2.is_contiguous():
        raise ValueError(f"skinny_linear: x must be contiguous [..., {k_dim}] bf16, got {list(x2.shape)} {x2.dtype}")
    ok, reason = supports(x2.dtype, x2.shape[0], n_out, k_dim, bias is not None)
    if not ok:
        raise ValueError(f"skinny_linear: {reason}")
    if bias is not None and (bias.shape != (n_out,) or bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        raise ValueError(f"skinny_linear: bias must be a contiguous [{n_out}] bf16 tensor, got {list(bias.shape)} "
                         f"{bias.dtype}")
    if out is not None and (out.shape != (x2.shape[0], n_out) or out.dtype != torch.bfloat16
                            or not out.is_contiguous()):
        raise ValueError(f"skinny_linear: out must be a contiguous [{x2.shape[0]}, {n_out}] bf16 tensor, got "
                         f"{list(out.shape)} {out.dtype}")
    tensors = [x2, weight] + [t for t in (bias, out) if t is not None]
    if any(not t.is_cuda for t in tensors):
        raise ValueError("skinny_linear: every tensor must be on a CUDA device")
    if any(t.data_ptr() % 16 for t in (x2, weight, *(t for t in (out,) if t is not None))):
        raise ValueError("skinny_linear: x, weight and out must be 16-byte aligned (TMA / 8-byte stores)")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, *, block_n: int | None = None,
                  splits: int | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] W^T (+ bias) for 1..64 rows of x, bf16 (torch.nn.functional.linear's contract).
    out: a contiguous [M, N] buffer to write (allocated when None). No host synchronisation: capturable in a
    CUDA graph (the plan depends on N, K and the SM count only; M is fixed per captured graph). The weight is
    read before the previous kernel of the stream has finished (programmatic dependent launch): it must not be
    the output of the kernel launched just before. block_n / splits override choose_plan (tests, benchmarks)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    _check(x2, weight, bias, out)
    num_rows = x2.shape[0]
    n_out, k_dim = weight.shape
    if out is None:
        out = x2.new_empty(num_rows, n_out)
    m_tile = token_tile(num_rows)
    plan = choose_plan(n_out, k_dim, sm_count(x2.device), m_tile, block_n, splits)
    key = (n_out, k_dim, m_tile, plan, bias is not None)
    fn = _compiled.get(key, lambda: make_compile_args(*key, current_stream()))
    gmem = cute.AddressSpace.gmem
    fn(
        make_ptr(BFloat16, x2.data_ptr(), gmem, assumed_align=16),
        make_ptr(BFloat16, weight.data_ptr(), gmem, assumed_align=16),
        make_ptr(BFloat16, (bias if bias is not None else out).data_ptr(), gmem, assumed_align=2),
        make_ptr(BFloat16, out.data_ptr(), gmem, assumed_align=16),
        Int32(num_rows),
        current_stream(),
    )
    return out.view(*lead, n_out)
