"""W4A16 experts at decode in ONE persistent launch: the up and the down projection of the direct kernel
(w4a16_direct.py) as one list of units taken in order from a global ticket counter (sm_90a, CuTe DSL 4.3.5).

Shape legend: T tokens, E experts, H hidden, I intermediate, M routed rows sorted by expert, KW warps per CTA,
U up units (expert, 64-row atom of the 2I gate/up rows, 8 routed rows), D down units (the same over the H rows).

    w4a16_fused_experts(x [T, H], gather_index [M], expert_offsets [E+1], w13 prepared, w2 prepared)
        -> act [M, I] = SiLU(gate) * up (also an output: the down units read it), y [M, H] (sorted rows)

Why: at B = 1 each of the two weight-streaming GEMMs of a layer is a ~30-50 us kernel, and Nsight shows both at
74-76% of the DRAM peak against 82-88% for the same per-unit code in longer launches: ramp and drain per launch
(docs/kernels.md, "Why stream-K lost"). One launch pays them once, and CTAs that finish their up units early move
on to down units instead of leaving the SM to the next kernel's prologue.

  * Units: tickets 0 .. U-1 are the up units (expert-major, as the direct kernel's tile list), U .. U+D-1 the
    down units (expert-major). Every CTA takes tickets from one global counter (atomic add), so tickets are taken
    in order: a CTA holding a down ticket knows every up ticket is held by a CTA that can finish it without
    waiting (its earlier tickets are up units too), whatever the CTA residency; no deadlock.
  * Dependency: a down unit of expert e reads e's act rows, complete when all ceil(rows_e / 8) * 2I / 64 up units
    of e have stored them: after an up unit's stores and a CTA barrier, thread 0 adds 1 to done[e] (acq_rel); a
    warp about to load a down unit's act rows spins (lane 0, ld.acquire) until done[e] is complete, then bar.warp.
    sync; the act rows come by cp.async.cg (L2: another SM wrote them during this launch).
  * Tickets two ahead: thread 0 draws the ticket of unit n + 2 when unit n starts and publishes it in shared
    memory before unit n's end-of-unit barrier, so that each warp's load cursor (ring - 1 k-tiles ahead of its
    compute, fewer than a unit's k-tiles) finds the next unit's ticket when it crosses into it.
  * The load cursor never waits on a dependency while its own CTA still computes an up unit (the up unit's
    completion might be what the wait needs): crossing from an up unit into a down unit, it stops issuing; the
    compute issues the down unit's first ring - 1 k-tiles itself when it gets there, after the wait (one ring
    refill per CTA). Crossing from a down unit into a down unit it may wait: down units complete nothing.
  * The last CTA to finish (an exit counter) sets the ticket, exit and done counters back to zero, so every launch
    and CUDA-graph replay starts from zeros (the workspace is made zeroed once per device).
  * Per unit, the k-tile step, the epilogue and the partial sums are the direct kernel's (its compute, finish_unit);
    the up and the down projection each keep their KW warps' contiguous K ranges (the same KW for both).

Limits (supports): the direct kernel's (g in {64, 128}, KW splits both H and I into whole groups), the default
epilogue (SiLU * up, no bias), whole units (no stream-K). Opt-in (EngineConfig.w4a16_fused_decode), written without
a GPU: docs/kernels.md, "Fused up + down decode kernel".
"""
from __future__ import annotations

import functools

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import torch
from cutlass import Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cute.runtime import from_dlpack
from cutlass.cutlass_dsl import dsl_user_op

from light_moe.kernels import gemm_host, w4a16_plan
from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.decode_attention import arrive_acq_rel
from light_moe.kernels.gemm_pipeline import build_tile_schedule, locate_tile
from light_moe.kernels.launch import await_inputs, current_stream, sm_count
from light_moe.kernels.tile_config import DIRECT_WARPS, W4A16_TILE_TABLE, TileConfig
from light_moe.kernels.w4a16_direct import (
    WARP,
    W4A16DirectSm90,
    cp_async_16,
    sync_warp,
    token_slot_offset,
)
from light_moe.kernels.w4a16_layout import ATOM_M, TILE_K, check_prepared
from light_moe.kernels.w4a16_plan import ATOM_BYTES, CTAS_PER_SM, PART_BYTES_PER_WARP, SLOT_BYTES, TOKENS

TICKETS = 4  # shared-memory ring of drawn tickets (units n .. n + 2 are live at once)
# the workspace's int32 counters: [ticket, exit, done[0] .. done[E - 1]]
TICKET, EXIT, DONE = 0, 1, 2


