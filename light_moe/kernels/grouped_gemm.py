"""Grouped GEMM for the routed experts on Hopper (sm_90a), in CuTe DSL 4.3.5.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows, sorted by
expert: rows of expert e are expert_offsets[e]:expert_offsets[e + 1] (offsets live on the device).

    expert_up(x [T, H], gather_index [M], expert_offsets [E+1], w13p)  -> act [M, I]
        act = SiLU(x[g] W1_e^T) * (x[g] W3_e^T), the token rows gathered inside the kernel
    expert_down(act [M, I], expert_offsets [E+1], w2 [E, H, I])       -> y [M, H] (sorted rows)
    (optional, expert_epilogue.py: biases b13 [E, 2I] / b2 [E, H] and gpt-oss's clamped SwiGLU)

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
    so SiLU(gate) * up happens in registers and the [M, 2I] pre-activation never reaches memory. The
    epilogue variants (ExpertEpilogue, a static option of the compile key) add per-expert biases first and
    swap the activation for gpt-oss's clamped SwiGLU.
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

from light_moe.kernels import expert_epilogue, gemm_host
from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.expert_epilogue import DEFAULT_EPILOGUE, ExpertEpilogue, load_bias
from light_moe.kernels.gemm_host import SMEM_CAPACITY, TILE_K, VEC, WG, epilogue_tokens
from light_moe.kernels.gemm_pipeline import (
    build_tile_schedule,
    copy_token_rows,
    drain_producer,
    gather_sources,
    locate_tile,
    signal_full,
    stage_out_chunk,
    store_out_chunk,
    wait_full,
)
from light_moe.kernels.launch import await_inputs
from light_moe.kernels.tile_config import TileConfig, choose_tile_config

MAX_STAGES = 16
# cp.async writes smem through the generic proxy, wgmma reads it through the async proxy, so a
# fence.proxy.async must sit between them. "consumer" (default): each consumer thread fences after its
# full-barrier wait. "producer": each producer thread waits for its copies of stage s (TileConfig.cp_async_lag
# stages later, 1 by default), fences, then arrives. Neither wins at every tile ("none" is racy, kept only to
# measure), so TileConfig.fence_mode picks one per table row (timings: docs/kernels.md, "Tile tables").
PRODUCER_REGS = 56  # the gather producer holds tile_t / 16 row indices per thread
CONSUMER_REGS = {1: 232, 2: 224}  # 128 * 56 + 256 * 224 = 64512 <= 65536 with two consumer warpgroups


class GroupedGemmSm90:
    """out[rows of e] = epilogue(tokens[rows of e] @ W[e]^T) for every expert e, one persistent launch.

    gated=True: up-projection; tokens = x [T, H] gathered through gather_index, W = w13p [E, 2I, H]
    (gate/up interleaved by 8 rows), out = act [M, I] = SiLU(gate) * up.
    gated=False: down-projection; tokens = act [M, I] read in place, W = w2 [E, H, I], out = y [M, H].
    epilogue (expert_epilogue.ExpertEpilogue): with bias, the kernel takes bias [E, N] (canonical row order) as
    its last argument and adds it before the activation; the activation may be the clamped SwiGLU.
    """

    def __init__(
        self,
        *,
        gated: bool,
        n_out: int,
        k_dim: int,
        num_experts: int,
        config: TileConfig,
        epilogue: ExpertEpilogue = DEFAULT_EPILOGUE,
    ):
        ok, reason = self.supports(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, config=config)
        if ok:
            ok, reason = expert_epilogue.supports(epilogue, gated)
        if not ok:
            raise ValueError(reason)
        self.epilogue = epilogue
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
        self.epi_t = epilogue_tokens(config, gated)
        self.stages = self.num_stages(config, gated, num_experts)
        self.cluster = config.cluster_t  # CTAs per cluster sharing each weight tile (multicast), 1 or 2

    @staticmethod
    def num_stages(config: TileConfig, gated: bool, num_experts: int) -> int:
        out_cols = config.tile_w // 2 if gated else config.tile_w
        fixed = 4 * 1024 + 8 * (num_experts + 1) + epilogue_tokens(config, gated) * (out_cols + VEC) * 2
        per_stage = (config.tile_w + config.tile_t) * TILE_K * 2
        return min(MAX_STAGES, (SMEM_CAPACITY - fixed) // per_stage)

    @staticmethod
    def supports(*, gated: bool, n_out: int, k_dim: int, num_experts: int, config: TileConfig) -> tuple[bool, str]:
        if config.k_split != 1:
            return False, f"the bf16 grouped GEMM has no split K (k_split must be 1, got {config.k_split})"
        if (config.stages or config.k_tiles_per_stage != 1 or config.kblock_pipeline or config.bulk_weights
                or config.tma_tokens or config.l2_prefetch):
            return False, (f"the bf16 grouped GEMM sizes its own pipeline and loads its weights by TMA (stages must be "
                           f"0, k_tiles_per_stage 1, kblock_pipeline, bulk_weights, tma_tokens and l2_prefetch "
                           f"False), got {config}")
        if n_out % config.tile_w:
            return False, f"weight rows {n_out} must be a multiple of tile_w={config.tile_w}"
        if config.cluster_t != 1 and config.tile_w == 64:
            # each CTA of the pair TMAs tile_w / 2 rows: keep every half a whole number of m64 atoms
            return False, f"two-CTA clusters need tile_w 128 or 256, got {config.tile_w}"
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
        bias: cute.Tensor = None,  # (E, n_out) bf16 in canonical row order, epilogue.bias only (None: compile-time)
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
        # cluster 2: each CTA TMAs half of the weight tile's rows, multicast into both CTAs' stage
        tma_op = cpasync.CopyBulkTensorTileG2SMulticastOp() if self.cluster > 1 else cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_w, tma_w = cpasync.make_tiled_tma_atom(
            tma_op,
            weights,
            cute.slice_(w_layout, (None, None, 0)),
            (self.tile_w, TILE_K),
            num_multicast=self.cluster,
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
            tma_atom_w, tma_w, tokens, gather_index, expert_offsets, out, self.tiled_mma, w_layout, t_layout, bias
        ).launch(
            grid=(num_ctas, 1, 1),  # a multiple of the cluster size (gemm_host.launch)
            block=(self.threads, 1, 1),
            cluster=(self.cluster, 1, 1) if self.cluster > 1 else None,
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
        bias: cute.Tensor | None,
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
                # one arrival per consumer warp of every CTA of the cluster: a stage is refilled (by multicast into
                # all of them) only when all of them are done with it
                cute.arch.mbarrier_init(empty + s, 4 * self.n_consumer_wg * self.cluster)
            cute.arch.mbarrier_init_fence()
        if cutlass.const_expr(self.cluster > 1):
            cute.arch.cluster_arrive_relaxed()  # the peer's barriers must be initialised before anything reaches them
        await_inputs()  # expert_offsets, tokens: the router's and the previous GEMM's outputs

        # Tile schedule: tiles of expert e = ceil(rows_e / (cluster * tile_t)) * weight tiles (a cluster's unit: one
        # weight tile and `cluster` consecutive token tiles); exclusive prefix over e.
        if warp == 0:
            build_tile_schedule(expert_offsets, s_rows, s_prefix, lane, n_exp, tile_t * self.cluster,
                                self.n_out // self.tile_w)
        cute.arch.sync_threads()
        if cutlass.const_expr(self.cluster > 1):
            cute.arch.cluster_wait()

        total_tiles = s_prefix[n_exp]
        if wg == 0:
            self.produce(tma_atom_w, mW, tokens, gather_index, storage, w_layout, s_rows, s_prefix, total_tiles)
        else:
            self.consume(out, tiled_mma, storage, w_layout, t_layout, s_rows, s_prefix, total_tiles, bias)

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
        rank = bidx % self.cluster  # this CTA's rank in its cluster (1-D clusters: consecutive block indices)
        # cluster 2: this CTA's TMA covers its half of the tile's rows and lands in every CTA of the cluster
        t_ws_w, t_wg_w = cpasync.tma_partition(
            tma_atom_w, rank, cute.make_layout(self.cluster), cute.group_modes(s_w, 0, 2),
            cute.group_modes(g_w, 0, 2)
        )
        w_tile_bytes = self.tile_w * TILE_K * 2  # both halves arrive in each CTA's stage
        mcast_mask = cutlass.Int16((1 << self.cluster) - 1)
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
        tile = bidx // self.cluster  # a cluster's units: one weight tile, `cluster` token tiles
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = self.locate(tile, e, s_rows, s_prefix, rank)
            # a token tile past the expert's end (its cluster partner's is the expert's last) gathers nothing
            gather_sources(src_rows, gather_index, row_start, rows_hi, row0, n_slots, self.gated)
            t_wg_w_tile = t_wg_w[(None, w_tile, None, e)]
            for kt in range(self.k_tiles):
                stage = issued % self.stages
                cute.arch.mbarrier_wait(empty + stage, ((issued // self.stages) & 1) ^ 1)
                if warp == 0:
                    with cute.arch.elect_one():
                        cute.arch.mbarrier_arrive_and_expect_tx(full + stage, w_tile_bytes)
                    if cutlass.const_expr(self.cluster > 1):
                        cute.copy(tma_atom_w, t_wg_w_tile[(None, kt)], t_ws_w[(None, stage)], tma_bar_ptr=full + stage,
                                  mcast_mask=mcast_mask)
                    else:
                        cute.copy(tma_atom_w, t_wg_w_tile[(None, kt)], t_ws_w[(None, stage)],
                                  tma_bar_ptr=full + stage)
                if row_active:
                    copy_token_rows(g2s, tokens, s_t_raw, src_rows, row0, chunk, chunk_sw, kt, stage, n_slots)
                signal_full(full, stage, issued, self.stages, self.fence_mode, self.cp_async_lag)
                issued = issued + 1
            tile = tile + gdim // self.cluster
        drain_producer(full, issued, self.stages, self.fence_mode, self.cp_async_lag)
        if cutlass.const_expr(self.cluster > 1):
            # Producer tail: wait until the consumers of every CTA of the cluster released every stage, i.e. their
            # arrivals on this CTA's empty barriers have landed, before this CTA may exit
            for _ in cutlass.range_constexpr(self.stages):
                stage = issued % self.stages
                cute.arch.mbarrier_wait(empty + stage, ((issued // self.stages) & 1) ^ 1)
                issued = issued + 1

    @cute.jit
    def locate(self, tile: Int32, e: Int32, s_rows: cute.Tensor, s_prefix: cute.Tensor, rank: Int32):
        """locate_tile for a cluster's unit: (e, rows_lo, rows_hi, w_tile, row_start) of this CTA, whose token tile is
        the rank-th of the unit's `cluster` consecutive ones (row_start may lie past rows_hi: an empty tile)."""
        e, rows_lo, rows_hi, w_tile, row_start = locate_tile(tile, e, s_rows, s_prefix, self.tile_t * self.cluster)
        return e, rows_lo, rows_hi, w_tile, row_start + rank * self.tile_t

    @cute.jit
    def release_stage(self, empty, stage: Int32, lane: Int32):
        """A consumer warp is done reading `stage`: one arrival on its empty barrier in every CTA of the cluster
        (lane r signals the CTA of rank r: the stage is refilled by multicast into all of them)."""
        if cutlass.const_expr(self.cluster > 1):
            if lane < self.cluster:
                cute.arch.mbarrier_arrive(empty + stage, lane)
        else:
            if lane == 0:
                cute.arch.mbarrier_arrive(empty + stage)

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
        bias: cute.Tensor | None,
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
        mma_m = self.tile_w // (64 * self.n_consumer_wg)  # m64 atoms per warpgroup (fragment mode 1)
        bias_frag = None
        if cutlass.const_expr(self.epilogue.bias):
            bias_frag = cute.make_rmem_tensor((2 * mma_m,), Float32)  # this thread's rows r, r + 8 per m64 atom
        read_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        release_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        rank = bidx % self.cluster
        tile = bidx // self.cluster
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = self.locate(tile, e, s_rows, s_prefix, rank)
            if cutlass.const_expr(self.cluster > 1):
                if row_start < rows_hi:
                    read_state, release_state = self.compute_tile(
                        out, tiled_mma, acc, t_cr_w, t_cr_t, t_cc, s_out, out_frag, copy128, epi_barrier, full, empty,
                        read_state, release_state, e, w_tile, row_start, rows_hi, ctid, lane, bias, bias_frag)
                else:  # an empty token tile (the partner's is the expert's last): hand each stage back as it fills
                    for _kt in range(self.k_tiles):
                        cute.arch.mbarrier_wait(full + read_state.index, read_state.phase)
                        self.release_stage(empty, read_state.index, lane)
                        read_state.advance()
                    release_state = read_state.clone()
            else:
                read_state, release_state = self.compute_tile(
                    out, tiled_mma, acc, t_cr_w, t_cr_t, t_cc, s_out, out_frag, copy128, epi_barrier, full, empty,
                    read_state, release_state, e, w_tile, row_start, rows_hi, ctid, lane, bias, bias_frag)
            tile = tile + gdim // self.cluster

    @cute.jit
    def compute_tile(self, out: cute.Tensor, tiled_mma: cute.TiledMma, acc: cute.Tensor, t_cr_w: cute.Tensor,
                     t_cr_t: cute.Tensor, t_cc: cute.Tensor, s_out: cute.Tensor, out_frag: cute.Tensor,
                     copy128: cute.CopyAtom, epi_barrier, full, empty, read_state, release_state, e: Int32,
                     w_tile: Int32, row_start: Int32, rows_hi: Int32, ctid: Int32, lane: Int32,
                     bias: cute.Tensor | None, bias_frag: cute.Tensor | None):
        """One tile of the consumer warpgroups: wgmma over its k-tiles (handing each stage back once read), then
        the fused epilogue. Returns the pipeline states (read and release are equal again at the end)."""
        tile_t = self.tile_t
        epi_t = self.epi_t
        mma_m = self.tile_w // (64 * self.n_consumer_wg)  # m64 atoms per warpgroup (fragment mode 1)
        chunks_per_row = self.out_cols // VEC
        n_chunks = epi_t * chunks_per_row
        col_chunk0 = w_tile * chunks_per_row
        if cutlass.const_expr(self.epilogue.bias):  # loads in flight during the main loop
            load_bias(bias, bias_frag, t_cc, e, w_tile * self.tile_w, mma_m, tile_t, self.n_out // 2, self.gated)

        acc.fill(0.0)
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.fence()
        # k-tile 0 (peeled so that the loop below always has a previous stage to release)
        self.mma_stage(tiled_mma, acc, t_cr_w, t_cr_t, full, read_state.index, read_state.phase)
        read_state.advance()
        for _kt in range(1, self.k_tiles):
            self.mma_stage(tiled_mma, acc, t_cr_w, t_cr_t, full, read_state.index, read_state.phase)
            warpgroup.wait_group(1)  # the previous stage's wgmma finished: hand it back
            self.release_stage(empty, release_state.index, lane)
            release_state.advance()
            read_state.advance()
        warpgroup.wait_group(0)
        self.release_stage(empty, release_state.index, lane)
        release_state.advance()

        # Epilogue, per chunk of epi_t tokens: C^T fragment -> s_out [token, column] (stage_out_chunk)
        # -> 16-byte stores of the valid rows.
        for ec in cutlass.range_constexpr(tile_t // epi_t):
            epi_barrier.arrive_and_wait()  # the previous s_out readers are done
            stage_out_chunk(acc, s_out, t_cc, ec, mma_m, tile_t, epi_t, self.gated, self.epilogue, bias_frag)
            epi_barrier.arrive_and_wait()
            chunk_row0 = row_start + ec * epi_t
            store_out_chunk(s_out, out, out_frag, copy128, ctid, chunk_row0, rows_hi - chunk_row0, col_chunk0,
                            chunks_per_row, n_chunks, self.n_consumer_threads)
        return read_state, release_state


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


_compiled = CompileCache("grouped_gemm")  # (gated, dtype, n_out, k_dim, E, tile config[, epilogue]); never M
_weight_views: dict[tuple, tuple] = {}  # (data_ptr, shape, device) -> cute view of the (n_out, k, E) weights


def _launch(gated: bool, weights, tokens, gather_index, expert_offsets, out, config: TileConfig | None,
            epilogue: ExpertEpilogue, bias: torch.Tensor | None):
    num_experts, n_out, k_dim = weights.shape
    if config is None:
        config = choose_tile_config(out.shape[0], num_experts, n_out)
    key = (gated, weights.dtype, n_out, k_dim, num_experts, config)
    if epilogue != DEFAULT_EPILOGUE:
        key = (*key, epilogue)
    # [E, n_out, k] row-major viewed as (n_out, k, E): a K-major wgmma operand batched over experts
    views = gemm_host.cached_views(_weight_views, (weights.data_ptr(), tuple(weights.shape), weights.device.index),
                                   lambda: (from_dlpack(weights.permute(1, 2, 0), assumed_align=16),))

    def make_kernel():
        return GroupedGemmSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, config=config,
                               epilogue=epilogue)

    return gemm_host.launch(_compiled, key, make_kernel, views, tokens, gather_index, expert_offsets, out,
                            None if bias is None else expert_epilogue.bias_view(bias), cluster=config.cluster_t)


def expert_up(
    x: torch.Tensor,  # [T, H] bf16
    gather_index: torch.Tensor,  # [M] int32
    expert_offsets: torch.Tensor,  # [E + 1] int32
    w13_prepared: torch.Tensor,  # [E, 2I, H] from prepare_expert_weights
    out: torch.Tensor | None = None,  # [M, I]
    config: TileConfig | None = None,
    epilogue: ExpertEpilogue = DEFAULT_EPILOGUE,
    bias: torch.Tensor | None = None,  # [E, 2I] b13 in the canonical order (gate, then up), when epilogue.bias
) -> torch.Tensor:
    """act [M, I] = SiLU(x[g] W1^T) * (x[g] W3^T) per expert (epilogue: + b13 first, or the clamped SwiGLU);
    no host sync, graph-capturable."""
    num_experts, two_inter, hidden = w13_prepared.shape
    gemm_host.check_tensor("w13_prepared", w13_prepared, torch.bfloat16, 3)
    expert_epilogue.check_bias(epilogue, bias, num_experts, two_inter, "b13")
    out = gemm_host.up_out(x, gather_index, expert_offsets, num_experts, hidden, two_inter // 2, out)
    if out.shape[0] == 0:
        return out
    return _launch(True, w13_prepared, x, gather_index.contiguous(), expert_offsets.contiguous(), out, config,
                   epilogue, bias)


def expert_down(
    act: torch.Tensor,  # [M, I] bf16, rows sorted by expert
    expert_offsets: torch.Tensor,  # [E + 1] int32
    w2_prepared: torch.Tensor,  # [E, H, I]
    out: torch.Tensor | None = None,  # [M, H]
    config: TileConfig | None = None,
    bias: torch.Tensor | None = None,  # [E, H] b2
) -> torch.Tensor:
    """y [M, H] = act W2_e^T (+ b2_e) per expert, expert-sorted rows; no host sync, graph-capturable."""
    num_experts, hidden, inter = w2_prepared.shape
    gemm_host.check_tensor("w2_prepared", w2_prepared, torch.bfloat16, 3)
    epilogue = ExpertEpilogue(bias=bias is not None)
    expert_epilogue.check_bias(epilogue, bias, num_experts, hidden, "b2")
    out = gemm_host.down_out(act, expert_offsets, num_experts, inter, hidden, out)
    if out.shape[0] == 0:
        return out
    # gather_index is not read by the down-projection; expert_offsets stands in for the argument.
    return _launch(False, w2_prepared, act, expert_offsets, expert_offsets.contiguous(), out, config, epilogue, bias)
