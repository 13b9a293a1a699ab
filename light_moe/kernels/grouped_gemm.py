"""Grouped GEMM for the routed experts on Hopper (sm_90a), in CuTe DSL 4.3.5.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows, sorted by
expert: rows of expert e are expert_offsets[e]:expert_offsets[e + 1] (offsets live on the device).

    expert_up(x [T, H], gather_index [M], expert_offsets [E+1], w13p)  -> act [M, I]
        act = SiLU(x[g] W1_e^T) * (x[g] W3_e^T), the token rows gathered inside the kernel
    expert_down(act [M, I], expert_offsets [E+1], w2 [E, H, I])       -> y [M, H] (sorted rows)

One kernel serves both projections, "swap AB": per expert it computes C^T = W X^T, so the expert's
weight rows are wgmma's M (operand A: `tile_w` = 64, 128 or 256 rows, streamed by TMA) and the routed
token rows are wgmma's N (operand B: `tile_t` = 8..256 rows, gathered by cp.async). Decode (a few tokens
per expert) is the same kernel with a small `tile_t`: the weights fill the 64-row wgmma M and stream at
HBM bandwidth, the tokens ride along as N = 8. Prefill uses 256 x 128 tiles. tile_config.py picks the
tile from (M, E) by table lookup.

Kernel structure (persistent, warp-specialised):
  * grid = number of SMs (host-known), never the device token counts, so no host sync and the launch
    can be captured in a CUDA graph. Every CTA first turns expert_offsets into a per-expert tile
    prefix sum in shared memory (one warp, shuffle scan); tile t of the linear list belongs to the
    expert e with prefix[e] <= t < prefix[e + 1]; CTAs take tiles t = blockIdx, blockIdx + grid, ...
    Only non-empty tiles exist, so empty experts and imbalanced routing cost nothing. Within an expert,
    consecutive tiles share the weight tile (token tiles vary fastest), so concurrent CTAs hit L2.
  * warpgroup 0 = producer (setmaxnreg 56): warp 0 issues the TMA of the weight tile, all 128 threads
    cp.async their token rows (x[gather_index[row]] for the up-projection, act[row] for the
    down-projection; rows past the expert's end are skipped, their results are never stored) into the
    128-byte-swizzled layout the wgmma descriptor expects. One mbarrier per stage counts the TMA's
    expect-tx arrival + one arrival per producer thread (cp.async.mbarrier.arrive.noinc, or a plain
    arrive after wait + fence.proxy.async in the "producer" fence mode).
  * warpgroups 1..2 = consumers (setmaxnreg 224/232): wgmma with fp32 accumulators (a 256-row tile
    gives each warpgroup two m64 atoms), then the epilogue per chunk of <= 64 tokens: registers ->
    padded shared tile [tokens, columns] (transposing C^T back to token-major) -> 16-byte stores of
    the valid rows only, so every output row is written exactly once and no row of another expert is.
    The up-projection's weights are repacked by `prepare_expert_weights` so that every 16 rows are
    8 gate rows followed by the 8 matching up rows: wgmma puts rows r and r + 8 in the same thread,
    so SiLU(gate) * up happens in registers and the [M, 2I] pre-activation never reaches memory.
"""

from __future__ import annotations

import time

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

from light_moe.kernels.launch import await_inputs, current_stream
from light_moe.kernels.tile_config import TileConfig, choose_tile_config

TILE_K = 64  # bf16 elements per k-tile: one 128-byte swizzle row
WG = 128  # threads per warpgroup
VEC = 8  # bf16 per 16-byte access
SMEM_CAPACITY = 232448  # bytes of shared memory per CTA on sm_90
MAX_STAGES = 16
# cp.async writes smem through the generic proxy, wgmma reads it through the async proxy, so a
# fence.proxy.async must sit between them. "consumer" (default): each consumer thread fences after its
# full-barrier wait. "producer": each producer thread waits for its copies of stage s (TileConfig.cp_async_lag
# stages later, 1 by default), fences, then arrives. H200, Mixtral, 128x256 tiles, T=4096 up/down: consumer
# 3282/1726 us, producer 3803/1847 us, no fence at all (unsafe, "none", kept only to measure) 3352/1685 us;
# T=1 (64x8): consumer 114/61, producer 138/71. But at 256x128 the producer fence wins (H100 T=4096:
# 2741/1433 vs 3048/1545), so TileConfig.fence_mode picks one per table row (tile_config.py).
EPI_BYTES = 64 * 136 * 2  # epilogue staging tile (64 tokens x 128 columns): a 4th stage at 128x256 and 256x128
PRODUCER_REGS = 56  # the gather producer holds tile_t / 16 row indices per thread
CONSUMER_REGS = {1: 232, 2: 224}  # 128 * 56 + 256 * 224 = 64512 <= 65536 with two consumer warpgroups