@dsl_user_op
def ld_acquire(addr: Int64, *, loc=None, ip=None) -> Int32:
    """ld.acquire.gpu of an int32 in global memory: what was written before the matching release is visible after."""
    return Int32(llvm.inline_asm(cutlass.cutlass_dsl.T.i32(), [Int64(addr).ir_value(loc=loc, ip=ip)],
                                 "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", has_side_effects=True,
                                 is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def nanosleep(ns: int, *, loc=None, ip=None) -> None:
    """nanosleep.u32: suspend the warp for about ns nanoseconds (a polling loop's back-off)."""
    llvm.inline_asm(None, [], f"nanosleep.u32 {int(ns)};", "", has_side_effects=True, is_align_stack=False,
                    asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


def fused_counters(num_experts: int) -> int:
    """int32 counters of the workspace: the ticket, the exit count, one done count per expert."""
    return DONE + num_experts


class W4A16FusedDecodeSm90:
    """act, y of the routed experts at decode, one launch (module docstring). Arguments: the up and the down
    projection's prepared weights as 16-byte chunk views (qweight, meta each), x, gather_index, expert_offsets, act,
    y, the SM count, the stream, the zeroed int32 counters (fused_counters)."""

    def __init__(self, *, hidden: int, inter: int, num_experts: int, group_size: int, k_warps: int, ring: int):
        common = dict(num_experts=num_experts, group_size=group_size, k_warps=k_warps, ring=ring,
                      early_weights=False, stream_k=False)
        # the two projections' constants and per-unit device code (load cursor, epilogue) come from the direct kernel
        self.up = W4A16DirectSm90(gated=True, n_out=2 * inter, k_dim=hidden, **common)
        self.down = W4A16DirectSm90(gated=False, n_out=hidden, k_dim=inter, **common)
        self.num_experts = num_experts
        self.k_warps = k_warps
        self.threads = WARP * k_warps
        self.ring = ring
        self.gk = group_size // TILE_K
        if self.up.kpw < ring or self.down.kpw < ring:
            raise ValueError(f"the load cursor must stay within the next unit: k-tiles per warp "
                             f"({self.up.kpw}, {self.down.kpw}) below the ring ({ring})")

    @cute.jit
    def __call__(self, q13: cute.Tensor, m13: cute.Tensor, q2: cute.Tensor, m2: cute.Tensor, x: cute.Tensor,
                 gather_index: cute.Tensor, expert_offsets: cute.Tensor, act: cute.Tensor, y: cute.Tensor,
                 num_ctas: Int32, stream: cuda.CUstream, counters: cute.Tensor):
        @cute.struct
        class SharedStorage:
            rows_up: cute.struct.MemRange[Int32, self.num_experts + 1]
            prefix_up: cute.struct.MemRange[Int32, self.num_experts + 1]
            rows_down: cute.struct.MemRange[Int32, self.num_experts + 1]
            prefix_down: cute.struct.MemRange[Int32, self.num_experts + 1]
            tickets: cute.struct.MemRange[Int32, TICKETS]
            part: cute.struct.Align[cute.struct.MemRange[Float32, 2 * self.k_warps * PART_BYTES_PER_WARP // 4], 16]
            ring: cute.struct.Align[cute.struct.MemRange[Int32, self.k_warps * self.ring * SLOT_BYTES // 4], 128]

        self.shared_storage = SharedStorage
        self.kernel(q13, m13, q2, m2, x, gather_index, expert_offsets, act, y, counters).launch(
            grid=(num_ctas * CTAS_PER_SM, 1, 1),
            block=(self.threads, 1, 1),
            min_blocks_per_mp=CTAS_PER_SM,
            stream=stream,
            use_pdl=True,
        )

    # ---- the load cursor: (ordinal n of the CTA's unit, ticket, k-tile j of the warp's range, down?, expert,
    # int4 / meta / token addresses, token rows present, pending: a down unit whose loads the compute issues) ----
    @cute.jit
    def open_unit(self, ticket: Int32, e: Int32, was_down: Int32, lane: Int32, warp: Int32, ctx, may_wait: Int32):
        """The cursor enters unit `ticket` (< total): (down, e, addresses..., pending). A down unit first waits for
        its expert's up units where may_wait (else it is left pending); e is the search hint of the unit's
        projection (reset when the projection changes)."""
        n_up, total, s_up, p_up, s_dn, p_dn, gather_index, bases, done_base = ctx
        q13_b, m13_b, x_b, q2_b, m2_b, act_b = bases
        down = Int32(ticket >= n_up)
        if down != was_down:
            e = Int32(0)
        pending = Int32(0)
        q_ptr, m_ptr, t0, t1, has0, has1 = q13_b, m13_b, x_b, x_b, Int32(0), Int32(0)
        if down == 0:
            e, q_ptr, m_ptr, t0, t1, has0, has1 = self.up.load_cursor(
                ticket, e, lane, warp * self.up.kpw, s_up, p_up, gather_index, q13_b, m13_b, x_b)
        else:
            e, rows_lo, rows_hi, atom, row_start = locate_tile(ticket - n_up, e, s_dn, p_dn, TOKENS)
            if may_wait != 0:
                self.wait_up_done(e, s_dn, lane, done_base)
                e, q_ptr, m_ptr, t0, t1, has0, has1 = self.down.load_cursor(
                    ticket - n_up, e, lane, warp * self.down.kpw, s_dn, p_dn, gather_index, q2_b, m2_b, act_b)
            else:
                pending = Int32(1)
        return down, e, q_ptr, m_ptr, t0, t1, has0, has1, pending

    @cute.jit
    def wait_up_done(self, e: Int32, s_rows: cute.Tensor, lane: Int32, done_base: Int64):
        """Lane 0 spins until every up unit of expert e has stored its act rows; then the warp goes on together."""
        need = (s_rows[e + 1] - s_rows[e] + TOKENS - 1) // TOKENS * self.up.n_atoms
        if lane == 0:
            seen = ld_acquire(done_base + Int64(e) * 4)
            while seen < need:
                nanosleep(64)  # back off: up to every warp of the grid may poll these few words in L2
                seen = ld_acquire(done_base + Int64(e) * 4)
        sync_warp()

    @cute.jit
    def issue_and_advance(self, slot: Int32, cur, s_tickets: cute.Tensor, lane: Int32, warp: Int32, ctx,
                          pos: cutlass.Constexpr):
        """The cursor's k-tile into `slot`: int4 and (a group's first k-tile) meta, then the token rows (cp.async.cg:
        a down unit's act rows were written by other SMs in this launch); then one step on with its projection's
        strides; after its unit's last k-tile, into the CTA's next ticket (from shared memory), opened at once,
        except from an up unit into a down unit: that one is left pending (the compute opens it). pos: the k-tile's
        place in its group. cur and the result: the cursor state (kernel)."""
        n, ticket, j, down, e, q_ptr, m_ptr, t0, t1, has0, has1, pending = cur
        self.up.issue_weights(slot, q_ptr, m_ptr, lane, pos == 0)  # the slot layout is the projections' common one
        chunk = lane % 8
        tok0 = lane // 8
        if has0 != 0:
            cp_async_16(slot + token_slot_offset(tok0, chunk), t0, False)
        if has1 != 0:
            cp_async_16(slot + token_slot_offset(tok0 + 4, chunk), t1, False)
        kpw = self.up.kpw
        q_stride = self.up.n_atoms * ATOM_BYTES
        m_stride = self.up.n_out * 4
        if down != 0:
            kpw = self.down.kpw
            q_stride = self.down.n_atoms * ATOM_BYTES
            m_stride = self.down.n_out * 4
        q_ptr = q_ptr + Int64(q_stride)  # one k-tile further in the prepared int4 of an atom
        t0 = t0 + TILE_K * 2
        t1 = t1 + TILE_K * 2
        if cutlass.const_expr(pos == self.gk - 1):
            m_ptr = m_ptr + Int64(m_stride)  # one group further in meta
        j = j + 1
        if j == kpw:
            n = n + 1
            j = Int32(0)
            ticket = s_tickets[n % TICKETS]
            if ticket < ctx[1]:
                down, e, q_ptr, m_ptr, t0, t1, has0, has1, pending = self.open_unit(ticket, e, down, lane, warp, ctx,
                                                                                     down)
        return n, ticket, j, down, e, q_ptr, m_ptr, t0, t1, has0, has1, pending

    @cute.kernel
    def kernel(self, q13: cute.Tensor, m13: cute.Tensor, q2: cute.Tensor, m2: cute.Tensor, x: cute.Tensor,
               gather_index: cute.Tensor, expert_offsets: cute.Tensor, act: cute.Tensor, y: cute.Tensor,
               counters: cute.Tensor):
        n_exp = self.num_experts
        ring = self.ring
        gk = self.gk
        tidx, _, _ = cute.arch.thread_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()
        storage = utils.SmemAllocator().allocate(self.shared_storage)
        s_up = storage.rows_up.get_tensor(cute.make_layout(n_exp + 1))
        p_up = storage.prefix_up.get_tensor(cute.make_layout(n_exp + 1))
        s_dn = storage.rows_down.get_tensor(cute.make_layout(n_exp + 1))
        p_dn = storage.prefix_down.get_tensor(cute.make_layout(n_exp + 1))
        s_tickets = storage.tickets.get_tensor(cute.make_layout(TICKETS))
        await_inputs()  # expert_offsets, gather_index, x: the router's and the norm's outputs
        if warp == 0:
            build_tile_schedule(expert_offsets, s_up, p_up, lane, n_exp, TOKENS, self.up.n_atoms)
        if warp == 1:
            build_tile_schedule(expert_offsets, s_dn, p_dn, lane, n_exp, TOKENS, self.down.n_atoms)
        ticket_ptr = counters.iterator + TICKET
        if tidx == self.threads - 1:  # the last lane draws the first two tickets (warps 0 and 1 build the lists)
            s_tickets[0] = arrive_acq_rel(ticket_ptr)
            s_tickets[1] = arrive_acq_rel(ticket_ptr)
        cute.arch.sync_threads()

        n_up = p_up[n_exp]
        total = n_up + p_dn[n_exp]
        c_base = counters.iterator.toint()
        done_base = c_base + DONE * 4
        bases = (q13.iterator.toint(), m13.iterator.toint(), x.iterator.toint(), q2.iterator.toint(),
                 m2.iterator.toint(), act.iterator.toint())
        ctx = (n_up, total, s_up, p_up, s_dn, p_dn, gather_index, bases, done_base)
        ring_base = storage.ring.data_ptr().toint() + warp * (ring * SLOT_BYTES)
        part_base = storage.part.data_ptr().toint()
        act_out = act.iterator.toint()
        y_out = y.iterator.toint()

        # the cursor starts at the CTA's first unit (it may wait there: the CTA computes nothing yet); its state:
        # ordinal, ticket, k-tile of the warp's range, down?, expert, int4 / meta / token addresses, token rows
        # present, pending (a down unit whose loads the compute issues)
        first = s_tickets[0]
        l_n, l_t, l_j = Int32(0), first, Int32(0)
        l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend = (Int32(0), Int32(0), bases[0], bases[1], bases[2],
                                                               bases[2], Int32(0), Int32(0), Int32(0))
        if first < total:
            l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend = self.open_unit(first, Int32(0), Int32(0), lane,
                                                                                  warp, ctx, Int32(1))
        for d in cutlass.range_constexpr(ring - 1):  # prologue: steps 0 .. ring - 2, one cp.async group each
            if l_t < total and l_pend == 0:
                l_n, l_t, l_j, l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend = self.issue_and_advance(
                    ring_base + d * SLOT_BYTES, (l_n, l_t, l_j, l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend),
                    s_tickets, lane, warp, ctx, d % gk)
            cute.arch.cp_async_commit_group()

        regs = self.up.step_registers()
        acc = regs[0]
        parity = Int32(0)
        slot_c = Int32(0)  # ring slot of the step computed next; step s + ring - 1 loads into the slot before it
        c_n = Int32(0)
        c_unit = first
        e_up = Int32(0)
        e_dn = Int32(0)
        while c_unit < total:
            c_down = Int32(c_unit >= n_up)
            t_next = Int32(0)
            if tidx == 0:  # the ticket of unit c_n + 2, published before this unit's end-of-unit barrier
                t_next = arrive_acq_rel(ticket_ptr)
            if l_t == c_unit and l_pend != 0:
                # the cursor stopped at this down unit (it came from an up unit): wait for its expert here, then
                # issue its first ring - 1 k-tiles into the next slots, one group each
                l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend = self.open_unit(l_t, Int32(0), Int32(0), lane,
                                                                                      warp, ctx, Int32(1))
                sync_warp()  # every lane has read the slots these copies overwrite
                for d in cutlass.range_constexpr(ring - 1):
                    slot_p = slot_c + d
                    if slot_p >= ring:
                        slot_p = slot_p - ring
                    if l_t < total and l_pend == 0:
                        l_n, l_t, l_j, l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend = self.issue_and_advance(
                            ring_base + slot_p * SLOT_BYTES,
                            (l_n, l_t, l_j, l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend), s_tickets, lane,
                            warp, ctx, d % gk)
                    cute.arch.cp_async_commit_group()
            steps = self.up.kpw // gk
            if c_down != 0:
                steps = self.down.kpw // gk
            for _sp in range(steps):
                for h in cutlass.range_constexpr(gk):
                    sync_warp()  # every lane has read the slot the next copies overwrite (computed one step ago)
                    if l_t < total and l_pend == 0:
                        l_n, l_t, l_j, l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend = self.issue_and_advance(
                            ring_base + self.up.previous_slot(slot_c) * SLOT_BYTES,
                            (l_n, l_t, l_j, l_dn, l_e, l_q, l_m, l_t0, l_t1, l_h0, l_h1, l_pend), s_tickets, lane,
                            warp, ctx, (h + ring - 1) % gk)
                    slot_c = self.up.compute_step(ring_base, slot_c, lane, regs, h == 0, h == gk - 1)
            if tidx == 0:
                s_tickets[(c_n + 2) % TICKETS] = t_next
            part = part_base + parity * (self.k_warps * PART_BYTES_PER_WARP)
            if c_down != 0:
                e_dn, atom, row, n_valid = self.down.unit_rows(c_unit - n_up, e_dn, s_dn, p_dn)
                self.down.finish_unit(acc, part, warp, lane, tidx, atom, row, n_valid, y_out)
            else:
                e_up, atom, row, n_valid = self.up.unit_rows(c_unit, e_up, s_up, p_up)
                self.up.finish_unit(acc, part, warp, lane, tidx, atom, row, n_valid, act_out)
                cute.arch.sync_threads()  # every thread's act stores precede thread 0's release
                if tidx == 0:
                    arrive_acq_rel(counters.iterator + DONE + e_up)
            parity = parity ^ 1
            c_n = c_n + 1
            c_unit = s_tickets[c_n % TICKETS]

        cute.arch.sync_threads()  # no thread of this CTA reads a counter any more
        if tidx == 0:
            if arrive_acq_rel(counters.iterator + EXIT) == gdim - 1:  # the last CTA: zeros for the next launch
                counters[TICKET] = Int32(0)
                counters[EXIT] = Int32(0)
                for e in range(n_exp):
                    counters[DONE + e] = Int32(0)


def supports(*, hidden: int, inter: int, num_experts: int, group_size: int, config: TileConfig) -> tuple[bool, str]:
    """(ok, reason): the fused kernel takes a layer whose both projections the direct tile `config` takes."""
    if not config.direct_warps or config.stream_k:
        return False, f"the fused decode kernel runs the direct kernel's whole units, got {config}"
    for gated, n_out, k_dim in ((True, 2 * inter, hidden), (False, hidden, inter)):
        ok, reason = w4a16_plan.supports_config(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts,
                                                group_size=group_size, config=config)
        if not ok:
            return False, reason
    if fused_ring(hidden, inter, num_experts, config) < 2:
        return False, f"{config} leaves fewer than 2 ring slots per warp within a unit's k-tiles"
    return True, "ok"


def fused_ring(hidden: int, inter: int, num_experts: int, config: TileConfig) -> int:
    """The direct kernel's ring, at most the k-tiles of a warp's range in a unit (the load cursor, ring - 1 k-tiles
    ahead, then enters the next unit only once the compute is in the current one: its ticket is published)."""
    return min(w4a16_plan.direct_ring(config, num_experts), min(hidden, inter) // TILE_K // config.direct_warps)


def fused_config(num_rows: int, w13, w2) -> TileConfig | None:
    """The fused kernel's tile for a step of num_rows routed rows over w13 / w2 (W4A16Weights), from host-known
    sizes only (graph-safe): where the tile table's decode row holds (W4A16_TILE_TABLE[0]: a few rows per active
    expert), the direct tile with the most warps that split both projections' K into whole groups; else None (a
    prefill-sized step: the grouped GEMM's tiles). No wave rule: the down units queue behind the up units."""
    return _fused_config(num_rows, w13.num_experts, w13.k_dim, w2.k_dim, w13.group_size)


@functools.lru_cache(maxsize=1024)
def _fused_config(num_rows: int, num_experts: int, hidden: int, inter: int, group_size: int) -> TileConfig | None:
    """fused_config on sizes alone: asked once per MoE layer call, so remembered (a handful of keys per model)."""
    if num_rows / max(1, min(num_experts, num_rows)) > W4A16_TILE_TABLE[0].max_rows_per_expert:
        return None
    for warps in sorted(DIRECT_WARPS, reverse=True):
        config = TileConfig(ATOM_M, TOKENS, direct_warps=warps)
        if supports(hidden=hidden, inter=inter, num_experts=num_experts, group_size=group_size, config=config)[0]:
            return config
    return None


_compiled = CompileCache("w4a16_fused")  # (H, I, E, g, tile config); never T


def w4a16_fused_experts(x: torch.Tensor, gather_index: torch.Tensor, expert_offsets: torch.Tensor, w13, w2,
                        act: torch.Tensor | None = None, y: torch.Tensor | None = None,
                        config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(act [M, I], y [M, H]) of the routed experts, up and down in one launch (module docstring): x [T, H] bf16,
    gather_index [M] and expert_offsets [E + 1] int32, w13 / w2 from prepare_w4a16_weights (gated / not); config:
    fused_config's (raises where there is none). No host sync, graph-capturable; the same values as
    w4a16_expert_up then w4a16_expert_down on the direct tile (the same per-unit code and summation order)."""
    from light_moe.kernels import w4a16_gemm

    check_prepared("w13", w13, gated=True)
    check_prepared("w2", w2, gated=False)
    num_experts, hidden, inter = w13.num_experts, w13.k_dim, w2.k_dim
    if (w2.num_experts, w2.n_out, w13.n_out, w2.group_size) != (num_experts, hidden, 2 * inter, w13.group_size):
        raise ValueError(f"w13 {w13.shape} (g {w13.group_size}) and w2 {w2.shape} (g {w2.group_size}) are not one "
                         "layer's experts")
    act = gemm_host.up_out(x, gather_index, expert_offsets, num_experts, hidden, inter, act)
    y = gemm_host.down_out(act, expert_offsets, num_experts, inter, hidden, y)
    if act.shape[0] == 0:
        return act, y
    if config is None:
        config = fused_config(act.shape[0], w13, w2)
        if config is None:
            raise ValueError(f"no fused decode tile for {act.shape[0]} routed rows over {num_experts} experts "
                             f"(H {hidden}, I {inter}, g {w13.group_size})")
    key = (hidden, inter, num_experts, w13.group_size, config)
    offsets_view = from_dlpack(expert_offsets.contiguous(), assumed_align=4)
    args = (*w4a16_gemm.weight_views(w13), *w4a16_gemm.weight_views(w2), gemm_host.rows_view(x),
            gemm_host.rows_view(gather_index.contiguous(), 4), offsets_view, gemm_host.rows_view(act),
            gemm_host.rows_view(y), sm_count(x.device), current_stream(), fused_workspace(x.device, num_experts))
    _compiled.get(key, lambda: (make_fused_kernel(hidden, inter, num_experts, w13.group_size, config), args))(*args)
    return act, y


_workspaces: dict = {}  # device -> (int32 counters, cute view), zeros between launches


MAX_EXPERTS = 1024  # the grouped GEMMs' limit; the counters are sized for it once (4 KB), so they never move


def fused_workspace(device, num_experts: int):
    """The kernel's counters on `device` (fused_counters(MAX_EXPERTS) int32 zeros, left zero by every launch; one set
    per device, as launches on it are serialised), made on first use, not inside CUDA graph capture (direct_workspace
    says why)."""
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"the fused W4A16 kernel takes at most {MAX_EXPERTS} experts, got {num_experts}")
    entry = _workspaces.get(device)
    if entry is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the fused W4A16 kernel's counters on {device} were first needed inside CUDA graph "
                               "capture; run the experts once outside capture first")
        counters = torch.zeros(fused_counters(MAX_EXPERTS), dtype=torch.int32, device=device)
        entry = _workspaces[device] = (counters, from_dlpack(counters, assumed_align=4))
    return entry[1]


def make_fused_kernel(hidden: int, inter: int, num_experts: int, group_size: int,
                      config: TileConfig) -> W4A16FusedDecodeSm90:
    ok, reason = supports(hidden=hidden, inter=inter, num_experts=num_experts, group_size=group_size, config=config)
    if not ok:
        raise ValueError(reason)
    return W4A16FusedDecodeSm90(hidden=hidden, inter=inter, num_experts=num_experts, group_size=group_size,
                                k_warps=config.direct_warps, ring=fused_ring(hidden, inter, num_experts, config))


__all__ = ["W4A16FusedDecodeSm90", "fused_config", "fused_workspace", "make_fused_kernel", "supports",
           "w4a16_fused_experts"]
