"""W4A16 grouped GEMM for prefill with the int4 dequantised into shared memory (sm_90a, CuTe DSL 4.3.5).

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows sorted by
expert, g group size. Same contract as w4a16_gemm.py (TileConfig.smem_dequant selects this kernel there):

    up:   act [M, I] = SiLU(x[g] W1^T) * (x[g] W3^T)   (x[gather_index] gathered into [M, H] by the caller)
    down: y [M, H] = act W2^T

Why a second W4A16 kernel: the register-dequant kernel (w4a16_gemm.py) feeds wgmma's A operand from
registers, so each consumer warpgroup dequantises between its own wgmma; on a power-limited H200 at
prefill that costs ~8% of the tensor cores' per-cycle rate against bf16 (benchmarks/results/
prefill_power_h200_session8/), and W4A16 trailed bf16 by 2-4% at T=16384. Here the consumers are the bf16
kernel's (grouped_gemm.GroupedGemmSm90.consume: wgmma with both operands in shared memory, the fused
epilogue) and never dequantise; the producer warpgroup does it beside them:

  * warp 0, one thread: per (tile, k-tile) one cp.async.bulk of the tile's int4 atoms (tile_w / 64 x 2 KB,
    the register-fragment layout of w4a16_layout.py, unchanged: one prepared copy serves both kernels) and
    one of its group meta per group, into a ring of q_stages slots (q_full: transaction bytes; q_empty: one
    arrival per transform warp). It runs up to q_stages k-tiles ahead of the transform.
  * warps 1..3 ("transform"): per k-tile wait for a free bf16 stage (empty, from the consumers); warp 1 issues
    the TMA of the tile's token rows into it (as TileConfig.tma_tokens: rows past M zero-filled); then each warp
    takes 16-row units (atom a, virtual warp v) of the int4 slot: the 32 lanes hold exactly the A fragments a
    consumer warp of the register kernel would hold, dequantise them with the same PTX (w4a16_dequant.py: same
    bf16 values, one rounding) and store each k16 block with one stmatrix.x4 (the fragment layout is
    stmatrix's) into the 128-byte-swizzled K-major tile the wgmma descriptor reads. Then fence.proxy.async
    (generic-proxy stores, async-proxy wgmma reads), one full arrival per warp, one q_empty arrival.
  * full barrier: 1 expect-tx arrival (the token TMA) + 3 transform warps; consumers need no fence.

Shared memory (256 x 128, E = 8): 3 bf16 stages of 48 KB (weights 32 + tokens 16) + 6 int4 slots of 9 KB +
the epilogue tile. Work per k-tile and transform warp: 5-6 units x (one ld.shared.v4, 16 dequants of 3.75
instructions, 4 stmatrix), ~25% of a scheduler's issue slots at the tensor cores' full rate.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warpgroup

from light_moe.kernels.grouped_gemm import (
    SMEM_CAPACITY,
    VEC,
    WG,
    GroupedGemmSm90,
    build_tile_schedule,
    locate_tile,
)
from light_moe.kernels.launch import await_inputs
from light_moe.kernels.tile_config import TileConfig
from light_moe.kernels.w4a16_dequant import apply_scale, dequant_exact, prmt, stmatrix_x4
from light_moe.kernels.w4a16_layout import ATOM_M, GROUP_SIZES, TILE_K

__all__ = ["W4A16SmemGemmSm90"]

# Warpgroups: 0 and 3 produce (warp 0: the int4 loader; warps 1-3 and 12-15: the 7 transform warps), 1 and 2
# consume (the bf16 kernel's consume() expects its consumers at threads 128..383). 512 threads launch at 128
# registers each; setmaxnreg: 256 * 56 + 256 * 200 = 65536.
PRODUCER_REGS = 56  # a transform warp holds one unit: 2 int4 words, 2 x groups scale / zero pairs, 4 outputs
CONSUMER_REGS = 200  # the bf16 consumer (two 64 x 128 fp32 accumulators at 256 x 128) without spills
TRANSFORM_WARPS = 7
MAX_TILE_T = 128
MAX_STAGES = 4  # bf16 stages (weights + tokens)
Q_MIN_STAGES = 4  # int4 slots the loader may run ahead by
Q_MAX_STAGES = 8
# unit of transform work: 16 rows (one consumer warp's rows of an m64 atom) x 32 k (two k16 blocks); 8 per
# atom, so 7 warps share a 256-row k-tile's 32 units 5/5/5/5/4/4/4
UNITS_PER_ATOM = (ATOM_M // 16) * 2


class W4A16SmemGemmSm90(GroupedGemmSm90):
    """The bf16 grouped GEMM's consumers over bf16 weight tiles that the producer dequantises from int4
    (module docstring). Call signature of w4a16_gemm.W4A16GroupedGemmSm90 (tokens: x[gather_index] when gated).
    """

    def __init__(self, *, gated: bool, n_out: int, k_dim: int, num_experts: int, group_size: int, config: TileConfig):
        ok, reason = self.supports(
            gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, group_size=group_size, config=config
        )
        if not ok:
            raise ValueError(reason)
        self.fence_mode = "none"  # the transform warps fence their stores; the tokens come by TMA
        self.cp_async_lag = 1
        self.gated = gated
        self.n_out = n_out
        self.k_dim = k_dim
        self.num_experts = num_experts
        self.tile_w = config.tile_w
        self.tile_t = config.tile_t
        self.n_atoms = config.tile_w // ATOM_M
        self.n_consumer_wg = 2  # as the bf16 kernel: 128 rows = one atom each, 256 = two each
        self.n_consumer_threads = WG * self.n_consumer_wg
        self.threads = 2 * WG + self.n_consumer_threads
        self.consumer_regs = CONSUMER_REGS
        self.out_cols = self.tile_w // 2 if gated else self.tile_w
        self.out_pitch = self.out_cols + VEC
        self.k_tiles = k_dim // TILE_K
        self.group_size = group_size
        self.groups = k_dim // group_size
        self.groups_per_ktile = max(1, TILE_K // group_size)  # meta rows per k-tile: 2 for g = 32, else 1
        self.epi_t = GroupedGemmSm90.epilogue_tokens(config, gated)
        self.stages, self.q_stages = self.ring_stages(config, gated, num_experts, group_size)

    @staticmethod
    def ring_stages(config: TileConfig, gated: bool, num_experts: int, group_size: int) -> tuple[int, int]:
        """(bf16 stages, int4 slots): as many bf16 stages as leave room for Q_MIN_STAGES int4 slots, then slots."""
        out_cols = config.tile_w // 2 if gated else config.tile_w
        epi = GroupedGemmSm90.epilogue_tokens(config, gated) * (out_cols + VEC) * 2
        free = SMEM_CAPACITY - (4 * 1024 + 8 * (num_experts + 1) + epi)
        w_stage = (config.tile_w + config.tile_t) * TILE_K * 2
        q_slot = config.tile_w * TILE_K // 2 + config.tile_w * max(1, TILE_K // group_size) * 4
        stages = min(MAX_STAGES, max(0, free - Q_MIN_STAGES * q_slot) // w_stage)
        return stages, min(Q_MAX_STAGES, (free - stages * w_stage) // q_slot)

    @staticmethod
    def supports(
        *, gated: bool, n_out: int, k_dim: int, num_experts: int, group_size: int, config: TileConfig
    ) -> tuple[bool, str]:
        if not config.smem_dequant:
            return False, f"the shared-memory dequant kernel takes only smem_dequant tiles, got {config}"
        if not (config.bulk_weights and config.tma_tokens) or config.kblock_pipeline or config.k_split != 1 or (
                config.k_tiles_per_stage != 1 or config.stages):
            return False, (f"smem_dequant needs bulk_weights and tma_tokens, one k-tile per stage, no split K, no "
                           f"k-block pipeline and stages 0, got {config}")
        if config.tile_w not in (128, 256) or config.tile_t > MAX_TILE_T:
            # two consumer warpgroups; ptxas fits a 64 x 256 accumulator (one wgmma) in the consumers' registers
            # only at the 384-thread launch (168), not at this kernel's 512 (128: "insufficient registers")
            return False, (f"smem_dequant needs tile_w 128 or 256 and tile_t <= {MAX_TILE_T}, got "
                           f"{config.tile_w} x {config.tile_t}")
        if group_size not in GROUP_SIZES:
            return False, f"group_size must be one of {GROUP_SIZES}, got {group_size}"
        if n_out % config.tile_w:
            return False, f"weight rows {n_out} must be a multiple of tile_w={config.tile_w}"
        if gated and n_out % 16:
            return False, f"2I = {n_out} must be a multiple of 16 (gate/up interleave blocks of 8 rows)"
        if k_dim % (2 * TILE_K) or k_dim % group_size:
            return False, f"reduction size {k_dim} must be a multiple of {2 * TILE_K} and of g={group_size}"
        if not 1 <= num_experts <= 1024:
            return False, f"num_experts must be in [1, 1024], got {num_experts}"
        if num_experts * (k_dim // TILE_K) * (n_out // ATOM_M) * WG >= 2**31:
            return False, "packed weights exceed 2^31 16-byte chunks (32-bit indexing)"
        stages, q_stages = W4A16SmemGemmSm90.ring_stages(config, gated, num_experts, group_size)
        if stages < 2 or q_stages < Q_MIN_STAGES:
            return False, f"tile config {config} leaves {stages} bf16 stages / {q_stages} int4 slots in shared memory"
        return True, "ok"

    @cute.jit
    def __call__(
        self,
        qweight: cute.Tensor,  # (E * K/64 * N/64 * 128, 4) int32: prepared.qweight viewed as 16-byte chunks
        meta: cute.Tensor,  # (E * G * N / 4, 4) int32: prepared.meta viewed as 16-byte chunks
        tokens: cute.Tensor,  # (rows, k_dim) bf16: x[gather_index] [M, H] (gated) or act [M, I]
        gather_index: cute.Tensor,  # (M,) int32: unused (the caller gathered the rows)
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
        tma_atom_t, tma_t = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), tokens, cute.slice_(t_layout, (None, None, 0)), (self.tile_t, TILE_K)
        )
        q_words = self.n_atoms * WG * 4  # int32 per int4 slot
        meta_words = self.groups_per_ktile * self.tile_w

        @cute.struct
        class SharedStorage:
            full_bar: cute.struct.MemRange[Int64, self.stages]
            empty_bar: cute.struct.MemRange[Int64, self.stages]
            q_full_bar: cute.struct.MemRange[Int64, self.q_stages]
            q_empty_bar: cute.struct.MemRange[Int64, self.q_stages]
            expert_rows: cute.struct.MemRange[Int32, self.num_experts + 1]
            tile_prefix: cute.struct.MemRange[Int32, self.num_experts + 1]
            s_out: cute.struct.Align[cute.struct.MemRange[BFloat16, self.epi_t * self.out_pitch], 128]
            s_w: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(w_layout)], 1024]
            s_t: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(t_layout)], 1024]
            s_q: cute.struct.Align[cute.struct.MemRange[Int32, q_words * self.q_stages], 128]
            s_meta: cute.struct.Align[cute.struct.MemRange[Int32, meta_words * self.q_stages], 16]

        self.shared_storage = SharedStorage
        self.kernel(
            qweight, meta, tma_atom_t, tma_t, expert_offsets, out, self.tiled_mma, w_layout, t_layout
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
        qweight: cute.Tensor,
        meta: cute.Tensor,
        tma_atom_t: cute.CopyAtom,
        tokens: cute.Tensor,
        expert_offsets: cute.Tensor,
        out: cute.Tensor,
        tiled_mma: cute.TiledMma,
        w_layout: cute.ComposedLayout,
        t_layout: cute.ComposedLayout,
    ):
        n_exp = self.num_experts
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // WG)
        lane = cute.arch.lane_idx()
        if warp == 1:
            cpasync.prefetch_descriptor(tma_atom_t)

        storage = utils.SmemAllocator().allocate(self.shared_storage)
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        q_full = storage.q_full_bar.data_ptr()
        q_empty = storage.q_empty_bar.data_ptr()
        s_rows = storage.expert_rows.get_tensor(cute.make_layout(n_exp + 1))
        s_prefix = storage.tile_prefix.get_tensor(cute.make_layout(n_exp + 1))
        if tidx == 0:
            for s in cutlass.range_constexpr(self.stages):
                cute.arch.mbarrier_init(full + s, 1 + TRANSFORM_WARPS)  # token TMA expect-tx + one per transform warp
                cute.arch.mbarrier_init(empty + s, 4 * self.n_consumer_wg)  # one arrival per consumer warp
            for s in cutlass.range_constexpr(self.q_stages):
                cute.arch.mbarrier_init(q_full + s, 1)  # the loader's expect-tx
                cute.arch.mbarrier_init(q_empty + s, TRANSFORM_WARPS)
            cute.arch.mbarrier_init_fence()
        await_inputs()  # expert_offsets, tokens: the router's and the previous kernel's outputs

        if warp == 0:  # the tile schedule of grouped_gemm.py
            build_tile_schedule(expert_offsets, s_rows, s_prefix, lane, n_exp, self.tile_t, self.n_out // self.tile_w)
        cute.arch.sync_threads()

        total_tiles = s_prefix[n_exp]
        if wg == 1 or wg == 2:
            self.consume(out, tiled_mma, storage, w_layout, t_layout, s_rows, s_prefix, total_tiles)
        else:
            cute.arch.warpgroup_reg_dealloc(PRODUCER_REGS)
            if warp == 0:
                if tidx == 0:
                    self.load_int4(qweight, meta, storage, s_rows, s_prefix, total_tiles)
            else:
                # transform warp 0..6: warps 1-3, then 12-15
                wt = warp - 1 if warp < 4 else warp - 12 + 3
                self.transform(wt, tma_atom_t, tokens, storage, t_layout, s_rows, s_prefix, total_tiles)

    @cute.jit
    def load_int4(self, qweight: cute.Tensor, meta: cute.Tensor, storage, s_rows: cute.Tensor, s_prefix: cute.Tensor,
                  total_tiles: Int32):
        """One thread: per (tile, k-tile) the int4 atoms (contiguous) and the meta rows of its groups by
        cp.async.bulk into the next int4 slot, as soon as the transform warps have released it."""
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        q_full = storage.q_full_bar.data_ptr()
        q_empty = storage.q_empty_bar.data_ptr()
        gpk = self.groups_per_ktile
        q_words = self.n_atoms * WG * 4
        meta_words = gpk * self.tile_w
        bulk_q = cute.make_copy_atom(cpasync.CopyBulkG2SOp(), Int32, num_bits_per_copy=q_words * 32)
        bulk_m = cute.make_copy_atom(cpasync.CopyBulkG2SOp(), Int32, num_bits_per_copy=self.tile_w * 32)
        q_layout = cute.make_layout((q_words, 1))
        m_layout = cute.make_layout((self.tile_w, 1))
        sq_ptr = storage.s_q.data_ptr()
        sm_ptr = storage.s_meta.data_ptr()
        n_blocks = self.n_out // ATOM_M
        issued = Int32(0)
        tile = bidx
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = locate_tile(tile, e, s_rows, s_prefix, self.tile_t)
            for kt in range(self.k_tiles):
                slot = issued % self.q_stages
                cute.arch.mbarrier_wait(q_empty + slot, ((issued // self.q_stages) & 1) ^ 1)
                cute.arch.mbarrier_arrive_and_expect_tx(q_full + slot, (q_words + meta_words) * 4)
                q_base = ((e * self.k_tiles + kt) * n_blocks + w_tile * self.n_atoms) * WG * 4
                cute.copy(bulk_q, cute.make_tensor(qweight.iterator + q_base, q_layout),
                          cute.make_tensor(sq_ptr + slot * q_words, q_layout), mbar_ptr=q_full + slot)
                for j in cutlass.range_constexpr(gpk):
                    grp = (kt * TILE_K) // self.group_size + j
                    m_base = (e * self.groups + grp) * self.n_out + w_tile * self.tile_w
                    cute.copy(bulk_m, cute.make_tensor(meta.iterator + m_base, m_layout),
                              cute.make_tensor(sm_ptr + slot * meta_words + j * self.tile_w, m_layout),
                              mbar_ptr=q_full + slot)
                issued = issued + 1
            tile = tile + gdim

    @cute.jit
    def transform(self, wt: Int32, tma_atom_t: cute.CopyAtom, tokens: cute.Tensor, storage,
                  t_layout: cute.ComposedLayout, s_rows: cute.Tensor, s_prefix: cute.Tensor, total_tiles: Int32):
        """Transform warp wt (0..6): per (tile, k-tile) claim a bf16 stage, (wt = 0) TMA the token rows into it,
        dequantise units wt, wt + 7, ... of the int4 slot into its weight tile, fence, arrive."""
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        lane = cute.arch.lane_idx()
        full = storage.full_bar.data_ptr()
        empty = storage.empty_bar.data_ptr()
        q_full = storage.q_full_bar.data_ptr()
        q_empty = storage.q_empty_bar.data_ptr()
        s_t = storage.s_t.get_tensor(t_layout.outer, swizzle=t_layout.inner)  # (tile_t, 64, stages) under TMA
        q_words = self.n_atoms * WG * 4
        # (word in half, half, virtual consumer thread of the tile's atoms, slot)
        s_q = storage.s_q.get_tensor(
            cute.make_layout((2, 2, self.n_atoms * WG, self.q_stages), stride=(1, 2, 4, q_words))
        )
        meta_words = self.groups_per_ktile * self.tile_w
        s_meta = storage.s_meta.get_tensor(cute.make_layout((meta_words, self.q_stages), stride=(1, meta_words)))
        sw_base = storage.s_w.data_ptr().toint()  # 32-bit shared address of bf16 stage 0 (1024-aligned)
        tok_bytes = self.tile_t * TILE_K * 2
        n_units = self.n_atoms * UNITS_PER_ATOM
        q_reg = cute.make_rmem_tensor((2,), Int32)
        issued = Int32(0)
        tile = bidx
        e = Int32(0)
        while tile < total_tiles:
            e, rows_lo, rows_hi, w_tile, row_start = locate_tile(tile, e, s_rows, s_prefix, self.tile_t)
            for kt in range(self.k_tiles):
                stage = issued % self.stages
                cute.arch.mbarrier_wait(empty + stage, ((issued // self.stages) & 1) ^ 1)
                if wt == 0:
                    # tile_t rows from row_start (experts start anywhere): rows of the next expert only reach
                    # output columns the epilogue never stores, rows past M are zero-filled. The whole warp issues
                    # the copy (it elects its thread with elect.sync over all 32 lanes).
                    if lane == 0:
                        cute.arch.mbarrier_arrive_and_expect_tx(full + stage, tok_bytes)
                    g_t = cute.local_tile(cute.domain_offset((row_start, 0), tokens), (self.tile_t, TILE_K), (0, None))
                    t_ts, t_tg = cpasync.tma_partition(tma_atom_t, 0, cute.make_layout(1),
                                                       cute.group_modes(s_t, 0, 2), cute.group_modes(g_t, 0, 2))
                    cute.copy(tma_atom_t, t_tg[(None, kt)], t_ts[(None, stage)], tma_bar_ptr=full + stage)
                slot = issued % self.q_stages
                cute.arch.mbarrier_wait(q_full + slot, (issued // self.q_stages) & 1)
                for x in cutlass.range_constexpr((n_units + TRANSFORM_WARPS - 1) // TRANSFORM_WARPS):
                    unit = wt + TRANSFORM_WARPS * x
                    if unit < n_units:
                        self.dequant_unit(unit, lane, q_reg, s_q, s_meta, slot, sw_base + stage * (self.tile_w * 128))
                # generic-proxy stores -> the consumers' wgmma (async proxy); then one arrival per warp
                cute.arch.fence_proxy(cute.arch.ProxyKind.async_shared, space=cute.arch.SharedSpace.shared_cta)
                cute.arch.sync_warp()
                if lane == 0:
                    cute.arch.mbarrier_arrive(full + stage)
                    cute.arch.mbarrier_arrive(q_empty + slot)
                issued = issued + 1
            tile = tile + gdim

    @cute.jit
    def dequant_unit(self, unit: Int32, lane: Int32, q_reg: cute.Tensor, s_q: cute.Tensor, s_meta: cute.Tensor,
                     slot: Int32, stage_addr: Int32):
        """16 rows x 32 k of the weight tile (unit = atom a, consumer warp v of the register kernel, half hf of
        the k-tile): lane l reads words 2 hf, 2 hf + 1 of virtual consumer thread 32 v + l's 16 bytes (its A
        fragments of k16 blocks 2 hf and 2 hf + 1, rows r = 16 v + l / 4 and r + 8 of atom a), dequantises them
        and stores block kb with one stmatrix.x4: lane l addresses row l % 8 (+ 8 for matrices 1, 3) and 16-byte
        chunk 2 kb (+ 1 for matrices 2, 3) of the 128-byte-swizzled stage (chunk c of row r at c ^ (r % 8))."""
        atom = unit // UNITS_PER_ATOM
        v = (unit // 2) % 4
        hf = unit % 2
        cute.autovec_copy(s_q[None, hf, atom * WG + 32 * v + lane, slot], q_reg)
        row = atom * ATOM_M + 16 * v + lane // 4  # this lane's fragment row r (and r + 8)
        # the unit's group: g = 32 has two per k-tile, the first over k16 blocks 0, 1 (hf = 0), the second 2, 3
        meta_row = hf * self.tile_w + row if cutlass.const_expr(self.groups_per_ktile > 1) else row
        scale2 = cute.make_rmem_tensor((2,), Int32)  # rows r, r + 8
        neg_zero2 = cute.make_rmem_tensor((2,), Int32)
        for h in cutlass.range_constexpr(2):
            word = s_meta[meta_row + 8 * h, slot]
            scale2[h] = prmt(word, 0x1010)
            neg_zero2[h] = prmt(word, 0x3232)
        mat = lane // 8
        st_row = atom * ATOM_M + 16 * v + 8 * (mat % 2) + lane % 8
        row_addr = stage_addr + st_row * (TILE_K * 2)
        for b in cutlass.range_constexpr(2):  # k16 block kb = 2 hf + b
            regs = [apply_scale(dequant_exact(q_reg[b], i, neg_zero2[i % 2]), scale2[i % 2]) for i in range(4)]
            chunk = 4 * hf + 2 * b + mat // 2
            stmatrix_x4(row_addr + ((chunk ^ (lane % 8)) << 4), *regs)
