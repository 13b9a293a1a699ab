"""W4A16 experts at decode on warp-level tensor cores, weights straight from HBM into each warp's own ring: no
producer warpgroup, no mbarriers, no wgmma (sm_90a, CuTe DSL 4.3.5).

Shape legend: T tokens, E experts, N weight rows (2I up, H down), K reduction (H up, I down), g group size,
M routed rows sorted by expert, KT = K / 64 k-tiles, KW warps per CTA, KPW = KT / KW k-tiles per warp.

    the same API and weights as w4a16_gemm.py (w4a16_expert_up / _down dispatch here when the tile config has
    direct_warps > 0): x [T, H] -> act [M, I] = SiLU(gate) * up, act [M, I] -> y [M, H]

Why another kernel for decode: at a few rows per expert the wgmma kernel (w4a16_gemm.py) is bound by issue slots,
not by DRAM (Nsight Compute: 0.82 instructions per scheduler and cycle at T = 1, docs/kernels.md). Its 64-row tile
costs ~100 instructions per k-tile and consumer warp (16 weight rows) plus the producer warpgroup's copies,
barriers and fences; the dequant of a warp's 16 rows is only ~44 of them. Here one warp owns all 64 rows of an
atom, so the fixed work of a k-tile (barrier, ring step, token fragments, address arithmetic) is paid once per
2 KB of int4 instead of once per 512 bytes, and nothing is paid for a producer at all:

  * Unit of work: (expert, 64-row atom, 8 routed rows), the persistent tile list of gemm_pipeline (one CTA per
    unit at a time, 2 CTAs per SM). The CTA's KW warps split the unit's K: warp w takes k-tiles w * KPW ...
    (whole groups, so a group's scale never crosses warps), then the KW fp32 partials meet in shared memory
    and all threads reduce, apply SiLU * up (gated) and store bf16 rows.
  * Each warp streams its own k-tiles with cp.async into a private ring of `ring` slots (int4 2 KB: lane l
    copies the four 16-byte fragments l + 32 b, b = 0..3, which are exactly its own mma.sync A fragments of the
    four m16 blocks; the token rows' k-tile, 128 bytes per routed row; the group's meta). Lane l reads its
    int4 back itself; the token fragments come by ldmatrix from the lanes' joint copy, so a warp-level barrier
    (bar.warp.sync) is the only synchronisation per k-tile. cp.async.wait_group counts the ring.
  * Dequant as the deferred-scale wgmma kernel (w4a16_dequant.dequant_exact: shift, lop3, exact fma ->
    bf16x2 q - z), the k16 steps' mma.sync m16n8k16 sum one group into its own fp32 accumulator, folded into
    the total times the group scale once per group (fold_scaled). So the result equals the wgmma kernel's
    deferred scale up to fp32 summation order.
  * Programmatic dependent launch: the down projection's expert list was written before the up GEMM (its
    predecessor) passed its own wait, so with early_weights the first ring slots' int4 is requested before
    griddepcontrol.wait and streams while the up GEMM drains; the token rows follow the wait.
  * The next projection's weights into L2 (prefetch, opt-in: w4a16_expert_up's next_weights): with whole units
    per CTA, the CTAs that get one unit fewer than the busiest finish a unit early, while HBM still has the last
    units to stream for the others; before exiting, those CTAs ask L2 for the heads of the down projection's
    k-tile streams of the active experts (cp.async.bulk.prefetch.L2, nothing waits for it), so that the down kernel
    starts on L2 hits while HBM streams the rest (docs/kernels.md, "Down weights into L2 from the up kernel's tail").
  * Stream-K (config.stream_k, opt-in: slower in chains of kernels on the H100, docs/kernels.md): CTAs take equal
    runs of (unit, one group per warp) steps instead of whole units; a unit several CTAs share is summed by the last
    of them through a per-device fp32 workspace (finish_shared, sharer_slot).

Limits (w4a16_plan.supports_direct): g in {64, 128}; KW divides KT into whole groups; 8 routed rows per unit (an
expert with more gets more units, each re-reading its weights: the tile table sends only decode here).
Status and measurements: docs/kernels.md, "Direct decode kernel".
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import torch
from cutlass import Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cute.runtime import from_dlpack
from cutlass.cutlass_dsl import dsl_user_op

from light_moe.kernels import w4a16_plan
from light_moe.kernels.decode_attention import arrive_acq_rel
from light_moe.kernels.expert_epilogue import DEFAULT_EPILOGUE, ExpertEpilogue, gated_activation
from light_moe.kernels.gemm_pipeline import build_tile_schedule, locate_tile, prefetch_l2
from light_moe.kernels.launch import await_inputs
from light_moe.kernels.router import mma_16bit
from light_moe.kernels.skinny_gemm import ldmatrix_x4
from light_moe.kernels.tile_config import TileConfig
from light_moe.kernels.w4a16_dequant import bf16_lo_to_f32, dequant_exact, fold_scaled, prmt
from light_moe.kernels.w4a16_layout import ATOM_M, TILE_K
from light_moe.kernels.w4a16_plan import (
    ATOM_BYTES,
    CTAS_PER_SM,
    META_BYTES,
    PART_BYTES_PER_WARP,
    SLOT_BYTES,
    TOKEN_BYTES,
    TOKENS,
    NextPrefetch,
)

WARP = 32
M16 = ATOM_M // 16  # m16 blocks of an atom, all owned by one warp
TOKEN_OFF = ATOM_BYTES  # a ring slot: int4 of the k-tile, then the token rows, then the group's meta
META_OFF = ATOM_BYTES + TOKEN_BYTES


def _asm(result_types, values, asm: str, constraints: str, loc, ip):
    res_type = None if not result_types else llvm.StructType.get_literal(result_types)
    return llvm.inline_asm(res_type, values, asm, constraints, has_side_effects=True, is_align_stack=False,
                           asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@dsl_user_op
def cp_async_16(smem: Int32, gmem: Int64, l1: bool, *, loc=None, ip=None) -> None:
    """cp.async of 16 bytes, global -> shared; l1: through L1 (.ca: the token rows, which every warp of the CTA
    reads), else .cg (the int4 stream, read once)."""
    mode = "ca" if l1 else "cg"
    _asm(None, [Int32(smem).ir_value(loc=loc, ip=ip), Int64(gmem).ir_value(loc=loc, ip=ip)],
         f"cp.async.{mode}.shared.global [$0], [$1], 16;", "r,l", loc, ip)


@dsl_user_op
def sync_warp(*, loc=None, ip=None) -> None:
    """bar.warp.sync over all lanes: orders the lanes' shared-memory accesses (and their cp.async data, once each
    lane has waited for its own copies) for the whole warp."""
    _asm(None, [], "bar.warp.sync -1;", "", loc, ip)


@dsl_user_op
def lds_v4_b32(addr: Int32, *, loc=None, ip=None) -> list:
    res = _asm([cutlass.cutlass_dsl.T.i32()] * 4, [Int32(addr).ir_value(loc=loc, ip=ip)],
               "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r", loc, ip)
    return [Int32(llvm.extractvalue(cutlass.cutlass_dsl.T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4)]


@dsl_user_op
def lds_b32(addr: Int32, *, loc=None, ip=None) -> Int32:
    return Int32(llvm.inline_asm(cutlass.cutlass_dsl.T.i32(), [Int32(addr).ir_value(loc=loc, ip=ip)],
                                 "ld.shared.b32 $0, [$1];", "=r,r", has_side_effects=True, is_align_stack=False,
                                 asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def lds_f32(addr: Int32, *, loc=None, ip=None) -> Float32:
    return Float32(llvm.inline_asm(Float32.mlir_type, [Int32(addr).ir_value(loc=loc, ip=ip)],
                                   "ld.shared.f32 $0, [$1];", "=f,r", has_side_effects=True, is_align_stack=False,
                                   asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def sts_f32(addr: Int32, value: Float32, *, loc=None, ip=None) -> None:
    _asm(None, [Int32(addr).ir_value(loc=loc, ip=ip), Float32(value).ir_value(loc=loc, ip=ip)],
         "st.shared.f32 [$0], $1;", "r,f", loc, ip)


@dsl_user_op
def stg_f32(addr: Int64, value: Float32, *, loc=None, ip=None) -> None:
    _asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Float32(value).ir_value(loc=loc, ip=ip)],
         "st.global.f32 [$0], $1;", "l,f", loc, ip)


@dsl_user_op
def ldg_cg_f32(addr: Int64, *, loc=None, ip=None) -> Float32:
    """ld.global.cg: from L2, never a stale L1 line (another CTA's stream-K partial, read after the acquire)."""
    return Float32(llvm.inline_asm(Float32.mlir_type, [Int64(addr).ir_value(loc=loc, ip=ip)],
                                   "ld.global.cg.f32 $0, [$1];", "=f,l", has_side_effects=True, is_align_stack=False,
                                   asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def stg_bf16(addr: Int64, value: Float32, *, loc=None, ip=None) -> None:
    """value rounded to bf16 (nearest even), stored as 2 bytes at global address addr."""
    _asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Float32(value).ir_value(loc=loc, ip=ip)],
         "{ .reg .b16 h;\ncvt.rn.bf16.f32 h, $1;\nst.global.b16 [$0], h; }", "l,f", loc, ip)


def token_slot_offset(tok, chunk):
    """Byte offset of routed row tok's 16-byte chunk `chunk` (k 8 chunk ...) in a slot's token rows: rows of 128
    bytes, chunk c at c ^ tok, so ldmatrix's 8 row addresses of one matrix hit 8 different bank groups."""
    return TOKEN_OFF + tok * (TILE_K * 2) + ((chunk ^ tok) * 16)


def token_ldmatrix_offset(pair, lane):
    """Lane's ldmatrix.x4 row address (byte offset in a slot) for k16 steps 2 pair and 2 pair + 1: matrix j =
    lane // 8 is k 8 (4 pair + j) ... + 7 of rows 0..7, so registers (0, 1) are the B fragment (b0b1, b2b3) of
    step 2 pair and (2, 3) of step 2 pair + 1 (row = routed row = mma N, as ldmatrix gives lane 4 g + q the
    elements (g, 2q), (g, 2q + 1) of each matrix)."""
    return token_slot_offset(lane % 8, 4 * pair + lane // 8)


def partial_offset(warp, block, value, lane):
    """Byte offset of a warp's accumulator value (m16 block, C register 0..3) of lane in a partial buffer."""
    return (((warp * M16 + block) * 4 + value) * WARP + lane) * 4


def stream_k_start(cta, steps_total, ctas):
    """Stream-K: the first (unit, group per warp) step of CTA `cta` (its run ends where cta + 1's starts); ctas =
    min(grid, steps_total), so that every run has a step (an empty run inside a unit's sharers would be counted
    as one)."""
    return cta * steps_total // ctas


def stream_k_owner(step, steps_total, ctas):
    """Stream-K: the CTA whose run holds `step` (the largest cta with stream_k_start(cta) <= step)."""
    return ((step + 1) * ctas - 1) // steps_total


def sharer_slot(cta, unit, unit_steps, steps_total, ctas, minimum=min):
    """Stream-K: the workspace slot (and counter) CTA `cta` keeps for `unit`, a unit it shares with other CTAs:
    2 cta for its first unit, 2 cta + 1 for its last (a CTA shares no other). minimum: cutlass.min in a kernel."""
    return cta * 2 + minimum(unit - stream_k_start(cta, steps_total, ctas) // unit_steps, 1)


def direct_workspace_sizes(num_sms: int) -> tuple[int, int]:
    """(fp32 words, int32 counters) of the stream-K workspace: per CTA two slots (its first and its last unit, the
    only ones it can share) of a unit's ATOM_M x TOKENS partial sums, and a counter per slot."""
    ctas = num_sms * CTAS_PER_SM
    return ctas * 2 * ATOM_M * TOKENS, ctas * 2


class W4A16DirectSm90:
    """out[rows of e] = (SiLU * up of) tokens[rows of e] @ dequant(W[e])^T for every expert e, one launch, for
    routed-row counts of decode. Arguments as W4A16GroupedGemmSm90 (gemm_host.launch): the prepared weights as
    16-byte chunk views, tokens, gather_index (read only when gated), expert_offsets, out, the SM count."""

    def __init__(self, *, gated: bool, n_out: int, k_dim: int, num_experts: int, group_size: int, k_warps: int,
                 ring: int, early_weights: bool, stream_k: bool, prefetch: NextPrefetch | None = None):
        self.gated = gated
        self.n_out = n_out
        self.k_dim = k_dim
        self.num_experts = num_experts
        self.group_size = group_size
        self.k_warps = k_warps
        self.threads = WARP * k_warps
        self.k_tiles = k_dim // TILE_K
        self.kpw = self.k_tiles // k_warps  # k-tiles per warp and unit (whole groups)
        self.gk = group_size // TILE_K  # k-tiles per group: 1 or 2
        self.groups = k_dim // group_size
        self.n_atoms = n_out // ATOM_M
        self.out_cols = ATOM_M // 2 if gated else ATOM_M  # output columns of a unit
        self.out_pitch = n_out // 2 if gated else n_out
        self.ring = ring
        # the up projection's expert list is its predecessor's (the router's) output: it must wait first
        self.early = early_weights and not gated
        self.stream_k = stream_k
        self.unit_steps = self.kpw // self.gk  # stream-K steps of a unit: one group per warp each
        if prefetch is not None and (not gated or stream_k):
            raise ValueError("the next projection's prefetch belongs to the up projection with whole units per CTA")
        self.prefetch = prefetch

    @cute.jit
    def __call__(
        self,
        qweight: cute.Tensor,  # (E * KT * N/64 * 128, 4) int32: prepared.qweight as 16-byte chunks
        meta: cute.Tensor,  # (E * G * N / 4, 4) int32: prepared.meta as 16-byte chunks
        tokens: cute.Tensor,  # (rows, K) bf16: x [T, H] (gated) or act [M, I]
        gather_index: cute.Tensor,  # (M,) int32
        expert_offsets: cute.Tensor,  # (E + 1,) int32
        out: cute.Tensor,  # (M, N/2) gated, (M, N) otherwise
        num_ctas: Int32,  # SMs; the grid is CTAS_PER_SM per SM
        stream: cuda.CUstream,
        workspace: cute.Tensor,  # (direct_workspace_sizes[0],) fp32: stream-K partials (read only with stream_k)
        counters: cute.Tensor,  # (direct_workspace_sizes[1],) int32 zeros, left zero: stream-K arrivals
        next_q: cute.Tensor = None,  # with self.prefetch: the next projection's qweight / meta (16-byte chunks)
        next_meta: cute.Tensor = None,
    ):
        @cute.struct
        class SharedStorage:
            expert_rows: cute.struct.MemRange[Int32, self.num_experts + 1]
            tile_prefix: cute.struct.MemRange[Int32, self.num_experts + 1]
            arrivals: cute.struct.MemRange[Int32, 1]  # stream-K: thread 0's count, for the whole CTA
            part: cute.struct.Align[cute.struct.MemRange[Float32, 2 * self.k_warps * PART_BYTES_PER_WARP // 4], 16]
            ring: cute.struct.Align[cute.struct.MemRange[Int32, self.k_warps * self.ring * SLOT_BYTES // 4], 128]

        self.shared_storage = SharedStorage
        self.kernel(qweight, meta, tokens, gather_index, expert_offsets, out, workspace, counters, next_q,
                    next_meta).launch(
            grid=(num_ctas * CTAS_PER_SM, 1, 1),
            block=(self.threads, 1, 1),
            min_blocks_per_mp=CTAS_PER_SM,  # caps registers at 65536 / (CTAS_PER_SM * threads)
            stream=stream,
            use_pdl=True,
        )

    @cute.jit
    def load_cursor(self, unit: Int32, e: Int32, lane: Int32, kt0: Int32, s_rows: cute.Tensor, s_prefix: cute.Tensor,
                    gather_index: cute.Tensor, q_base: Int64, m_base: Int64, t_base: Int64):
        """Unit (< total) -> its expert and this lane's source addresses at the warp's first k-tile kt0: int4
        fragment (then + one k-tile's stride per step), meta chunk of the group (+ one group's per group; lanes
        0..15 copy it), token chunks of routed rows lane // 8 and + 4 (+ 128 bytes per step) and whether those
        rows exist (the expert may have fewer than 8 left)."""
        e, rows_lo, rows_hi, atom, row_start = locate_tile(unit, e, s_rows, s_prefix, TOKENS)
        n_valid = cutlass.min(rows_hi - row_start, TOKENS)
        tok0 = lane // 8
        src0 = Int32(0)
        src1 = Int32(0)
        if tok0 < n_valid:
            if cutlass.const_expr(self.gated):
                src0 = gather_index[row_start + tok0]
            else:
                src0 = row_start + tok0
        if tok0 + 4 < n_valid:
            if cutlass.const_expr(self.gated):
                src1 = gather_index[row_start + tok0 + 4]
            else:
                src1 = row_start + tok0 + 4
        chunk = ((e * self.k_tiles + kt0) * self.n_atoms + atom) * (M16 * WARP) + lane
        q_ptr = q_base + Int64(chunk) * 16
        m_word = (e * self.groups + kt0 // self.gk) * self.n_out + atom * ATOM_M + lane * 4
        m_ptr = m_base + Int64(m_word) * 4
        col = kt0 * TILE_K + (lane % 8) * 8
        t_ptr0 = t_base + (Int64(src0) * self.k_dim + col) * 2
        t_ptr1 = t_base + (Int64(src1) * self.k_dim + col) * 2
        has0 = Int32(tok0 < n_valid)
        has1 = Int32(tok0 + 4 < n_valid)
        return e, q_ptr, m_ptr, t_ptr0, t_ptr1, has0, has1

    @cute.jit
    def unit_rows(self, unit: Int32, e: Int32, s_rows: cute.Tensor, s_prefix: cute.Tensor):
        """Unit (< total) -> (expert, atom, first routed row, valid routed rows <= 8) for its epilogue."""
        e, rows_lo, rows_hi, atom, row_start = locate_tile(unit, e, s_rows, s_prefix, TOKENS)
        return e, atom, row_start, cutlass.min(rows_hi - row_start, TOKENS)

    @cute.jit
    def issue_weights(self, slot: Int32, q_ptr: Int64, m_ptr: Int64, lane: Int32, new_group: cutlass.Constexpr):
        """cp.async of one k-tile of the atom's int4 (lane: its 4 fragments, 2 KB per warp) and, at a group's first
        k-tile, of the group's 64 meta words (lanes 0..15)."""
        for b in cutlass.range_constexpr(M16):
            cp_async_16(slot + (b * WARP + lane) * 16, q_ptr + b * WARP * 16, False)
        if cutlass.const_expr(new_group):
            if lane < META_BYTES // 16:
                cp_async_16(slot + META_OFF + lane * 16, m_ptr, False)

    @cute.jit
    def issue_tokens(self, slot: Int32, t_ptr0: Int64, t_ptr1: Int64, has0: Int32, has1: Int32, lane: Int32):
        """cp.async of one k-tile of the unit's routed rows (lane: chunk lane % 8 of rows lane // 8 and + 4)."""
        chunk = lane % 8
        tok0 = lane // 8
        if has0 != 0:
            cp_async_16(slot + token_slot_offset(tok0, chunk), t_ptr0, True)
        if has1 != 0:
            cp_async_16(slot + token_slot_offset(tok0 + 4, chunk), t_ptr1, True)

    @cute.jit
    def issue_step(self, slot: Int32, cur, ctx, weights: cutlass.Constexpr, tokens: cutlass.Constexpr,
                   pos: cutlass.Constexpr):
        """The load cursor's step: its int4 and group meta (weights) and / or token rows (tokens) copied into `slot`
        (pos: the step's k-tile within its group), then the cursor one step on, to the next unit's first k-tile
        after a unit's last (the next unit: + 1 under stream-K, + grid size otherwise). cur = (unit, j, expert,
        int4, meta and token row addresses, token rows present); ctx = what load_cursor reads."""
        unit, j, e, q_ptr, m_ptr, t_ptr0, t_ptr1, has0, has1 = cur
        unit_step, total, lane, kt0, s_rows, s_prefix, gather_index, q_base, m_base, t_base = ctx
        if cutlass.const_expr(weights):
            self.issue_weights(slot, q_ptr, m_ptr, lane, pos == 0)
        if cutlass.const_expr(tokens):
            self.issue_tokens(slot, t_ptr0, t_ptr1, has0, has1, lane)
        q_ptr = q_ptr + self.n_atoms * ATOM_BYTES  # one k-tile further in the prepared int4 of an atom
        t_ptr0 = t_ptr0 + TILE_K * 2
        t_ptr1 = t_ptr1 + TILE_K * 2
        if cutlass.const_expr(pos == self.gk - 1):
            m_ptr = m_ptr + self.n_out * 4  # one group further in meta
        j = j + 1
        if j == self.kpw:
            j = Int32(0)
            unit = unit + unit_step
            if unit < total:
                e, q_ptr, m_ptr, t_ptr0, t_ptr1, has0, has1 = self.load_cursor(
                    unit, e, lane, kt0, s_rows, s_prefix, gather_index, q_base, m_base, t_base)
        return unit, j, e, q_ptr, m_ptr, t_ptr0, t_ptr1, has0, has1

    @cute.jit
    def compute(self, slot: Int32, lane: Int32, acc: cute.Tensor, gacc: cute.Tensor, scale_f: cute.Tensor,
                negz: cute.Tensor, new_group: cutlass.Constexpr, end_group: cutlass.Constexpr):
        """One k-tile of the warp's 64 rows: (a group's first: its meta -> fp32 scales and bf16x2 -(128 + z) of
        rows g, g + 8 of each m16 block), the token fragments (2 ldmatrix.x4), per m16 block one ld.shared.v4 of
        the int4 and 4 x (4 dequant_exact + mma.sync) into the group accumulator; a group's last k-tile folds
        the group sum times its scale into acc."""
        g = lane // 4
        if cutlass.const_expr(new_group):
            for b in cutlass.range_constexpr(M16):
                for h in cutlass.range_constexpr(2):
                    word = lds_b32(slot + META_OFF + (16 * b + 8 * h + g) * 4)
                    scale_f[2 * b + h] = bf16_lo_to_f32(word)
                    negz[2 * b + h] = prmt(word, 0x3232)
        bfrag = []
        for p in cutlass.range_constexpr(TILE_K // 32):
            r = ldmatrix_x4(slot + token_ldmatrix_offset(p, lane))
            bfrag.append((r[0], r[1]))
            bfrag.append((r[2], r[3]))
        zero = Float32(0.0)
        for b in cutlass.range_constexpr(M16):
            words = lds_v4_b32(slot + (b * WARP + lane) * 16)
            c = [gacc[4 * b + i] for i in range(4)]
            for s in cutlass.range_constexpr(TILE_K // 16):
                a = [dequant_exact(words[s], i, negz[2 * b + i % 2]) for i in range(4)]
                if cutlass.const_expr(new_group and s == 0):
                    c = mma_16bit(a, bfrag[s], [zero, zero, zero, zero], "bf16")
                else:
                    c = mma_16bit(a, bfrag[s], c, "bf16")
            for i in cutlass.range_constexpr(4):
                if cutlass.const_expr(end_group):
                    # c0, c1: row g of the block, c2, c3: row g + 8
                    acc[4 * b + i] = fold_scaled(acc[4 * b + i], c[i], scale_f[2 * b + i // 2])
                else:
                    gacc[4 * b + i] = c[i]

    @cute.jit
    def step_registers(self):
        """The compute's registers: (acc, gacc, scale_f, negz): the warp's fp32 sums of its 64 rows (zeroed), the
        current group's sums, its scales and -(128 + z) (those three written at a group's first k-tile, before any
        read: no initial values)."""
        acc = cute.make_rmem_tensor((M16 * 4,), Float32)
        acc.fill(0.0)
        gacc = cute.make_rmem_tensor((M16 * 4,), Float32)
        scale_f = cute.make_rmem_tensor((M16 * 2,), Float32)
        negz = cute.make_rmem_tensor((M16 * 2,), Int32)
        return acc, gacc, scale_f, negz

    @cute.jit
    def previous_slot(self, slot_c: Int32) -> Int32:
        """(s + ring - 1) mod ring for the ring slot s of the step computed next: the slot computed one step ago, the
        one the load cursor fills now."""
        slot_l = slot_c + self.ring - 1
        if slot_c > 0:
            slot_l = slot_c - 1
        return slot_l

    @cute.jit
    def compute_step(self, ring_base: Int32, slot_c: Int32, lane: Int32, regs, new_group: cutlass.Constexpr,
                     end_group: cutlass.Constexpr) -> Int32:
        """One step of the main loop after its copies were issued: commit them as a cp.async group, wait until the
        step computed now has landed (this lane's copies, then every lane's: ring - 1 younger groups may be in
        flight), compute it (regs: step_registers); returns the ring slot of the next step."""
        cute.arch.cp_async_commit_group()
        cute.arch.cp_async_wait_group(self.ring - 1)
        sync_warp()
        acc, gacc, scale_f, negz = regs
        self.compute(ring_base + slot_c * SLOT_BYTES, lane, acc, gacc, scale_f, negz, new_group, end_group)
        slot_c = slot_c + 1
        if slot_c == self.ring:
            slot_c = Int32(0)
        return slot_c

    @cute.jit
    def stage_partials(self, acc: cute.Tensor, part: Int32, warp: Int32, lane: Int32):
        """Each warp's fp32 partials of the unit to `part` (this unit's half of the double buffer), zeroed in
        registers, then one CTA barrier. Double buffering makes one barrier per unit enough: a warp writes a half
        only after the next unit's barrier, which every reader of that half's previous unit passed after its
        reads."""
        for b in cutlass.range_constexpr(M16):
            for i in cutlass.range_constexpr(4):
                sts_f32(part + partial_offset(warp, b, i, lane), acc[4 * b + i])
                acc[4 * b + i] = Float32(0.0)
        cute.arch.sync_threads()

    @cute.jit
    def item_sums(self, part: Int32, tok: Int32, col: Int32):
        """Output item (routed row tok, column col) summed over the KW warp partials in warp order: (gate, up) of
        it (gated), else (value, 0)."""
        # C fragment of m16 block b: value i of lane 4 g + q = (row g + 8 (i // 2), token 2 q + i % 2)
        src_lane = (col % 8) * 4 + tok // 2
        first = Float32(0.0)
        second = Float32(0.0)
        if cutlass.const_expr(self.gated):
            # gate row 16 b + g and its up row 16 b + g + 8 make output column 8 b + g (interleave by 8)
            b = col // 8
            for w in cutlass.range_constexpr(self.k_warps):
                first = first + lds_f32(part + partial_offset(w, b, tok % 2, src_lane))
                second = second + lds_f32(part + partial_offset(w, b, 2 + tok % 2, src_lane))
        else:
            b = col // 16
            for w in cutlass.range_constexpr(self.k_warps):
                first = first + lds_f32(part + partial_offset(w, b, 2 * ((col % 16) // 8) + tok % 2, src_lane))
        return first, second

    @cute.jit
    def store_item(self, o_base: Int64, atom: Int32, row_start: Int32, tok: Int32, col: Int32, first: Float32,
                   second: Float32):
        """SiLU(gate) * up (gated) or the value, as bf16 at (routed row row_start + tok, the atom's column col)."""
        value = first
        if cutlass.const_expr(self.gated):
            value = gated_activation(first, second, DEFAULT_EPILOGUE)
        stg_bf16(o_base + (Int64(row_start + tok) * self.out_pitch + atom * self.out_cols + col) * 2, value)

    @cute.jit
    def finish_unit(self, acc: cute.Tensor, part: Int32, warp: Int32, lane: Int32, tidx: Int32, atom: Int32,
                    row_start: Int32, n_valid: Int32, o_base: Int64):
        """The end of a unit this CTA computed whole: the warps' partials meet in shared memory, every thread sums
        its outputs in warp order and stores them."""
        self.stage_partials(acc, part, warp, lane)
        n_items = TOKENS * self.out_cols
        for rnd in cutlass.range_constexpr((n_items + self.threads - 1) // self.threads):
            item = tidx + rnd * self.threads
            tok = item // self.out_cols
            col = item - tok * self.out_cols
            if item < n_items and tok < n_valid:
                first, second = self.item_sums(part, tok, col)
                self.store_item(o_base, atom, row_start, tok, col, first, second)

    @cute.jit
    def finish_shared(self, acc: cute.Tensor, part: Int32, warp: Int32, lane: Int32, tidx: Int32, unit: Int32,
                      atom: Int32, row_start: Int32, n_valid: Int32, o_base: Int64, sched, ws_base: Int64,
                      counters: cute.Tensor, s_arrivals: cute.Tensor):
        """Stream-K, the end of this CTA's part of a unit other CTAs share: the CTA's sums (gate and up apart) to its
        workspace slot, then a count on the unit's counter (release / acquire, as decode attention's merge); the
        CTA that completes the count adds every sharer's slot in CTA order (the result does not depend on who
        finishes last), stores the outputs and sets the counter back to zero. sched = (stream-K steps in all,
        CTAs with a run, this CTA)."""
        steps_total, ctas, bidx = sched
        self.stage_partials(acc, part, warp, lane)
        n_items = TOKENS * self.out_cols
        slot_words = ATOM_M * TOKENS
        total64 = Int64(steps_total)
        ctas64 = Int64(ctas)
        unit64 = Int64(unit)
        per_unit = Int64(self.unit_steps)
        mine = ws_base + sharer_slot(Int64(bidx), unit64, per_unit, total64, ctas64, cutlass.min) * (slot_words * 4)
        for rnd in cutlass.range_constexpr((n_items + self.threads - 1) // self.threads):
            item = tidx + rnd * self.threads
            tok = item // self.out_cols
            if item < n_items and tok < n_valid:
                first, second = self.item_sums(part, tok, item - tok * self.out_cols)
                if cutlass.const_expr(self.gated):
                    stg_f32(mine + Int64(2 * item) * 4, first)
                    stg_f32(mine + Int64(2 * item + 1) * 4, second)
                else:
                    stg_f32(mine + Int64(item) * 4, first)
        head = stream_k_owner(unit64 * per_unit, total64, ctas64)  # the unit's first and last sharers
        tail = stream_k_owner(unit64 * per_unit + per_unit - 1, total64, ctas64)
        counter = Int32(sharer_slot(head, unit64, per_unit, total64, ctas64, cutlass.min))  # the head's slot
        cute.arch.sync_threads()  # every thread's partial stores precede thread 0's release
        if tidx == 0:
            s_arrivals[0] = arrive_acq_rel(counters.iterator + counter)
        cute.arch.sync_threads()  # thread 0's acquire precedes every thread's loads of the other slots
        if s_arrivals[0] == Int32(tail - head):
            if tidx == 0:
                counters[counter] = Int32(0)  # every sharer has counted: nobody else touches it in this launch
            for rnd in cutlass.range_constexpr((n_items + self.threads - 1) // self.threads):
                item = tidx + rnd * self.threads
                tok = item // self.out_cols
                if item < n_items and tok < n_valid:
                    first = Float32(0.0)
                    second = Float32(0.0)
                    for c in range(Int32(head), Int32(tail) + 1):
                        theirs = ws_base + sharer_slot(Int64(c), unit64, per_unit, total64, ctas64,
                                                       cutlass.min) * (slot_words * 4)
                        if cutlass.const_expr(self.gated):
                            first = first + ldg_cg_f32(theirs + Int64(2 * item) * 4)
                            second = second + ldg_cg_f32(theirs + Int64(2 * item + 1) * 4)
                        else:
                            first = first + ldg_cg_f32(theirs + Int64(item) * 4)
                    self.store_item(o_base, atom, row_start, tok, item - tok * self.out_cols, first, second)

    @cute.jit
    def prefetch_next(self, q_base: Int64, m_base: Int64, s_rows: cute.Tensor, total: Int32, bidx: Int32,
                      gdim: Int32, tidx: Int32):
        """A CTA of one unit fewer than the busiest (whole units, bidx >= total mod grid), done with its units: its
        share of the next projection's prefetch. The blocks (active expert a, stream w, head k-tile j), a fastest,
        j slowest, are dealt to these CTAs in turn; a block is its k-tile's int4 of every atom (contiguous in the
        prepared layout) in pieces of piece_bytes, then its group's meta words, one instruction per thread."""
        pf = self.prefetch
        r = total % gdim
        if r > 0 and bidx >= r:
            n_early = gdim - r
            p = bidx - r
            active = Int32(0)
            for e in range(self.num_experts):
                if s_rows[e + 1] > s_rows[e]:
                    active = active + 1
            streams = pf.k_tiles // pf.run
            head = cutlass.min(pf.head, pf.max_blocks // (active * streams))
            n_blocks = active * streams * head
            mine = Int32(0)
            if p < n_blocks:
                mine = (n_blocks - p + n_early - 1) // n_early
            block_bytes = pf.n_atoms * ATOM_BYTES
            meta_bytes = pf.n_out * 4  # one group (g >= 64: at most one per k-tile)
            for item in range(tidx, mine * pf.pieces, self.threads):
                blk = p + (item // pf.pieces) * n_early
                piece = item % pf.pieces
                a = blk % active
                rest = blk // active
                kt = (rest % streams) * pf.run + rest // streams
                e = Int32(-1)  # the a-th active expert
                seen = Int32(0)
                for x in range(self.num_experts):
                    if s_rows[x + 1] > s_rows[x]:
                        if seen == a:
                            e = x
                        seen = seen + 1
                if piece < pf.pieces - 1:
                    prefetch_l2(q_base + Int64(e * pf.k_tiles + kt) * block_bytes + Int64(piece) * pf.piece_bytes,
                                pf.piece_bytes)
                else:
                    group = kt * TILE_K // pf.group_size
                    prefetch_l2(m_base + Int64(e * (pf.k_tiles * TILE_K // pf.group_size) + group) * meta_bytes,
                                meta_bytes)

    @cute.kernel
    def kernel(self, qweight: cute.Tensor, meta: cute.Tensor, tokens: cute.Tensor, gather_index: cute.Tensor,
               expert_offsets: cute.Tensor, out: cute.Tensor, workspace: cute.Tensor, counters: cute.Tensor,
               next_q: cute.Tensor | None, next_meta: cute.Tensor | None):
        n_exp = self.num_experts
        ring = self.ring
        gk = self.gk
        kpw = self.kpw
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        storage = utils.SmemAllocator().allocate(self.shared_storage)
        s_rows = storage.expert_rows.get_tensor(cute.make_layout(n_exp + 1))
        s_prefix = storage.tile_prefix.get_tensor(cute.make_layout(n_exp + 1))
        s_arrivals = storage.arrivals.get_tensor(cute.make_layout(1))
        if cutlass.const_expr(not self.early):
            await_inputs()  # expert_offsets, gather_index, tokens: the predecessors' outputs
        if warp == 0:
            build_tile_schedule(expert_offsets, s_rows, s_prefix, lane, n_exp, TOKENS, self.n_atoms)
        cute.arch.sync_threads()

        total = s_prefix[n_exp]
        # the CTA's work: units first_unit, + unit_step, ..., starting at k-tile j0 of the warps' ranges; `steps`
        # k-tiles per warp, the same for every warp of the CTA, so the unit barriers line up
        steps_total = total * self.unit_steps  # stream-K: (unit, one group per warp) steps
        first_unit = bidx
        j0 = Int32(0)
        unit_step = gdim
        steps = Int32(0)
        ctas = cutlass.min(gdim, steps_total)  # stream-K: CTAs with a run (at least one step each)
        if cutlass.const_expr(self.stream_k):
            unit_step = Int32(1)
            if bidx < ctas:
                s0 = Int32(stream_k_start(Int64(bidx), Int64(steps_total), Int64(ctas)))
                s1 = Int32(stream_k_start(Int64(bidx + 1), Int64(steps_total), Int64(ctas)))
                first_unit = s0 // self.unit_steps
                j0 = (s0 - first_unit * self.unit_steps) * gk
                steps = (s1 - s0) * gk
        else:
            if bidx < total:
                steps = (total - bidx + gdim - 1) // gdim * kpw
        ring_base = storage.ring.data_ptr().toint() + warp * (ring * SLOT_BYTES)
        part_base = storage.part.data_ptr().toint()
        q_base = qweight.iterator.toint()
        m_base = meta.iterator.toint()
        t_base = tokens.iterator.toint()
        o_base = out.iterator.toint()
        kt0 = warp * kpw

        # The load cursor runs ring - 1 steps ahead of the compute: (unit, j = k-tile of the warp's range), the
        # unit's expert and this lane's source addresses (load_cursor), advanced by constant strides (issue_step).
        ctx = (unit_step, total, lane, kt0, s_rows, s_prefix, gather_index, q_base, m_base, t_base)
        l_unit, l_j, l_e, l_q, l_m, l_t0, l_t1, l_has0, l_has1 = (first_unit, j0, Int32(0), q_base, m_base, t_base,
                                                                  t_base, Int32(0), Int32(0))
        if steps > 0:
            l_e, l_q, l_m, l_t0, l_t1, l_has0, l_has1 = self.load_cursor(first_unit, l_e, lane, kt0 + j0, s_rows,
                                                                          s_prefix, gather_index, q_base, m_base,
                                                                          t_base)
        # prologue: steps 0 .. ring - 2, one cp.async group each (empty past the end). Early weights: the int4 and
        # meta of those steps before the dependency wait, their token rows after it in a second pass, one group
        # per pass and step; the main loop's wait_group(ring - 1) still finds step s complete (the int4 groups are
        # older, and token group s is followed by exactly ring - 1 younger groups at step s).
        first = (l_unit, l_j, l_e, l_q, l_m, l_t0, l_t1, l_has0, l_has1)
        for d in cutlass.range_constexpr(ring - 1):
            if d < steps:
                l_unit, l_j, l_e, l_q, l_m, l_t0, l_t1, l_has0, l_has1 = self.issue_step(
                    ring_base + d * SLOT_BYTES, (l_unit, l_j, l_e, l_q, l_m, l_t0, l_t1, l_has0, l_has1), ctx,
                    True, not self.early, d % gk)
            cute.arch.cp_async_commit_group()
        if cutlass.const_expr(self.early):
            await_inputs()  # act: the up GEMM's output
            p_unit, p_j, p_e, p_q, p_m, p_t0, p_t1, p_has0, p_has1 = first
            for d in cutlass.range_constexpr(ring - 1):
                if d < steps:
                    p_unit, p_j, p_e, p_q, p_m, p_t0, p_t1, p_has0, p_has1 = self.issue_step(
                        ring_base + d * SLOT_BYTES, (p_unit, p_j, p_e, p_q, p_m, p_t0, p_t1, p_has0, p_has1), ctx,
                        False, True, d % gk)
                cute.arch.cp_async_commit_group()

        regs = self.step_registers()
        acc = regs[0]
        c_unit = first_unit
        c_j = j0
        c_e = Int32(0)
        last_sp = steps // gk - 1
        sched = (steps_total, ctas, bidx)
        ws_base = workspace.iterator.toint()
        parity = Int32(0)
        slot_c = Int32(0)  # ring slot of the step computed next; step s + ring - 1 loads into the slot before it
        for sp in range(steps // gk):
            for h in cutlass.range_constexpr(gk):
                sync_warp()  # every lane has read the slot the next copies overwrite (computed one step ago)
                if sp * gk + h + ring - 1 < steps:  # steps of a unit start at a group: kpw % gk == 0
                    l_unit, l_j, l_e, l_q, l_m, l_t0, l_t1, l_has0, l_has1 = self.issue_step(
                        ring_base + self.previous_slot(slot_c) * SLOT_BYTES,
                        (l_unit, l_j, l_e, l_q, l_m, l_t0, l_t1, l_has0, l_has1), ctx, True, True, (h + ring - 1) % gk)
                slot_c = self.compute_step(ring_base, slot_c, lane, regs, h == 0, h == gk - 1)
            c_j = c_j + gk
            if c_j == kpw or sp == last_sp:  # the unit's end or (stream-K) the end of this CTA's run
                c_e, c_atom, c_row, c_nv = self.unit_rows(c_unit, c_e, s_rows, s_prefix)
                part = part_base + parity * (self.k_warps * PART_BYTES_PER_WARP)
                if cutlass.const_expr(self.stream_k):
                    # whole here: ended at the unit's last k-tile, begun at its first (only the CTA's first unit
                    # may begin later, at j0)
                    if c_j == kpw and (c_unit != first_unit or j0 == 0):
                        self.finish_unit(acc, part, warp, lane, tidx, c_atom, c_row, c_nv, o_base)
                    else:
                        self.finish_shared(acc, part, warp, lane, tidx, c_unit, c_atom, c_row, c_nv, o_base, sched,
                                           ws_base, counters, s_arrivals)
                else:
                    self.finish_unit(acc, part, warp, lane, tidx, c_atom, c_row, c_nv, o_base)
                parity = parity ^ 1
                c_j = Int32(0)
                c_unit = c_unit + unit_step
        if cutlass.const_expr(self.prefetch is not None):
            self.prefetch_next(next_q.iterator.toint(), next_meta.iterator.toint(), s_rows, total, bidx, gdim, tidx)


_workspaces: dict = {}  # device -> (fp32 partials, int32 counters, their cute views)


def direct_workspace(device, num_sms: int) -> tuple:
    """The kernel's (workspace, counters) views on `device` (direct_workspace_sizes), made on first use: the
    counters are zero and every launch leaves them zero; one set per device, as launches on it are serialised
    (the engine runs its layers on one stream; decode attention's merge counters rest on the same). Not made
    inside CUDA graph capture (a buffer made there would be zeroed only when that graph replays): the engine's
    and the benchmarks' graphs run every shape once eagerly first."""
    entry = _workspaces.get(device)
    if entry is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the direct W4A16 kernel's workspace on {device} was first needed inside CUDA graph "
                               "capture; run the projection once outside capture first")
        words, count = direct_workspace_sizes(num_sms)
        ws = torch.empty(words, dtype=torch.float32, device=device)
        counters = torch.zeros(count, dtype=torch.int32, device=device)
        entry = _workspaces[device] = (ws, counters, from_dlpack(ws, assumed_align=16),
                                       from_dlpack(counters, assumed_align=4))
    return entry[2], entry[3]


def make_direct_kernel(gated: bool, n_out: int, k_dim: int, num_experts: int, group_size: int, config: TileConfig,
                       epilogue: ExpertEpilogue = DEFAULT_EPILOGUE,
                       prefetch: NextPrefetch | None = None) -> W4A16DirectSm90:
    """The direct decode kernel (w4a16_direct.py) for a config with direct_warps > 0, after the same checks;
    prefetch: the next projection's L2 prefetch from the tail (up projection, whole units only)."""
    ok, reason = w4a16_plan.supports_config(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts,
                                            group_size=group_size, config=config)
    if ok and epilogue != DEFAULT_EPILOGUE:
        ok, reason = False, f"the direct kernel has the default epilogue only, got {epilogue}"
    if not ok:
        raise ValueError(reason)
    return W4A16DirectSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, group_size=group_size,
                           k_warps=config.direct_warps, ring=w4a16_plan.direct_ring(config, num_experts),
                           early_weights=config.early_weights, stream_k=config.stream_k, prefetch=prefetch)