class GroupedGemmSm90:
    """out[rows of e] = epilogue(tokens[rows of e] @ W[e]^T) for every expert e, one persistent launch.

    gated=True: up-projection; tokens = x [T, H] gathered through gather_index, W = w13p [E, 2I, H]
    (gate/up interleaved by 8 rows), out = act [M, I] = SiLU(gate) * up.
    gated=False: down-projection; tokens = act [M, I] read in place, W = w2 [E, H, I], out = y [M, H].
    """

    def __init__(
        self,
        *,
        gated: bool,
        n_out: int,
        k_dim: int,
        num_experts: int,
        config: TileConfig,
    ):
        ok, reason = self.supports(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, config=config)
        if not ok:
            raise ValueError(reason)
        self.fence_mode = config.fence_mode
        self.cp_async_lag = config.cp_async_lag
        self.gated = gated
        self.n_out = n_out
        self.k_dim = k_dim
        self.num_experts = num_experts
        self.tile_w = config.tile_w
        self.tile_t = config.tile_t
        self.n_consumer_wg = min(config.tile_w // 64, 2)  # a 256-row tile gives each warpgroup two m64 atoms
        self.n_consumer_threads = WG * self.n_consumer_wg
        self.threads = WG + self.n_consumer_threads
        self.out_cols = self.tile_w // 2 if gated else self.tile_w  # output columns per tile
        self.out_pitch = self.out_cols + VEC  # +16 bytes per row: scalar epilogue stores hit distinct banks
        self.k_tiles = k_dim // TILE_K
        self.epi_t = self.epilogue_tokens(config, gated)
        self.stages = self.num_stages(config, gated, num_experts)

    @staticmethod
    def epilogue_tokens(config: TileConfig, gated: bool) -> int:
        """Tokens per epilogue chunk: the staging tile [chunk, columns + 8] stays within EPI_BYTES."""
        out_cols = config.tile_w // 2 if gated else config.tile_w
        chunk = config.tile_t
        while chunk > 8 and chunk * (out_cols + VEC) * 2 > EPI_BYTES:
            chunk //= 2
        return chunk

    @staticmethod
    def num_stages(config: TileConfig, gated: bool, num_experts: int) -> int:
        out_cols = config.tile_w // 2 if gated else config.tile_w
        fixed = 4 * 1024 + 8 * (num_experts + 1) + GroupedGemmSm90.epilogue_tokens(config, gated) * (out_cols + VEC) * 2
        per_stage = (config.tile_w + config.tile_t) * TILE_K * 2
        return min(MAX_STAGES, (SMEM_CAPACITY - fixed) // per_stage)

    @staticmethod
    def supports(*, gated: bool, n_out: int, k_dim: int, num_experts: int, config: TileConfig) -> tuple[bool, str]:
        if config.k_split != 1:
            return False, f"the bf16 grouped GEMM has no split K (k_split must be 1, got {config.k_split})"
        if (config.stages or config.k_tiles_per_stage != 1 or config.kblock_pipeline or config.bulk_weights
                or config.tma_tokens):
            return False, (f"the bf16 grouped GEMM sizes its own pipeline and loads its weights by TMA (stages must be "
                           f"0, k_tiles_per_stage 1, kblock_pipeline, bulk_weights and tma_tokens False), got {config}")
        if n_out % config.tile_w:
            return False, f"weight rows {n_out} must be a multiple of tile_w={config.tile_w}"
        if gated and n_out % 16:
            return False, f"2I = {n_out} must be a multiple of 16 (gate/up interleave blocks of 8 rows)"
        if k_dim % TILE_K:
            return False, f"reduction size {k_dim} must be a multiple of {TILE_K}"
        if not 1 <= num_experts <= 1024:
            return False, f"num_experts must be in [1, 1024], got {num_experts}"
        if GroupedGemmSm90.num_stages(config, gated, num_experts) < 2:
            return False, f"tile config {config} leaves fewer than 2 pipeline stages in shared memory"
        if config.cp_async_lag > GroupedGemmSm90.num_stages(config, gated, num_experts) - 2:
            # a consumer hands a stage back after waiting for its next one: a producer blocked on that
            # stage must already have signalled the next, lag + 2 <= stages
            return False, f"cp_async_lag={config.cp_async_lag} must be at most the pipeline's stages - 2"
        return True, "ok"

    @cute.jit
    def __call__(
        self,
        weights: cute.Tensor,  # (n_out, k_dim, E), K-major: torch [E, n_out, k_dim].permute(1, 2, 0)
        tokens: cute.Tensor,  # (rows, k_dim): x [T, H] (gated) or act [M, I]
        gather_index: cute.Tensor,  # (M,) int32 token row of each sorted row (read only when gated)
        expert_offsets: cute.Tensor,  # (E + 1,) int32
        out: cute.Tensor,  # (M, n_out / 2) gated, (M, n_out) otherwise
        num_ctas: Int32,
        stream: cuda.CUstream,
    ):
        self.tiled_mma = sm90_utils.make_trivial_tiled_mma(
            BFloat16,
            BFloat16,
            warpgroup.OperandMajorMode.K,
            warpgroup.OperandMajorMode.K,
            Float32,
            (self.n_consumer_wg, 1, 1),
            tiler_mn=(64, self.tile_t),
        )
        atom = warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(utils.LayoutEnum.ROW_MAJOR, BFloat16, TILE_K), BFloat16
        )
        w_layout = cute.tile_to_shape(atom, (self.tile_w, TILE_K, self.stages), order=(0, 1, 2))
        t_layout = cute.tile_to_shape(atom, (self.tile_t, TILE_K, self.stages), order=(0, 1, 2))
        tma_atom_w, tma_w = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(),
            weights,
            cute.slice_(w_layout, (None, None, 0)),
            (self.tile_w, TILE_K),
        )

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[Int64, self.stages]
            empty_bar: cute.struct.MemRange[Int64, self.stages]
            expert_rows: cute.struct.MemRange[Int32, self.num_experts + 1]
            tile_prefix: cute.struct.MemRange[Int32, self.num_experts + 1]
            s_out: cute.struct.Align[cute.struct.MemRange[BFloat16, self.epi_t * self.out_pitch], 128]
            s_w: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(w_layout)], 1024]
            s_t: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(t_layout)], 1024]

        self.shared_storage = SharedStorage
        self.kernel(
            tma_atom_w, tma_w, tokens, gather_index, expert_offsets, out, self.tiled_mma, w_layout, t_layout
        ).launch(
            grid=(num_ctas, 1, 1),
            block=(self.threads, 1, 1),
            min_blocks_per_mp=1,
            stream=stream,
            use_pdl=True,
        )

    @cute.kernel
    def kernel(
        self,
        tma_atom_w: cute.CopyAtom,
        mW: cute.Tensor,
        tokens: cute.Tensor,
        gather_index: cute.Tensor,
        expert_offsets: cute.Tensor,
        out: cute.Tensor,
        tiled_mma: cute.TiledMma,
        w_layout: cute.ComposedLayout,
        t_layout: cute.ComposedLayout,
    ):
        n_exp = self.num_experts
        tile_t = self.tile_t
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // WG)
        lane = cute.arch.lane_idx()
        if warp == 0:
            cpasync.prefetch_descriptor(tma_atom_w)

        storage = utils.SmemAllocator().allocate(self.shared_storage)
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        s_rows = storage.expert_rows.get_tensor(cute.make_layout(n_exp + 1))
        s_prefix = storage.tile_prefix.get_tensor(cute.make_layout(n_exp + 1))
        if tidx == 0:
            for s in cutlass.range_constexpr(self.stages):
                cute.arch.mbarrier_init(full + s, 1 + WG)  # TMA expect-tx + one arrival per producer thread
                cute.arch.mbarrier_init(empty + s, 4 * self.n_consumer_wg)  # one arrival per consumer warp
            cute.arch.mbarrier_init_fence()
        await_inputs()  # expert_offsets, tokens: the router's and the previous GEMM's outputs

        # Tile schedule: tiles of expert e = ceil(rows_e / tile_t) * weight tiles; exclusive prefix over e.
        if warp == 0:
            build_tile_schedule(expert_offsets, s_rows, s_prefix, lane, n_exp, tile_t, self.n_out // self.tile_w)
        cute.arch.sync_threads()

        total_tiles = s_prefix[n_exp]
        if wg == 0:
            self.produce(tma_atom_w, mW, tokens, gather_index, storage, w_layout, s_rows, s_prefix, total_tiles)
        else:
            self.consume(out, tiled_mma, storage, w_layout, t_layout, s_rows, s_prefix, total_tiles)

    @cute.jit
    def produce(
        self,
        tma_atom_w: cute.CopyAtom,
        mW: cute.Tensor,
        tokens: cute.Tensor,
        gather_index: cute.Tensor,
        storage,
        w_layout: cute.ComposedLayout,
        s_rows: cute.Tensor,
        s_prefix: cute.Tensor,
        total_tiles: Int32,
    ):
        """Producer warpgroup: TMA of the weight tile (warp 0) + cp.async of the token rows (all 128 threads)."""
        tile_t = self.tile_t
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        cute.arch.warpgroup_reg_dealloc(PRODUCER_REGS)
        s_w = storage.s_w.get_tensor(w_layout.outer, swizzle=w_layout.inner)
        # Unswizzled view of the token stages: the 16-byte chunk c of row r lives at chunk c ^ (r % 8)
        # (the 128-byte swizzle the wgmma descriptor of t_layout expects; stage bases are 1024-aligned).
        s_t_raw = storage.s_t.get_tensor(
            cute.make_layout((tile_t, TILE_K, self.stages), stride=(TILE_K, 1, tile_t * TILE_K))
        )
        g_w = cute.local_tile(mW, (self.tile_w, TILE_K), (None, None, None))  # (tw, 64, Wtiles, Ktiles, E)
        t_ws_w, t_wg_w = cpasync.tma_partition(
            tma_atom_w, 0, cute.make_layout(1), cute.group_modes(s_w, 0, 2), cute.group_modes(g_w, 0, 2)
        )
        w_tile_bytes = self.tile_w * TILE_K * 2
        g2s = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), BFloat16, num_bits_per_copy=128
        )
        chunk = tidx % VEC
        row0 = tidx // VEC  # 0..15: 16 rows per pass, 8 threads (128 bytes) per row
        n_slots = max(tile_t // 16, 1)
        chunk_sw = chunk ^ (row0 % 8)
        row_active = row0 < tile_t
        src_rows = cute.make_rmem_tensor((n_slots,), Int32)
        issued = Int32(0)  # k-tile stages this producer has filled so far (all tiles)
        tile = bidx
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = locate_tile(tile, e, s_rows, s_prefix, tile_t)
            gather_sources(src_rows, gather_index, row_start, rows_hi, row0, n_slots, self.gated)
            t_wg_w_tile = t_wg_w[(None, w_tile, None, e)]
            for kt in range(self.k_tiles):
                stage = issued % self.stages
                cute.arch.mbarrier_wait(empty + stage, ((issued // self.stages) & 1) ^ 1)
                if warp == 0:
                    with cute.arch.elect_one():
                        cute.arch.mbarrier_arrive_and_expect_tx(full + stage, w_tile_bytes)
                    cute.copy(tma_atom_w, t_wg_w_tile[(None, kt)], t_ws_w[(None, stage)], tma_bar_ptr=full + stage)
                if row_active:
                    copy_token_rows(g2s, tokens, s_t_raw, src_rows, row0, chunk, chunk_sw, kt, stage, n_slots)
                signal_full(full, stage, issued, self.stages, self.fence_mode, self.cp_async_lag)
                issued = issued + 1
            tile = tile + gdim
        drain_producer(full, issued, self.stages, self.fence_mode, self.cp_async_lag)

    @cute.jit
    def mma_stage(self, tiled_mma: cute.TiledMma, acc: cute.Tensor, t_cr_w: cute.Tensor, t_cr_t: cute.Tensor, full,
                  stage: Int32, phase: Int32):
        """One k-tile: wait for its stage (and fence the cp.async token rows in consumer fence mode), issue its
        wgmma and commit them as one group."""
        wait_full(full, stage, phase, self.fence_mode)
        for kb in cutlass.range_constexpr(cute.size(t_cr_w, mode=[2])):
            cute.gemm(tiled_mma, acc, t_cr_w[(None, None, kb, stage)], t_cr_t[(None, None, kb, stage)], acc)
        warpgroup.commit_group()

    @cute.jit
    def consume(
        self,
        out: cute.Tensor,
        tiled_mma: cute.TiledMma,
        storage,
        w_layout: cute.ComposedLayout,
        t_layout: cute.ComposedLayout,
        s_rows: cute.Tensor,
        s_prefix: cute.Tensor,
        total_tiles: Int32,
    ):
        """Consumer warpgroups: wgmma over the k-tiles, then the fused epilogue."""
        tile_t = self.tile_t
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        lane = cute.arch.lane_idx()
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        cute.arch.warpgroup_reg_alloc(CONSUMER_REGS[self.n_consumer_wg])
        ctid = tidx - WG
        s_w = storage.s_w.get_tensor(w_layout.outer, swizzle=w_layout.inner)
        s_t = storage.s_t.get_tensor(t_layout.outer, swizzle=t_layout.inner)
        s_out = storage.s_out.get_tensor(cute.make_layout((self.epi_t, self.out_pitch), stride=(self.out_pitch, 1)))
        thr_mma = tiled_mma.get_slice(ctid)
        t_cr_w = tiled_mma.make_fragment_A(thr_mma.partition_A(s_w))
        t_cr_t = tiled_mma.make_fragment_B(thr_mma.partition_B(s_t))
        t_cc = thr_mma.partition_C(cute.make_identity_tensor((self.tile_w, tile_t)))
        acc_shape = tiled_mma.partition_shape_C((self.tile_w, tile_t))
        if cutlass.const_expr(tile_t == 8):
            acc_shape = ((2, 2, 1), 1, 1)  # 4.3.5's verifier wants the N/8 mode kept for the 64x8 atom
        acc = cute.make_rmem_tensor(acc_shape, Float32)
        epi_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=self.n_consumer_threads)
        copy128 = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BFloat16, num_bits_per_copy=128)
        out_frag = cute.make_rmem_tensor((VEC,), BFloat16)
        epi_t = self.epi_t
        mma_m = self.tile_w // (64 * self.n_consumer_wg)  # m64 atoms per warpgroup (fragment mode 1)
        chunks_per_row = self.out_cols // VEC
        n_chunks = epi_t * chunks_per_row
        read_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        release_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        tile = bidx
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = locate_tile(tile, e, s_rows, s_prefix, tile_t)
            col_chunk0 = w_tile * chunks_per_row

            acc.fill(0.0)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
            warpgroup.fence()
            # k-tile 0 (peeled so that the loop below always has a previous stage to release)
            self.mma_stage(tiled_mma, acc, t_cr_w, t_cr_t, full, read_state.index, read_state.phase)
            read_state.advance()
            for _kt in range(1, self.k_tiles):
                self.mma_stage(tiled_mma, acc, t_cr_w, t_cr_t, full, read_state.index, read_state.phase)
                warpgroup.wait_group(1)  # the previous stage's wgmma finished: hand it back
                if lane == 0:
                    cute.arch.mbarrier_arrive(empty + release_state.index)
                release_state.advance()
                read_state.advance()
            warpgroup.wait_group(0)
            if lane == 0:
                cute.arch.mbarrier_arrive(empty + release_state.index)
            release_state.advance()

            # Epilogue, per chunk of epi_t tokens: C^T fragment -> s_out [token, column] (stage_out_chunk)
            # -> 16-byte stores of the valid rows.
            for ec in cutlass.range_constexpr(tile_t // epi_t):
                epi_barrier.arrive_and_wait()  # the previous s_out readers are done
                stage_out_chunk(acc, s_out, t_cc, ec, mma_m, tile_t, epi_t, self.gated)
                epi_barrier.arrive_and_wait()
                chunk_row0 = row_start + ec * epi_t
                store_out_chunk(s_out, out, out_frag, copy128, ctid, chunk_row0, rows_hi - chunk_row0, col_chunk0,
                                chunks_per_row, n_chunks, self.n_consumer_threads)
            tile = tile + gdim


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
                    gated: cutlass.Constexpr):
    """Epilogue chunk ec (shared with the W4A16 kernel): this thread's accumulator values of tokens
    ec * epi_t ... -> s_out [token, column], as SiLU(gate) * up when gated. Fragment value v + m * tile_t / 2
    (m: the warpgroup's m64 atom, mma_m of them) holds column 8 * (v // 4) + (lane % 4) * 2 + v % 2, so a
    chunk of tokens is a static set of values."""
    for vi in cutlass.range_constexpr(mma_m * epi_t // 2):
        v = (vi % (epi_t // 2)) + ec * epi_t // 2 + (vi // (epi_t // 2)) * (tile_t // 2)
        coord = t_cc[v]
        wrow = coord[0]
        tok = coord[1] - ec * epi_t
        if cutlass.const_expr(gated):
            # values come as (col, col+1) x (row, row+8): v % 4 < 2 is a gate row, v + 2 the matching
            # up row 8 below it (prepare_expert_weights interleaves by 8 rows).
            if cutlass.const_expr(v % 4 < 2):
                gate = acc[v]
                up = acc[v + 2]
                act = gate / (1.0 + cute.math.exp(-gate, fastmath=True)) * up
                s_out[tok, (wrow // 16) * 8 + wrow % 8] = act.to(BFloat16)
        else:
            s_out[tok, wrow] = acc[v].to(BFloat16)


# ------------------------------------------------------------------------------------------------
# Host side: weight repacking, compile cache, launch wrappers.
# ------------------------------------------------------------------------------------------------


def supports(dtype: torch.dtype, num_experts: int, hidden: int, inter: int) -> tuple[bool, str]:
    """Whether expert_up / expert_down take this layer (checked once, at weight-preparation time)."""
    if dtype != torch.bfloat16:
        return False, f"the grouped GEMM is bf16-only, got {dtype}"
    if hidden % TILE_K or inter % TILE_K:
        return False, f"H={hidden} and I={inter} must be multiples of {TILE_K}"
    if not 1 <= num_experts <= 1024:
        return False, f"num_experts must be in [1, 1024], got {num_experts}"
    return True, "ok"


def prepare_expert_weights(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] (gate rows 0:I, up rows I:2I) -> [E, 2I, H] where every 16 rows are 8 gate rows
    followed by the 8 up rows of the same intermediate indices; w2 [E, H, I] unchanged (contiguous)."""
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if two_inter % 16:
        raise ValueError(f"expected w13 [E, 2I, H] with I % 8 == 0, got shape {tuple(w13.shape)}")
    w13p = w13.view(num_experts, 2, inter // 8, 8, hidden).permute(0, 2, 1, 3, 4).reshape(w13.shape)
    return w13p.contiguous(), w2.contiguous()


_compiled: dict[tuple, object] = {}  # (gated, dtype, n_out, k_dim, E, tile_w, tile_t) -> compiled fn
compile_seconds: dict[tuple, float] = {}
_weight_views: dict[tuple, object] = {}  # (data_ptr, shape) -> cute tensor of the (n_out, k, E) weight view
_num_sms: dict[int, int] = {}



def _rows(t: torch.Tensor, align: int = 16):
    """Leading dim dynamic, the rest static: one compile serves every token count."""
    return from_dlpack(t, assumed_align=align).mark_compact_shape_dynamic(mode=0)


def _weights_view(w: torch.Tensor):
    key = (w.data_ptr(), tuple(w.shape), w.device.index)
    view = _weight_views.get(key)
    if view is None:
        # [E, n_out, k] row-major viewed as (n_out, k, E): a K-major wgmma operand batched over experts
        view = _weight_views[key] = from_dlpack(w.permute(1, 2, 0), assumed_align=16)
    return view


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _num_sms:
        _num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _num_sms[index]


def _launch(gated: bool, weights, tokens, gather_index, expert_offsets, out, config: TileConfig | None):
    num_experts, n_out, k_dim = weights.shape
    num_rows = out.shape[0]
    if config is None:
        config = choose_tile_config(num_rows, num_experts, n_out)
    key = (gated, weights.dtype, n_out, k_dim, num_experts, config)
    args = (
        _weights_view(weights),
        _rows(tokens),
        _rows(gather_index, 4),
        from_dlpack(expert_offsets, assumed_align=4),
        _rows(out),
        _sm_count(out.device),
        current_stream(),
    )
    fn = _compiled.get(key)
    if fn is None:
        kernel = GroupedGemmSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, config=config)
        start = time.perf_counter()
        fn = _compiled[key] = cute.compile(kernel, *args)
        compile_seconds[key] = time.perf_counter() - start
    fn(*args)
    return out


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, dim: int):
    if t.dtype != dtype or t.dim() != dim or not t.is_contiguous() or not t.is_cuda:
        raise ValueError(f"expected {name} as a contiguous {dim}-D CUDA {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
    if t.data_ptr() % 16:
        raise ValueError(f"{name} must be 16-byte aligned (the kernel assumes it)")


def check_out(out: torch.Tensor, num_rows: int, cols: int) -> None:
    """A caller's out buffer: the kernel stores bf16 rows [num_rows, cols] through 16-byte vectors."""
    _check("out", out, torch.bfloat16, 2)
    if tuple(out.shape) != (num_rows, cols):
        raise ValueError(f"expected out of shape {(num_rows, cols)}, got {tuple(out.shape)}")


def expert_up(
    x: torch.Tensor,  # [T, H] bf16
    gather_index: torch.Tensor,  # [M] int32
    expert_offsets: torch.Tensor,  # [E + 1] int32
    w13_prepared: torch.Tensor,  # [E, 2I, H] from prepare_expert_weights
    out: torch.Tensor | None = None,  # [M, I]
    config: TileConfig | None = None,
) -> torch.Tensor:
    """act [M, I] = SiLU(x[g] W1^T) * (x[g] W3^T) per expert; no host sync, graph-capturable."""
    num_experts, two_inter, hidden = w13_prepared.shape
    _check("x", x, torch.bfloat16, 2)
    _check("w13_prepared", w13_prepared, torch.bfloat16, 3)
    if x.shape[1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[1]}, w13 expects {hidden}")
    if gather_index.dtype != torch.int32 or expert_offsets.dtype != torch.int32:
        raise ValueError("gather_index and expert_offsets must be int32")
    if expert_offsets.numel() != num_experts + 1:
        raise ValueError(f"expected expert_offsets [{num_experts + 1}], got {tuple(expert_offsets.shape)}")
    num_rows = gather_index.shape[0]
    if out is None:
        out = x.new_empty(num_rows, two_inter // 2)
    check_out(out, num_rows, two_inter // 2)
    if num_rows == 0:
        return out
    return _launch(True, w13_prepared, x, gather_index.contiguous(), expert_offsets.contiguous(), out, config)


def expert_down(
    act: torch.Tensor,  # [M, I] bf16, rows sorted by expert
    expert_offsets: torch.Tensor,  # [E + 1] int32
    w2_prepared: torch.Tensor,  # [E, H, I]
    out: torch.Tensor | None = None,  # [M, H]
    config: TileConfig | None = None,
) -> torch.Tensor:
    """y [M, H] = act W2_e^T per expert, expert-sorted rows; no host sync, graph-capturable."""
    num_experts, hidden, inter = w2_prepared.shape
    _check("act", act, torch.bfloat16, 2)
    _check("w2_prepared", w2_prepared, torch.bfloat16, 3)
    if act.shape[1] != inter:
        raise ValueError(f"act has intermediate size {act.shape[1]}, w2 expects {inter}")
    if expert_offsets.dtype != torch.int32 or expert_offsets.numel() != num_experts + 1:
        raise ValueError(f"expected int32 expert_offsets [{num_experts + 1}], got {expert_offsets.dtype}")
    num_rows = act.shape[0]
    if out is None:
        out = act.new_empty(num_rows, hidden)
    check_out(out, num_rows, hidden)
    if num_rows == 0:
        return out
    # gather_index is not read by the down-projection; expert_offsets stands in for the argument.
    return _launch(False, w2_prepared, act, expert_offsets, expert_offsets.contiguous(), out, config)
