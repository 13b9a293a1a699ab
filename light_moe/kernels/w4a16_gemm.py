"""W4A16 grouped GEMM for the routed experts on Hopper (sm_90a), in CuTe DSL 4.3.5.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows sorted by
expert (rows of expert e are expert_offsets[e]:expert_offsets[e + 1], on the device), g group size.

    w4a16_expert_up(x [T, H], gather_index [M], expert_offsets [E+1], w13 prepared) -> act [M, I]
    w4a16_expert_down(act [M, I], expert_offsets [E+1], w2 prepared)                -> y [M, H]
    (optional, expert_epilogue.py: biases b13 [E, 2I] / b2 [E, H] and gpt-oss's clamped SwiGLU)

The same kernel as grouped_gemm.py (swap AB: C^T = W X^T per expert, weight rows = wgmma M, routed token
rows = wgmma N = tile_t, persistent over the tiles found from expert_offsets, warp-specialised, fused
SiLU*up epilogue, no host sync, CUDA-graph capturable), except for how the weights get into the wgmma:

  * Weights are the wgmma A operand **from registers** (`OperandSource.RMEM`, wgmma "RS"): 4.3.5's
    `make_trivial_tiled_mma(..., a_source=RMEM)` builds it. int4 never becomes bf16 in shared memory.
  * Layout (w4a16_layout.py): per (expert, k-tile of 64, 64-row atom) 2 KB in which consumer thread t
    owns 16 contiguous bytes = its A fragments of the 4 k16 steps. The producer warpgroup copies them
    with 16-byte cp.async (2 KB contiguous per atom, fully coalesced) into a deep smem ring, beside the
    gathered token rows; per group it also copies the tile's `meta` words (bf16 scale, bf16 -(128+z)).
  * Dequant per k-tile: one ld.shared.v4 per atom, then per bf16x2 register one shift + lop3 (the
    nibbles OR'd into the mantissa of bf16 128.0: 128 + q exactly), fma(t, 1, -(128 + z)) (exact) into a
    temporary and fma(t, s, -0) (one rounding: the same bf16 as rounding the fp32 dequantisation) into
    the A register: 4 registers x 4 inline PTX instructions per atom and k16 step.
  * wgmma pipelining: ptxas serialises every wgmma of the kernel (warning C7513: each wgmma followed by
    its own wait) as soon as any non-wgmma instruction writes a wgmma input register while a wgmma is in
    flight - two A register sets rewritten under wait_group(1) are enough to trigger it. So the only
    A-writing instruction, the scale fma, runs with nothing in flight; per k-tile kt a consumer warpgroup
    does dequant_exact(kt) (ld.shared + exact part into temporaries, wgmma kt - 1 still running),
    wait_group(0), releases stage kt - 1, then scale_and_mma(kt): scale fma into A, fence, 4 wgmma
    back to back, commit. One A set + 16 temporaries per atom; one wgmma wait per k-tile (was 4). In the
    SASS ptxas still moves that wait above the exact part (it reuses A's registers for the temporaries),
    so inside one warpgroup only the ld.shared overlaps the previous wgmma.
  * Split K for tile_w = 64 (TileConfig.k_split = 2 or 4): k_split consumer warpgroups take the k-tiles
    kt = c (mod k_split) of a tile, so one dequantises while the others wait for their wgmma; warpgroups
    1..k_split-1 hand their fp32 partial sums to warpgroup 0 through shared memory before the epilogue,
    which adds them in order (a different fp32 summation order than one warpgroup: rounding-level
    differences). Each stage is still read by one warpgroup (4 empty-barrier arrivals); k_split must divide
    the k-tiles of a tile (K / 64). k_split = 4: 640 threads, setmaxnreg 56 / CONSUMER_REGS[4]. tile_w = 128
    keeps one m64 atom per warpgroup over all k-tiles (k_split = 1).
  * Zero points: symmetric weights carry -(128 + 8) in meta, so one compiled kernel serves both.
  * TMA is not used for weights: cp.async keeps the weight copy, the meta copy and the gather in one
    producer loop with one mbarrier arrival per thread; whether TMA would stream faster is a GPU question.

Status and measurements: docs/kernels.md "W4A16 grouped GEMM", BENCHMARKS.md.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
import torch
from cutlass import BFloat16, Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cute.runtime import from_dlpack

from light_moe.kernels import expert_epilogue, gemm_host, w4a16_plan
from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.expert_epilogue import DEFAULT_EPILOGUE, ExpertEpilogue, load_bias
from light_moe.kernels.gemm_host import VEC, WG, epilogue_tokens
from light_moe.kernels.gemm_pipeline import (
    build_tile_schedule,
    copy_token_rows,
    drain_producer,
    gather_sources,
    locate_tile,
    prefetch_l2,
    signal_full,
    stage_out_chunk,
    store_out_chunk,
    wait_full,
)
from light_moe.kernels.launch import await_inputs, sm_count
from light_moe.kernels.tile_config import W4A16_TILE_TABLE, TileConfig, choose_w4a16_tile
from light_moe.kernels.w4a16_dequant import (
    apply_scale,
    bf16_lo_to_f32,
    dequant_exact,
    fold_scaled,
    nibble_bits,
    prmt,
    remove_zero,
)
from light_moe.kernels.w4a16_direct import direct_workspace, make_direct_kernel
from light_moe.kernels.w4a16_layout import (
    ATOM_M,
    TILE_K,
    W4A16Weights,
    check_prepared,
    prepare_w4a16_weights,
)
from light_moe.kernels.w4a16_plan import supports

__all__ = [
    "W4A16_TILE_TABLE",
    "W4A16GroupedGemmSm90",
    "W4A16Weights",
    "choose_w4a16_tile",
    "prepare_w4a16_weights",
    "supports",
    "w4a16_expert_down",
    "w4a16_expert_up",
]

PRODUCER_REGS = 56
# setmaxnreg per consumer warpgroup count. The CTA is launched at R registers per thread (ptxas: 168 for
# 384 threads, 96 for 640) and the consumers' increase must come out of what the producer frees:
# 128 (R - 56) >= 128 n (C - R). n = 4: C <= 104 (the k_split = 4 consumer needs ~60).
CONSUMER_REGS = {1: 232, 2: 224, 4: 104}


class W4A16GroupedGemmSm90:
    """out[rows of e] = epilogue(tokens[rows of e] @ dequant(W[e])^T) for every expert e, one launch.

    gated=True: up-projection, tokens = x [T, H] gathered through gather_index, weights = prepared w13
    (gate/up rows interleaved by 8), out = act [M, I] = SiLU(gate) * up.
    gated=False: down-projection, tokens = act [M, I] read in place, weights = prepared w2, out = y [M, H].
    config.tma_tokens: tokens are read in place by TMA in both projections (the up projection's caller passes
    the gathered rows x[gather_index] [M, H]).
    epilogue: as grouped_gemm.GroupedGemmSm90's (bias [E, N] the last argument when epilogue.bias).
    """

    def __init__(self, *, gated: bool, n_out: int, k_dim: int, num_experts: int, group_size: int, config: TileConfig,
                 epilogue: ExpertEpilogue = DEFAULT_EPILOGUE):
        ok, reason = self.supports(
            gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, group_size=group_size, config=config
        )
        if ok:
            ok, reason = expert_epilogue.supports(epilogue, gated)
        if not ok:
            raise ValueError(reason)
        self.epilogue = epilogue
        self.gated = gated
        self.n_out = n_out
        self.k_dim = k_dim
        self.num_experts = num_experts
        self.group_size = group_size
        self.cp_async_lag = config.cp_async_lag
        self.tile_w = config.tile_w
        self.tile_t = config.tile_t
        self.n_atoms = config.tile_w // ATOM_M
        self.k_split = config.k_split  # consumer warpgroups along K (each takes every k_split-th k-tile)
        # consumer warpgroups along M (the wgmma atom layout); under split K one warpgroup takes every atom of
        # the tile (tile_w = 128: two), so the per-k-tile barrier, fence and ring work covers twice the bytes
        self.m_wg = 1 if self.k_split > 1 else min(self.n_atoms, 2)
        self.n_consumer_wg = self.m_wg * self.k_split
        self.n_consumer_threads = WG * self.n_consumer_wg
        self.threads = WG + self.n_consumer_threads
        self.out_cols = self.tile_w // 2 if gated else self.tile_w
        self.out_pitch = self.out_cols + VEC
        self.k_tiles = k_dim // TILE_K
        self.groups = k_dim // group_size
        self.groups_per_ktile = max(1, TILE_K // group_size)  # meta rows per stage: 2 for g = 32, else 1
        self.kps = config.k_tiles_per_stage  # 2: one g = 128 group (two k-tiles) per stage
        self.kblock_pipeline = config.kblock_pipeline  # per-k16-block scale + wgmma, 3 blocks in flight
        self.bulk_weights = config.bulk_weights  # int4 atoms of a k-tile by one cp.async.bulk
        # the token rows of a k-tile by one TMA: contiguous rows, so the up projection's caller gathers x first
        self.tma_tokens = config.tma_tokens
        # exact q - z in A, one fp32 accumulator per group folded with its scale (w4a16_dequant.py); g >= 64, so
        # a k-tile that loads meta is exactly one that starts a group
        self.deferred_scale = config.deferred_scale
        # the down projection's pre-wait L2 prefetch of its first stages (TileConfig.l2_prefetch); the up
        # projection's expert list is its predecessor's output, so it never prefetches
        self.l2_prefetch = config.l2_prefetch and not gated
        # TMA tokens: wgmma reads nothing written through the generic proxy (the int4 and meta that cp.async
        # writes are read by ld.shared), so there is nothing to fence
        self.fence_mode = "none" if config.tma_tokens else config.fence_mode
        # stages between meta copies: a g = 128 group spans 2 k-tiles and its meta comes with the first one,
        # except under split K, where the two k-tiles go to different warpgroups and each stage brings its own,
        # and with 2 k-tiles per stage (one group per stage).
        self.meta_stages = 1 if self.k_split > 1 or self.kps > 1 else max(1, group_size // TILE_K)
        self.red_words = self.reduce_bytes(config) // 4
        self.epi_t = epilogue_tokens(config, gated)
        self.stages = self.num_stages(config, gated, num_experts, group_size)

    # host-side sizing and checks: w4a16_plan.py
    reduce_bytes = staticmethod(w4a16_plan.reduce_bytes)
    stage_bytes = staticmethod(w4a16_plan.stage_bytes)
    num_stages = staticmethod(w4a16_plan.num_stages)
    supports = staticmethod(w4a16_plan.supports_config)

    @cute.jit
    def __call__(
        self,
        qweight: cute.Tensor,  # (E * K/64 * N/64 * 128, 4) int32: prepared.qweight viewed as 16-byte chunks
        meta: cute.Tensor,  # (E * G * N / 4, 4) int32: prepared.meta viewed as 16-byte chunks
        tokens: cute.Tensor,  # (rows, k_dim) bf16: x [T, H] (gated; TMA tokens: x[gather_index] [M, H]) or act
        gather_index: cute.Tensor,  # (M,) int32 token row of each sorted row (read only when gated)
        expert_offsets: cute.Tensor,  # (E + 1,) int32
        out: cute.Tensor,  # (M, n_out / 2) gated, (M, n_out) otherwise
        num_ctas: Int32,
        stream: cuda.CUstream,
        bias: cute.Tensor = None,  # (E, n_out) bf16 in canonical row order, epilogue.bias only (None: compile-time)
    ):
        self.tiled_mma = self.make_tiled_mma()
        # deferred scale: the first wgmma of a group overwrites its accumulator (ACCUMULATE off, set once here:
        # a field set inside the k loop would become loop state)
        tiled_mma_first = None
        if cutlass.const_expr(self.deferred_scale):
            tiled_mma_first = self.make_tiled_mma()
            tiled_mma_first.set(warpgroup.Field.ACCUMULATE, False)
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(utils.LayoutEnum.ROW_MAJOR, BFloat16, TILE_K), BFloat16
        )
        # K-major token rows, 128-byte swizzle atoms of 8 rows x 64 columns: along the rows first, then the
        # k-tiles of a stage, then the stages (the producer's raw view relies on this order)
        t_layout = cute.tile_to_shape(atom, (self.tile_t, TILE_K * self.kps, self.stages), order=(0, 1, 2))
        q_words = self.n_atoms * self.kps * WG * 4  # int32 per stage
        meta_words = self.groups_per_ktile * self.tile_w

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[Int64, self.stages]
            empty_bar: cute.struct.MemRange[Int64, self.stages]
            expert_rows: cute.struct.MemRange[Int32, self.num_experts + 1]
            tile_prefix: cute.struct.MemRange[Int32, self.num_experts + 1]
            s_out: cute.struct.Align[cute.struct.MemRange[BFloat16, self.epi_t * self.out_pitch], 128]
            s_q: cute.struct.Align[cute.struct.MemRange[Int32, q_words * self.stages], 128]
            s_meta: cute.struct.Align[cute.struct.MemRange[Int32, meta_words * self.stages], 128]
            s_red: cute.struct.Align[cute.struct.MemRange[Float32, max(1, self.red_words)], 16]
            s_t: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(t_layout)], 1024]

        self.shared_storage = SharedStorage
        tma_atom_t = None
        if cutlass.const_expr(self.tma_tokens):  # tokens becomes the TMA coordinate tensor of its [M, k] rows
            tma_atom_t, tokens = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), tokens, cute.slice_(t_layout, (None, None, 0)), (self.tile_t, TILE_K)
            )
        self.kernel(
            qweight, meta, tokens, gather_index, expert_offsets, out, self.tiled_mma, tiled_mma_first, t_layout,
            tma_atom_t, bias,
        ).launch(
            grid=(num_ctas, 1, 1),
            block=(self.threads, 1, 1),
            min_blocks_per_mp=1,
            stream=stream,
            use_pdl=True,
        )

    def make_tiled_mma(self) -> cute.TiledMma:
        """wgmma bf16 x bf16 -> fp32, A (weights) from registers, m_wg m64 atoms along M, tile_t columns."""
        return sm90_utils.make_trivial_tiled_mma(
            BFloat16,
            BFloat16,
            warpgroup.OperandMajorMode.K,
            warpgroup.OperandMajorMode.K,
            Float32,
            (self.m_wg, 1, 1),
            tiler_mn=(64, self.tile_t),
            a_source=warpgroup.OperandSource.RMEM,
        )

    @cute.kernel
    def kernel(
        self,
        qweight: cute.Tensor,
        meta: cute.Tensor,
        tokens: cute.Tensor,
        gather_index: cute.Tensor,
        expert_offsets: cute.Tensor,
        out: cute.Tensor,
        tiled_mma: cute.TiledMma,
        tiled_mma_first: cute.TiledMma | None,
        t_layout: cute.ComposedLayout,
        tma_atom_t: cute.CopyAtom | None,
        bias: cute.Tensor | None,
    ):
        n_exp = self.num_experts
        tile_t = self.tile_t
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // WG)
        lane = cute.arch.lane_idx()

        storage = utils.SmemAllocator().allocate(self.shared_storage)
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        s_rows = storage.expert_rows.get_tensor(cute.make_layout(n_exp + 1))
        s_prefix = storage.tile_prefix.get_tensor(cute.make_layout(n_exp + 1))
        if tidx == 0:
            for s in cutlass.range_constexpr(self.stages):
                # one arrival per producer thread (its cp.async), plus the expect-tx arrival of the bulk / TMA copies
                cute.arch.mbarrier_init(full + s, WG + int(self.bulk_weights or self.tma_tokens))
                cute.arch.mbarrier_init(empty + s, 4 * self.m_wg)  # one arrival per warp that reads the stage
            cute.arch.mbarrier_init_fence()
        if cutlass.const_expr(not self.l2_prefetch):
            await_inputs()  # expert_offsets, tokens: the router's and the previous GEMM's outputs

        if warp == 0:  # the tile schedule of grouped_gemm.py
            build_tile_schedule(expert_offsets, s_rows, s_prefix, lane, n_exp, tile_t, self.n_out // self.tile_w)
        cute.arch.sync_threads()

        total_tiles = s_prefix[n_exp]
        if cutlass.const_expr(self.l2_prefetch):
            # down projection: expert_offsets were complete before the up GEMM passed its wait (TileConfig
            # .l2_prefetch), so the schedule above is safe; act, the up GEMM's output, is read only after this wait
            if wg == 0:
                self.prefetch_first_stages(qweight, s_rows, s_prefix, total_tiles)
            await_inputs()
        if wg == 0:
            if cutlass.const_expr(self.tma_tokens):
                if warp == 0:
                    cpasync.prefetch_descriptor(tma_atom_t)
            self.produce(qweight, meta, tokens, gather_index, storage, t_layout, tma_atom_t, s_rows, s_prefix,
                         total_tiles)
        else:
            self.consume(out, tiled_mma, tiled_mma_first, storage, t_layout, s_rows, s_prefix, total_tiles, bias)

    @cute.jit
    def prefetch_first_stages(self, qweight: cute.Tensor, s_rows: cute.Tensor, s_prefix: cute.Tensor,
                              total_tiles: Int32):
        """Producer thread kt < the ring's k-tiles: an L2 prefetch of k-tile kt's int4 atoms (n_atoms x 2 KB,
        contiguous) of this CTA's first tile, the bytes its first stages will load."""
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        ahead = min(self.stages * self.kps, self.k_tiles)
        if bidx < total_tiles and tidx < ahead:
            e, _, _, w_tile, _ = locate_tile(bidx, Int32(0), s_rows, s_prefix, self.tile_t)
            chunk = ((e * self.k_tiles + tidx) * (self.n_out // ATOM_M) + w_tile * self.n_atoms) * WG
            prefetch_l2(qweight.iterator.toint() + Int64(chunk) * 16, self.n_atoms * WG * 16)

    @cute.jit
    def produce(
        self,
        qweight: cute.Tensor,
        meta: cute.Tensor,
        tokens: cute.Tensor,
        gather_index: cute.Tensor,
        storage,
        t_layout: cute.ComposedLayout,
        tma_atom_t: cute.CopyAtom | None,
        s_rows: cute.Tensor,
        s_prefix: cute.Tensor,
        total_tiles: Int32,
    ):
        """Producer warpgroup: cp.async of the int4 atoms, the group meta and the token rows (128 threads); or
        the int4 atoms by one cp.async.bulk and / or the token rows by one TMA of producer warp 0 (bulk_weights,
        tma_tokens)."""
        tile_t = self.tile_t
        n_atoms = self.n_atoms
        gpk = self.groups_per_ktile
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        cute.arch.warpgroup_reg_dealloc(PRODUCER_REGS)
        kps = self.kps
        s_q = storage.s_q.get_tensor(
            cute.make_layout((4, WG, n_atoms * kps, self.stages), stride=(1, 4, 4 * WG, 4 * WG * n_atoms * kps))
        )
        meta_chunks = gpk * self.tile_w // 4  # 16-byte meta chunks per stage
        s_meta = storage.s_meta.get_tensor(
            cute.make_layout((4, meta_chunks, self.stages), stride=(1, 4, 4 * meta_chunks))
        )
        # Unswizzled view of the token stages: the 16-byte chunk c of row r lives at chunk c ^ (r % 8)
        # (the 128-byte swizzle the wgmma descriptor of t_layout expects; stage bases are 1024-aligned).
        # Block stage * kps + h holds k-tile h of the stage (t_layout's order).
        s_t_raw = storage.s_t.get_tensor(
            cute.make_layout((tile_t, TILE_K, self.stages * kps), stride=(TILE_K, 1, tile_t * TILE_K))
        )
        g2s_bf16 = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), BFloat16, num_bits_per_copy=128
        )
        g2s_i32 = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), Int32, num_bits_per_copy=128
        )
        words = n_atoms * WG * 4  # int32 of one k-tile's atoms
        bulk_i32 = cute.make_copy_atom(cpasync.CopyBulkG2SOp(), Int32, num_bits_per_copy=words * 32)
        sq_ptr = storage.s_q.data_ptr()
        s_t = storage.s_t.get_tensor(t_layout.outer, swizzle=t_layout.inner)  # (tile_t, 64, stages) under TMA
        tx_bytes = int(self.bulk_weights) * kps * n_atoms * WG * 16 + int(self.tma_tokens) * tile_t * TILE_K * 2
        chunk = tidx % VEC
        row0 = tidx // VEC  # 0..15: 16 rows per pass, 8 threads (128 bytes) per row
        n_slots = max(tile_t // 16, 1)
        chunk_sw = chunk ^ (row0 % 8)
        row_active = row0 < tile_t
        n_blocks = self.n_out // ATOM_M  # 64-row atoms per expert
        src_rows = cute.make_rmem_tensor((n_slots,), Int32)
        issued = Int32(0)  # k-tile stages this producer has filled so far (all tiles)
        # the ring position of `issued` and the phase its empty barrier is awaited in, advanced by one add and a
        # wrap per stage: issued % stages and issued // stages cost ~10 uniform instructions per stage and
        # producer warp (stages is rarely a power of two) in a kernel bound by issue slots at decode
        stage = Int32(0)
        phase = Int32(1)  # the first pass over the ring: every stage is free
        tile = bidx
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = locate_tile(tile, e, s_rows, s_prefix, tile_t)
            if cutlass.const_expr(self.tma_tokens):
                # tile_t rows from row_start (not tile-aligned: experts start anywhere); rows of the next expert
                # only reach output columns the epilogue never stores, rows past M are zero-filled
                g_t = cute.local_tile(cute.domain_offset((row_start, 0), tokens), (tile_t, TILE_K), (0, None))
                t_ts, t_tg = cpasync.tma_partition(tma_atom_t, 0, cute.make_layout(1), cute.group_modes(s_t, 0, 2),
                                                   cute.group_modes(g_t, 0, 2))
            else:
                gather_sources(src_rows, gather_index, row_start, rows_hi, row0, n_slots, self.gated)
            for ks in range(self.k_tiles // kps):  # stage ks holds k-tiles kps * ks .. kps * ks + kps - 1
                cute.arch.mbarrier_wait(empty + stage, phase)
                # int4 atoms: chunk ((e * KT + kt) * NB + atom) * 128 + thread, 2 KB contiguous per atom, and the
                # n_atoms atoms of a tile's k-tile are adjacent (n_atoms x 2 KB)
                # thread 0 expects the bytes of the bulk int4 (which it copies) and of the TMA token rows, which
                # the whole warp 0 issues (the TMA copy elects its thread itself: elect.sync needs all 32)
                if cutlass.const_expr(self.bulk_weights or self.tma_tokens):
                    if tidx == 0:
                        cute.arch.mbarrier_arrive_and_expect_tx(full + stage, tx_bytes)
                        if cutlass.const_expr(self.bulk_weights):
                            self.bulk_copy_weights(bulk_i32, qweight, sq_ptr, full, stage, e, ks, w_tile)
                if cutlass.const_expr(self.tma_tokens):
                    if tidx < 32:
                        cute.copy(tma_atom_t, t_tg[(None, ks)], t_ts[(None, stage)], tma_bar_ptr=full + stage)
                if cutlass.const_expr(not self.bulk_weights):
                    for h in cutlass.range_constexpr(kps):
                        q_base = ((e * self.k_tiles + ks * kps + h) * n_blocks + w_tile * n_atoms) * WG + tidx
                        for a in cutlass.range_constexpr(n_atoms):
                            cute.copy(g2s_i32, qweight[q_base + a * WG, None], s_q[None, tidx, a + n_atoms * h, stage])
                # meta of the groups starting in this stage (consumers keep them in registers); under split K
                # every stage brings the meta of its group
                if ks % self.meta_stages == 0:
                    if tidx < meta_chunks:
                        grp = tidx // (self.tile_w // 4)
                        m_chunk = (
                            (e * self.groups + (ks * kps * TILE_K) // self.group_size + grp) * self.n_out
                            + w_tile * self.tile_w
                        ) // 4 + (tidx - grp * (self.tile_w // 4))
                        cute.copy(g2s_i32, meta[m_chunk, None], s_meta[None, tidx, stage])
                if cutlass.const_expr(not self.tma_tokens):
                    if row_active:
                        for h in cutlass.range_constexpr(kps):
                            copy_token_rows(g2s_bf16, tokens, s_t_raw, src_rows, row0, chunk, chunk_sw, ks * kps + h,
                                            stage * kps + h, n_slots)
                signal_full(full, stage, issued, self.stages, self.fence_mode, self.cp_async_lag)
                issued = issued + 1
                stage = stage + 1
                if stage >= self.stages:
                    stage = stage - self.stages
                    phase = phase ^ 1
            tile = tile + gdim
        drain_producer(full, issued, self.stages, self.fence_mode, self.cp_async_lag)

    @cute.jit
    def bulk_copy_weights(self, bulk_i32: cute.CopyAtom, qweight: cute.Tensor, sq_ptr, full, stage: Int32, e: Int32,
                          ks: Int32, w_tile: Int32):
        """One thread: the int4 atoms of the k-tiles of stage ks (n_atoms x 2 KB contiguous each) by cp.async.bulk,
        completing on the stage's full barrier."""
        kps = self.kps
        words = self.n_atoms * WG * 4
        bulk_layout = cute.make_layout((words, 1))
        for h in cutlass.range_constexpr(kps):
            q_base = ((e * self.k_tiles + ks * kps + h) * (self.n_out // ATOM_M) + w_tile * self.n_atoms) * WG
            src = cute.make_tensor(qweight.iterator + q_base * 4, bulk_layout)
            dst = cute.make_tensor(sq_ptr + (stage * kps + h) * words, bulk_layout)
            cute.copy(bulk_i32, src, dst, mbar_ptr=full + stage)

    @cute.jit
    def release_stage(self, empty, stage: Int32):
        """One arrival per consumer warp: the stage's wgmma has completed and its shared memory was read."""
        if cute.arch.lane_idx() == 0:
            cute.arch.mbarrier_arrive(empty + stage)

    @cute.jit
    def dequant_exact(
        self,
        tmp: cute.Tensor,
        s_q: cute.Tensor,
        s_meta: cute.Tensor,
        scale2: cute.Tensor,
        neg_zero2: cute.Tensor,
        atom_idx: cute.Tensor,
        meta_row: cute.Tensor,
        stage: Int32,
        load_meta: cutlass.Constexpr,
        half: cutlass.Constexpr,
    ):
        """First half of k-tile `half` of a stage that has landed: (new groups: meta -> scale2 / neg_zero2), one
        ld.shared.v4 per atom, and the exact part of the dequant into tmp (tmp[v] = bf16x2 q - z of A
        register v). Writes no wgmma operand, so it runs while the previous k-tile's wgmma is in flight;
        scale2 / neg_zero2 are free to rewrite because the previous scale_and_mma has already read them.
        Deferred scale: the meta words go to scale2 as they are (decoded after the wait, when the previous
        group's scale has been folded) and tmp[v] = bf16x2 128 + q (the zero point is removed into A).
        """
        tidx, _, _ = cute.arch.thread_idx()
        ctid_wg = (tidx - WG) % WG
        gpk = self.groups_per_ktile
        mma_m = cute.size(atom_idx)
        if cutlass.const_expr(load_meta):
            for m in cutlass.range_constexpr(mma_m):
                for j in cutlass.range_constexpr(gpk):
                    for h in cutlass.range_constexpr(2):
                        word = s_meta[j * self.tile_w + meta_row[m] + 8 * h, stage]
                        if cutlass.const_expr(self.deferred_scale):
                            scale2[(m * gpk + j) * 2 + h] = word
                        else:
                            scale2[(m * gpk + j) * 2 + h] = prmt(word, 0x1010)
                            neg_zero2[(m * gpk + j) * 2 + h] = prmt(word, 0x3232)
        q_reg = cute.make_rmem_tensor((4,), Int32)
        for m in cutlass.range_constexpr(mma_m):
            cute.autovec_copy(s_q[None, ctid_wg, atom_idx[m] + self.n_atoms * half, stage], q_reg)
            for kb in cutlass.range_constexpr(TILE_K // 16):
                j = (kb * 16) // self.group_size if cutlass.const_expr(gpk > 1) else 0
                word = q_reg[kb]
                for i in cutlass.range_constexpr(4):
                    reg = (m * gpk + j) * 2 + i % 2  # registers 0, 2: row r; 1, 3: row r + 8
                    if cutlass.const_expr(self.deferred_scale):
                        tmp[i + 4 * (m + mma_m * kb)] = nibble_bits(word, i)
                    else:
                        tmp[i + 4 * (m + mma_m * kb)] = dequant_exact(word, i, neg_zero2[reg])

    def scale_kblocks(self, a_i32: cute.Tensor, tmp: cute.Tensor, scale2: cute.Tensor, mma_m: int, kbs):
        """A registers of the k16 blocks kbs (every atom, atom-major) = tmp * group scale (traced inline)."""
        gpk = self.groups_per_ktile
        for m in range(mma_m):
            for kb in kbs:
                j = (kb * 16) // self.group_size if gpk > 1 else 0
                for i in range(4):
                    v = i + 4 * (m + mma_m * kb)
                    a_i32[v] = apply_scale(tmp[v], scale2[(m * gpk + j) * 2 + i % 2])

    def fold_group(self, acc: cute.Tensor, deferred):
        """Deferred scale: acc += group sum x group scale, per accumulator value (its row: atom v // (tile_t / 2),
        half (v % 4) // 2, as stage_out_chunk reads the fragment); after wait_group(0) (traced inline)."""
        acc_g, scale_f = deferred
        for v in range(cute.size(acc)):
            acc[v] = fold_scaled(acc[v], acc_g[v], scale_f[(v // (self.tile_t // 2)) * 2 + (v % 4) // 2])

    @cute.jit
    def scale_and_mma(
        self,
        tiled_mma: cute.TiledMma,
        acc: cute.Tensor,
        a_frag: cute.Tensor,
        tmp: cute.Tensor,
        t_cr_t: cute.Tensor,
        scale2: cute.Tensor,
        stage: Int32,
        half: cutlass.Constexpr,
        empty,
        prev_stage: Int32,
        wait: cutlass.Constexpr,
        release: cutlass.Constexpr,
        neg_zero2: cute.Tensor,
        new_group: cutlass.Constexpr,
        fold: cutlass.Constexpr,
        tiled_mma_first: cute.TiledMma | None,
        deferred,
    ):
        """Second half of a k-tile (k-tile `half` of the stage): A = fma(tmp, s, -0), fence, wgmma, commit, with
        no wgmma in flight that reads A. Whole k-tile: wait_group(0) first (when `wait`), then scale all four
        k16 blocks and issue their wgmma back to back as one group. TileConfig.kblock_pipeline: one k16 block at
        a time, after waiting until at most 3 groups are in flight (so the group that read block kb's registers
        a k-tile ago is done; groups complete in commit order), each block its own group: the tensor cores keep
        the other blocks' wgmma queued while this warpgroup rescales. release: once the previous stage's wgmma
        are done (after the wait, or the last block's wait), hand prev_stage back.
        Deferred scale (deferred = (group accumulator, fp32 group scales), scale2 holding the meta words): after
        the wait, at a new group (fold: not the tile's first) fold the previous group into acc and decode the new
        meta words, then A = tmp - (128 + z) (exact) and the wgmma sum into the group accumulator, overwritten by
        the group's first wgmma (tiled_mma_first: ACCUMULATE off)."""
        a_i32 = cute.recast_tensor(a_frag, Int32)
        mma_m = cute.size(acc, mode=[1])
        n_kb = TILE_K // 16
        if cutlass.const_expr(self.kblock_pipeline):
            for kb in cutlass.range_constexpr(n_kb):
                warpgroup.wait_group(n_kb - 1)
                if cutlass.const_expr(release and kb == n_kb - 1):
                    self.release_stage(empty, prev_stage)
                self.scale_kblocks(a_i32, tmp, scale2, mma_m, (kb,))
                warpgroup.fence()
                cute.gemm(tiled_mma, acc, a_frag[(None, None, kb)], t_cr_t[(None, None, kb + n_kb * half, stage)], acc)
                warpgroup.commit_group()
        elif cutlass.const_expr(self.deferred_scale):
            if cutlass.const_expr(wait):
                warpgroup.wait_group(0)  # the previous wgmma is done: the group sum is final, A may be rewritten
            if cutlass.const_expr(release):
                self.release_stage(empty, prev_stage)
            acc_g, scale_f = deferred
            if cutlass.const_expr(fold):
                self.fold_group(acc, deferred)
            if cutlass.const_expr(new_group):
                for r in cutlass.range_constexpr(2 * mma_m):
                    scale_f[r] = bf16_lo_to_f32(scale2[r])
                    neg_zero2[r] = prmt(scale2[r], 0x3232)
            for m in cutlass.range_constexpr(mma_m):
                for kb in cutlass.range_constexpr(n_kb):
                    for i in cutlass.range_constexpr(4):
                        v = i + 4 * (m + mma_m * kb)
                        a_i32[v] = remove_zero(tmp[v], neg_zero2[m * 2 + i % 2])
            warpgroup.fence()
            for kb in cutlass.range_constexpr(n_kb):
                b = t_cr_t[(None, None, kb + n_kb * half, stage)]
                if cutlass.const_expr(new_group and kb == 0):
                    cute.gemm(tiled_mma_first, acc_g, a_frag[(None, None, kb)], b, acc_g)
                else:
                    cute.gemm(tiled_mma, acc_g, a_frag[(None, None, kb)], b, acc_g)
            warpgroup.commit_group()
        else:
            if cutlass.const_expr(wait):
                warpgroup.wait_group(0)  # the previous wgmma is done: its stage is free and A may be rewritten
            if cutlass.const_expr(release):
                self.release_stage(empty, prev_stage)
            self.scale_kblocks(a_i32, tmp, scale2, mma_m, range(n_kb))
            warpgroup.fence()
            for kb in cutlass.range_constexpr(n_kb):
                cute.gemm(tiled_mma, acc, a_frag[(None, None, kb)], t_cr_t[(None, None, kb + n_kb * half, stage)],
                          acc)
            warpgroup.commit_group()

    @cute.jit
    def k_step(
        self,
        tiled_mma: cute.TiledMma,
        acc: cute.Tensor,
        a_frag: cute.Tensor,
        tmp: cute.Tensor,
        t_cr_t: cute.Tensor,
        s_q: cute.Tensor,
        s_meta: cute.Tensor,
        scale2: cute.Tensor,
        neg_zero2: cute.Tensor,
        atom_idx: cute.Tensor,
        meta_row: cute.Tensor,
        full,
        empty,
        stage: Int32,
        phase: Int32,
        prev_stage: Int32,
        load_meta: cutlass.Constexpr,
        tiled_mma_first: cute.TiledMma | None,
        deferred,
    ):
        """A stage after this warpgroup's first of the tile, per k-tile of it: dequant_exact while the previous
        k-tile's wgmma runs, wait_group(0), (first k-tile: release the previous stage, prev_stage),
        scale_and_mma. The caller advances the ring: the DSL carries loop state only through names that the
        loop body itself assigns or calls methods on."""
        wait_full(full, stage, phase, self.fence_mode)
        for h in cutlass.range_constexpr(self.kps):
            self.dequant_exact(tmp, s_q, s_meta, scale2, neg_zero2, atom_idx, meta_row, stage, load_meta and h == 0, h)
            new_group = load_meta and h == 0  # g >= 64 under deferred scale: a meta load starts a group
            self.scale_and_mma(tiled_mma, acc, a_frag, tmp, t_cr_t, scale2, stage, h, empty, prev_stage, True, h == 0,
                               neg_zero2, new_group, new_group, tiled_mma_first, deferred)

    @cute.jit
    def consume(
        self,
        out: cute.Tensor,
        tiled_mma: cute.TiledMma,
        tiled_mma_first: cute.TiledMma | None,
        storage,
        t_layout: cute.ComposedLayout,
        s_rows: cute.Tensor,
        s_prefix: cute.Tensor,
        total_tiles: Int32,
        bias: cute.Tensor | None,
    ):
        """Consumer warpgroups: dequant + wgmma (A from registers) over the k-tiles, then the epilogue.
        m_wg warpgroups along M (one m64 atom each) x k_split along K (split K: k-tiles kt = kwg mod k_split)."""
        tile_t = self.tile_t
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        cute.arch.warpgroup_reg_alloc(CONSUMER_REGS[self.n_consumer_wg])
        ctid = tidx - WG
        kwg = cute.arch.make_warp_uniform(ctid // (WG * self.m_wg))  # K warpgroup: 0 .. k_split - 1
        ctid_mma = ctid % (WG * self.m_wg)  # thread index in the tiled MMA
        gpk = self.groups_per_ktile
        atoms = self.n_atoms * self.kps  # per stage: the atoms of k-tile h at h * n_atoms
        s_q = storage.s_q.get_tensor(
            cute.make_layout((4, WG, atoms, self.stages), stride=(1, 4, 4 * WG, 4 * WG * atoms))
        )
        meta_words = gpk * self.tile_w
        s_meta = storage.s_meta.get_tensor(cute.make_layout((meta_words, self.stages), stride=(1, meta_words)))
        s_t = storage.s_t.get_tensor(t_layout.outer, swizzle=t_layout.inner)
        s_out = storage.s_out.get_tensor(cute.make_layout((self.epi_t, self.out_pitch), stride=(self.out_pitch, 1)))
        thr_mma = tiled_mma.get_slice(ctid_mma)
        t_cr_t = tiled_mma.make_fragment_B(thr_mma.partition_B(s_t))
        t_cc = thr_mma.partition_C(cute.make_identity_tensor((self.tile_w, tile_t)))
        a_shape = tiled_mma.partition_shape_A((self.tile_w, TILE_K))  # ((2, 2, 2), MMA_M, 4)
        a_frag = cute.make_rmem_tensor(a_shape, BFloat16)  # the only registers wgmma reads: written after wait_group(0)
        tmp = cute.make_rmem_tensor((cute.size(a_shape) // 2,), Int32)  # bf16x2 q - z per A register
        acc_shape = tiled_mma.partition_shape_C((self.tile_w, tile_t))
        if cutlass.const_expr(tile_t == 8):
            acc_shape = ((2, 2, 1), self.n_atoms // self.m_wg, 1)  # 4.3.5's verifier wants the N/8 mode kept
        acc = cute.make_rmem_tensor(acc_shape, Float32)
        mma_m = cute.size(acc, mode=[1])
        # This thread's A rows: value 0 of m64 atom m sits in row t_ca[(0, m, 0)][0] (= atom base + 16 w + g,
        # the layout prepare_w4a16_weights packs for); its atom is that row // 64.
        t_ca = thr_mma.partition_A(cute.make_identity_tensor((self.tile_w, TILE_K)))
        atom_idx = cute.make_rmem_tensor((mma_m,), Int32)
        meta_row = cute.make_rmem_tensor((mma_m,), Int32)
        for m in cutlass.range_constexpr(mma_m):
            row = t_ca[(0, m, 0)][0]
            meta_row[m] = row
            atom_idx[m] = row // ATOM_M
        scale2 = cute.make_rmem_tensor((mma_m * gpk * 2,), Int32)
        neg_zero2 = cute.make_rmem_tensor((mma_m * gpk * 2,), Int32)
        deferred = None  # deferred scale: (the group's accumulator, this thread's rows' fp32 group scales)
        if cutlass.const_expr(self.deferred_scale):
            deferred = (cute.make_rmem_tensor(acc_shape, Float32), cute.make_rmem_tensor((mma_m * 2,), Float32))
        epi_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=self.n_consumer_threads)
        copy128 = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BFloat16, num_bits_per_copy=128)
        out_frag = cute.make_rmem_tensor((VEC,), BFloat16)
        epi_t = self.epi_t
        chunks_per_row = self.out_cols // VEC
        n_chunks = epi_t * chunks_per_row
        n_acc = cute.size(acc)
        n_red = max(1, self.k_split - 1)  # split K only: one 64 x tile_t fp32 slot per K warpgroup 1..k_split-1
        s_red = storage.s_red.get_tensor(cute.make_layout((n_acc, WG, n_red), stride=(WG, 1, n_acc * WG)))
        bias_frag = None
        if cutlass.const_expr(self.epilogue.bias):
            bias_frag = cute.make_rmem_tensor((2 * mma_m,), Float32)  # this thread's rows r, r + 8 per m64 atom
        steps = self.k_tiles // (self.k_split * self.kps)  # stages per tile of this warpgroup
        # The producer fills the stages in k-tile order; warpgroup kwg reads the stages kwg, kwg + k_split, ...
        # of each tile: stage / phase of its next one, and prev, the stage it read before (to release). One
        # add and one wrap per stage (k_split <= stages): k_split PipelineState advances cost ~30 uniform
        # instructions per stage at k_split = 4, on a kernel bound by issue slots (-6% time).
        stage = kwg
        phase = Int32(0)
        prev = Int32(0)
        tile = bidx
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = locate_tile(tile, e, s_rows, s_prefix, tile_t)
            col_chunk0 = w_tile * chunks_per_row
            if cutlass.const_expr(self.epilogue.bias):  # loads in flight during the main loop
                load_bias(bias, bias_frag, t_cc, e, w_tile * self.tile_w, self.n_atoms // self.m_wg, tile_t,
                          self.n_out // 2, self.gated)

            acc.fill(0.0)  # no wgmma in flight: the previous tile ended with wait_group(0)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
            # This warpgroup's stages kwg, kwg + k_split, ...: per k-tile kt of a stage, dequant_exact(kt)
            # while wgmma(previous) runs, wait_group(0), (first of the stage: release the previous stage),
            # scale_and_mma(kt). No A register is written while a wgmma is in flight (ptxas would serialise
            # every wgmma otherwise), so the 4 wgmma of a k-tile run back to back. The first stage is peeled
            # (nothing to release); with meta every meta_stages = 2 stages (g = 128, no split, one k-tile per
            # stage) the rest go in (odd, even) pairs so that load_meta stays a compile-time value.
            wait_full(full, stage, phase, self.fence_mode)
            for h in cutlass.range_constexpr(self.kps):
                self.dequant_exact(tmp, s_q, s_meta, scale2, neg_zero2, atom_idx, meta_row, stage, h == 0, h)
                # the tile's first stage: nothing to release, no wgmma in flight before its first k-tile
                self.scale_and_mma(tiled_mma, acc, a_frag, tmp, t_cr_t, scale2, stage, h, empty, prev, h > 0, False,
                                   neg_zero2, h == 0, False, tiled_mma_first, deferred)
            prev = stage
            stage = stage + self.k_split
            if stage >= self.stages:
                stage = stage - self.stages
                phase = phase ^ 1
            for _kp in range((steps - 1) // self.meta_stages):
                for p in cutlass.range_constexpr(self.meta_stages):
                    self.k_step(
                        tiled_mma, acc, a_frag, tmp, t_cr_t, s_q, s_meta, scale2, neg_zero2, atom_idx, meta_row,
                        full, empty, stage, phase, prev, p == self.meta_stages - 1, tiled_mma_first, deferred,
                    )  # fmt: skip
                    prev = stage
                    stage = stage + self.k_split
                    if stage >= self.stages:
                        stage = stage - self.stages
                        phase = phase ^ 1
            if cutlass.const_expr(self.meta_stages == 2):  # steps is even: the last (odd) stage
                self.k_step(
                    tiled_mma, acc, a_frag, tmp, t_cr_t, s_q, s_meta, scale2, neg_zero2, atom_idx, meta_row,
                    full, empty, stage, phase, prev, False, tiled_mma_first, deferred,
                )  # fmt: skip
                prev = stage
                stage = stage + self.k_split
                if stage >= self.stages:
                    stage = stage - self.stages
                    phase = phase ^ 1
            warpgroup.wait_group(0)  # this warpgroup's sum is final; its last stage is free
            self.release_stage(empty, prev)
            if cutlass.const_expr(self.deferred_scale):
                self.fold_group(acc, deferred)
            if cutlass.const_expr(self.k_split > 1):
                # Split K: the partial sums of warpgroups 1..k_split-1 go through s_red (slot kwg - 1) into
                # warpgroup 0's accumulator, added in slot order; warpgroup 0 then stages the epilogue alone
                # (all store). s_red is free: its previous readers passed the previous tile's epilogue barriers.
                if kwg > 0:
                    for v in cutlass.range_constexpr(n_acc):
                        s_red[v, ctid_mma, kwg - 1] = acc[v]
                epi_barrier.arrive_and_wait()
                if kwg == 0:
                    for p in cutlass.range_constexpr(self.k_split - 1):
                        for v in cutlass.range_constexpr(n_acc):
                            acc[v] = acc[v] + s_red[v, ctid_mma, p]

            # Epilogue, per chunk of epi_t tokens: C^T fragment -> s_out [token, column] (grouped_gemm's
            # stage_out_chunk) -> 16-byte stores of the valid rows by all consumer threads.
            mma_m = cute.size(acc, mode=[1])
            for ec in cutlass.range_constexpr(tile_t // epi_t):
                epi_barrier.arrive_and_wait()  # the previous s_out readers are done
                if cutlass.const_expr(self.k_split > 1):
                    if kwg == 0:
                        stage_out_chunk(acc, s_out, t_cc, ec, mma_m, tile_t, epi_t, self.gated, self.epilogue,
                                        bias_frag)
                else:
                    stage_out_chunk(acc, s_out, t_cc, ec, mma_m, tile_t, epi_t, self.gated, self.epilogue, bias_frag)
                epi_barrier.arrive_and_wait()
                chunk_row0 = row_start + ec * epi_t
                store_out_chunk(s_out, out, out_frag, copy128, ctid, chunk_row0, rows_hi - chunk_row0, col_chunk0,
                                chunks_per_row, n_chunks, self.n_consumer_threads)
            tile = tile + gdim


# ------------------------------------------------------------------------------------------------
# Host side: compile cache, launch wrappers, reference (support checks: w4a16_plan.py).
# ------------------------------------------------------------------------------------------------


_compiled = CompileCache("w4a16_gemm")  # (gated, n_out, k_dim, E, g, tile config incl. k_split); never T
_weight_views: dict[tuple, tuple] = {}  # (qweight ptr, meta ptr, shape, g) -> cute views of the prepared tensors


def _launch(prepared: W4A16Weights, tokens, gather_index, expert_offsets, out, config: TileConfig | None,
            epilogue: ExpertEpilogue, bias: torch.Tensor | None, decode_kernel: str,
            next_weights: W4A16Weights | None = None, prefetch_fraction: float = w4a16_plan.PREFETCH_FRACTION):
    num_experts, n_out, k_dim = prepared.num_experts, prepared.n_out, prepared.k_dim
    if config is None:  # the direct decode kernel has the default epilogue only (biases, gpt-oss's SwiGLU: wgmma)
        config = choose_w4a16_tile(out.shape[0], num_experts, n_out, k_dim, sm_count(out.device), prepared.group_size,
                                   prepared.gated, decode_kernel if epilogue == DEFAULT_EPILOGUE else "wgmma")
    prefetch = w4a16_plan.down_prefetch(prepared.gated, config, next_weights, out.shape[0], sm_count(out.device),
                                        decode_kernel, prefetch_fraction)  # the down weights' L2 prefetch, or None
    if config.tma_tokens and prepared.gated:  # TMA reads contiguous rows: gather x first (M x H x 2 bytes, one kernel)
        tokens = tokens.index_select(0, gather_index)
    key = (prepared.gated, n_out, k_dim, num_experts, prepared.group_size, config)  # config carries k_split
    if epilogue != DEFAULT_EPILOGUE:
        key = (*key, epilogue)
    if prefetch is not None:
        key = (*key, prefetch)
    views = weight_views(prepared)

    def make_kernel():
        if config.direct_warps:
            return make_direct_kernel(prepared.gated, n_out, k_dim, num_experts, prepared.group_size, config, epilogue,
                                      prefetch)
        return W4A16GroupedGemmSm90(gated=prepared.gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts,
                                    group_size=prepared.group_size, config=config, epilogue=epilogue)

    extra = direct_workspace(out.device, sm_count(out.device)) if config.direct_warps else ()
    if prefetch is not None:
        extra = (*extra, *weight_views(next_weights))
    return gemm_host.launch(_compiled, key, make_kernel, views, tokens, gather_index, expert_offsets, out,
                            None if bias is None else expert_epilogue.bias_view(bias), extra)


def weight_views(prepared: W4A16Weights) -> tuple:
    """qweight and meta as 16-byte chunks (see w4a16_layout), made once per tensor pair (kernel arguments)."""
    return gemm_host.cached_views(
        _weight_views, (prepared.qweight.data_ptr(), prepared.meta.data_ptr(), tuple(prepared.qweight.shape),
                        prepared.group_size),
        lambda: (from_dlpack(prepared.qweight.view(-1, 4), assumed_align=16),
                 from_dlpack(prepared.meta.view(-1, 4), assumed_align=16)))


def w4a16_expert_up(
    x: torch.Tensor,  # [T, H] bf16
    gather_index: torch.Tensor,  # [M] int32
    expert_offsets: torch.Tensor,  # [E + 1] int32
    w13: W4A16Weights,  # prepare_w4a16_weights(..., gated=True) of w13 [E, 2I, H]
    out: torch.Tensor | None = None,  # [M, I]
    config: TileConfig | None = None,
    epilogue: ExpertEpilogue = DEFAULT_EPILOGUE,
    bias: torch.Tensor | None = None,  # [E, 2I] b13 in the canonical order (gate, then up), when epilogue.bias
    decode_kernel: str = "wgmma",  # config None: the decode row's kernel (choose_w4a16_tile)
    next_weights: W4A16Weights | None = None,  # w2 of the down projection that follows: its L2 prefetch (below)
    prefetch_fraction: float = w4a16_plan.PREFETCH_FRACTION,
) -> torch.Tensor:
    """act [M, I] = SiLU(x[g] W1^T) * (x[g] W3^T) per expert, int4 weights (epilogue: + b13 first, or the clamped
    SwiGLU); no host sync, graph-capturable. next_weights: a hint, the down weights' L2 prefetch (w4a16_direct.py)."""
    check_prepared("w13", w13, gated=True)
    expert_epilogue.check_bias(epilogue, bias, w13.num_experts, w13.n_out, "b13")
    out = gemm_host.up_out(x, gather_index, expert_offsets, w13.num_experts, w13.k_dim, w13.n_out // 2, out)
    if out.shape[0] == 0:
        return out
    return _launch(w13, x, gather_index.contiguous(), expert_offsets.contiguous(), out, config, epilogue, bias,
                   decode_kernel, next_weights, prefetch_fraction)


def w4a16_expert_down(
    act: torch.Tensor,  # [M, I] bf16, rows sorted by expert
    expert_offsets: torch.Tensor,  # [E + 1] int32
    w2: W4A16Weights,  # prepare_w4a16_weights(..., gated=False) of w2 [E, H, I]
    out: torch.Tensor | None = None,  # [M, H]
    config: TileConfig | None = None,
    bias: torch.Tensor | None = None,  # [E, H] b2
    decode_kernel: str = "wgmma",  # config None: the decode row's kernel (choose_w4a16_tile)
) -> torch.Tensor:
    """y [M, H] = act W2_e^T (+ b2_e) per expert (expert-sorted rows), int4 weights; no host sync,
    graph-capturable."""
    check_prepared("w2", w2, gated=False)
    epilogue = ExpertEpilogue(bias=bias is not None)
    expert_epilogue.check_bias(epilogue, bias, w2.num_experts, w2.n_out, "b2")
    out = gemm_host.down_out(act, expert_offsets, w2.num_experts, w2.k_dim, w2.n_out, out)
    if out.shape[0] == 0:
        return out
    # gather_index is not read by the down-projection; expert_offsets stands in for the argument.
    return _launch(w2, act, expert_offsets, expert_offsets.contiguous(), out, config, epilogue, bias, decode_kernel)
