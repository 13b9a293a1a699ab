"""Device-side routing metadata: group the M = T * K routed rows by expert, without a host sync.

Shape legend: T tokens, E experts, K top-k, M = T * K routed rows (assignment a = t * K + k).
topk_ids [T, K] int32 -> expert_offsets [E + 1] int32, gather_index [M] int32, reverse_index [M] int32,
identical to light_moe.ops.reference.routing_metadata: rows sorted stably by expert, then by a.

The sorted position of assignment a with expert e is
    offsets[e] + #{a' < a : ids[a'] == e}
so the kernel walks the assignments in order, in chunks of one per thread, and keeps a running
count per expert in shared memory. Inside a chunk, a warp finds the lanes holding the same expert
with log2(E) ballots (lanes whose expert bits all agree), which gives each lane its rank among
equal experts in the warp; leaders publish per-warp counts, and a second step scans them across the
16 warps (2-16 adjacent lanes per expert, each summing a few warps, then a shuffle scan). No atomic
decides an order, so the result is exact.

M <= SINGLE_CTA_MAX_ROWS (decode): one CTA, one launch, counts included.
Larger M: two launches. A count kernel writes per-block histograms [E, B] (ROWS_PER_CTA assignments
per block); the scatter kernel's CTA b then sums blocks < b (its base per expert) and all blocks (the
offsets) itself, so no third launch or grid-wide synchronisation is needed.
All sizes derive from T and K (host-known), so the op is CUDA-graph capturable.
"""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import Int32
from cutlass._mlir.dialects import nvvm
from cutlass._mlir.dialects.nvvm import AtomicOpKind, MemOrderKind, MemScopeKind
from cutlass.cute.runtime import make_ptr
from cutlass.cutlass_dsl import T, dsl_user_op

from light_moe.kernels.compile_cache import CompileCache
from light_moe.kernels.launch import await_inputs, current_stream

MAX_EXPERTS = 256
THREADS = 512  # 16 warps: one chunk = 512 assignments
WARPS = THREADS // 32
SINGLE_CTA_MAX_ROWS = 4096  # one CTA, one launch up to this many assignments (8 chunks)
ROWS_PER_CTA = 2048  # multi-CTA mode: assignments per CTA (4 chunks)


def supports(num_experts: int, top_k: int) -> tuple[bool, str]:
    if not 1 <= num_experts <= MAX_EXPERTS:
        return False, f"num_experts={num_experts} outside [1, {MAX_EXPERTS}]"
    if top_k < 1:
        return False, f"top_k={top_k} must be >= 1"
    return True, "ok"


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dsl_user_op
def _atomic_add(ptr, val, scope, *, loc=None, ip=None):
    nvvm.atomicrmw(T.i32(), AtomicOpKind.ADD, ptr.llvm_ptr, Int32(val).ir_value(loc=loc, ip=ip),
                   mem_order=MemOrderKind.RELAXED, syncscope=scope, loc=loc, ip=ip)


@cute.jit
def scan_expert_counts(counts: cute.Tensor, n_exp: cutlass.Constexpr, lane: Int32, starts: cute.Tensor,
                       before: cute.Tensor, add_before: cutlass.Constexpr, offsets: cute.Tensor, store_offsets):
    """One warp's exclusive scan of counts [E] (lane l owns experts l * ceil(E / 32) + j): starts[e] = the
    sum of counts[e' < e] (+ before[e] when add_before); when store_offsets also offsets[e] = that sum and
    offsets[E] = the total. Shared by the scatter kernel and the router's single-CTA metadata."""
    per_lane = (n_exp + 31) // 32
    local = Int32(0)
    for j in cutlass.range_constexpr(per_lane):
        ex = lane * per_lane + j
        if ex < n_exp:
            local += counts[ex]
    inclusive = local
    for s in cutlass.range_constexpr(5):
        other = cute.arch.shuffle_sync_up(inclusive, offset=1 << s, mask_and_clamp=0)
        if lane >= (1 << s):
            inclusive += other
    acc = inclusive - local
    for j in cutlass.range_constexpr(per_lane):
        ex = lane * per_lane + j
        if ex < n_exp:
            if cutlass.const_expr(add_before):
                starts[ex] = acc + before[ex]
            else:
                starts[ex] = acc
            if store_offsets:
                offsets[ex] = acc
            acc += counts[ex]
    if store_offsets and lane == 31:
        offsets[n_exp] = inclusive


class RoutingKernel:
    """Compiled once per (E, K, single_cta); M is a run-time argument."""

    def __init__(self, num_experts: int, top_k: int, single_cta: bool):
        self.num_experts = num_experts
        self.top_k = top_k
        self.single_cta = single_cta
        self.rows_per_cta = SINGLE_CTA_MAX_ROWS if single_cta else ROWS_PER_CTA
        self.bits = max(0, (num_experts - 1).bit_length())  # ballots needed to compare expert ids
        # per-chunk scan: `scan_group` adjacent lanes per expert, each owning `WARPS / scan_group` warps
        self.scan_group = min(WARPS, _pow2_floor(THREADS // num_experts))
        # block prefix (multi-CTA): `sum_group` adjacent lanes per expert, striding over the blocks
        self.sum_group = min(32, _pow2_floor(THREADS // num_experts))

    @cute.jit
    def __call__(self, ids_ptr: cute.Pointer, block_counts_ptr: cute.Pointer, offsets_ptr: cute.Pointer,
                 gather_ptr: cute.Pointer, reverse_ptr: cute.Pointer, n_rows: Int32, stream: cuda.CUstream):
        n_exp = self.num_experts
        ids = cute.make_tensor(ids_ptr, cute.make_layout((n_rows,)))
        offsets = cute.make_tensor(offsets_ptr, cute.make_layout((n_exp + 1,)))
        gather = cute.make_tensor(gather_ptr, cute.make_layout((n_rows,)))
        reverse = cute.make_tensor(reverse_ptr, cute.make_layout((n_rows,)))
        n_blocks = cute.ceil_div(n_rows, self.rows_per_cta)
        # expert-major [E, B]: one expert's block counts are contiguous for the prefix sums
        block_counts = cute.make_tensor(block_counts_ptr, cute.make_layout((n_exp, n_blocks), stride=(n_blocks, 1)))
        if cutlass.const_expr(not self.single_cta):
            self.count_kernel(ids, block_counts, n_rows).launch(
                grid=(n_blocks, 1, 1), block=(THREADS, 1, 1), stream=stream, use_pdl=True)
        self.scatter_kernel(ids, block_counts, offsets, gather, reverse, n_rows, n_blocks).launch(
            grid=(n_blocks, 1, 1), block=(THREADS, 1, 1), stream=stream, use_pdl=True)

    @cute.kernel
    def count_kernel(self, ids: cute.Tensor, block_counts: cute.Tensor, n_rows: Int32):
        """block_counts[:, b] = histogram of the experts of assignments [b * S, (b + 1) * S)."""
        await_inputs()
        n_exp, rows = self.num_experts, self.rows_per_cta
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        hist = cutlass.utils.SmemAllocator().allocate_tensor(Int32, cute.make_layout((n_exp,)), byte_alignment=16)
        for e in range(tidx, n_exp, THREADS):
            hist[e] = Int32(0)
        cute.arch.sync_threads()
        start = bidx * rows
        end = cutlass.min(n_rows, start + rows)
        for a in range(start + tidx, end, THREADS):
            _atomic_add(hist.iterator + ids[a], Int32(1), MemScopeKind.CTA)
        cute.arch.sync_threads()
        for e in range(tidx, n_exp, THREADS):
            block_counts[e, bidx] = hist[e]

    @cute.kernel
    def scatter_kernel(self, ids: cute.Tensor, block_counts: cute.Tensor, offsets: cute.Tensor,
                       gather: cute.Tensor, reverse: cute.Tensor, n_rows: Int32, n_blocks: Int32):
        await_inputs()
        n_exp, k, rows = self.num_experts, self.top_k, self.rows_per_cta
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = cute.arch.lane_idx()

        smem = cutlass.utils.SmemAllocator()
        ids_s = smem.allocate_tensor(Int32, cute.make_layout((rows,)), byte_alignment=16)
        total = smem.allocate_tensor(Int32, cute.make_layout((n_exp,)), byte_alignment=16)
        before = smem.allocate_tensor(Int32, cute.make_layout((n_exp,)), byte_alignment=16)
        running = smem.allocate_tensor(Int32, cute.make_layout((n_exp,)), byte_alignment=16)
        # per chunk: warp_count[w, e] = (chunk << 8) | count of e in warp w (stale tags read as 0),
        # warp_base[w, e] = sorted position of the first row of e in warp w
        warp_count = smem.allocate_tensor(Int32, cute.make_layout((WARPS, n_exp)), byte_alignment=16)
        warp_base = smem.allocate_tensor(Int32, cute.make_layout((WARPS, n_exp)), byte_alignment=16)

        start = bidx * rows
        end = cutlass.min(n_rows, start + rows)
        for e in range(tidx, n_exp, THREADS):
            total[e] = Int32(0)
            before[e] = Int32(0)
        for i in range(tidx, WARPS * n_exp, THREADS):
            warp_count[i % WARPS, i // WARPS] = Int32(-1)
        cute.arch.sync_threads()

        # ---- 1. this CTA's assignments into shared memory; totals and this CTA's base per expert ----
        for a in range(start + tidx, end, THREADS):
            expert = ids[a]
            ids_s[a - start] = expert
            if cutlass.const_expr(self.single_cta):
                _atomic_add(total.iterator + expert, Int32(1), MemScopeKind.CTA)
        if cutlass.const_expr(not self.single_cta):
            # sum_group adjacent lanes per expert stride over the blocks; groups never straddle warps
            group = self.sum_group
            sum_e = tidx // group
            sub = tidx % group
            in_range = sum_e < n_exp
            sum_all = Int32(0)
            sum_before = Int32(0)
            if in_range:
                for b in cutlass.range(sub, n_blocks, group, unroll=4):
                    c = block_counts[sum_e, b]
                    sum_all += c
                    sum_before += c if b < bidx else Int32(0)
            for s in cutlass.range_constexpr(group.bit_length() - 1):
                sum_all += cute.arch.shuffle_sync_bfly(sum_all, offset=1 << s)
                sum_before += cute.arch.shuffle_sync_bfly(sum_before, offset=1 << s)
            if in_range and sub == 0:
                total[sum_e] = sum_all
                before[sum_e] = sum_before
        cute.arch.sync_threads()

        # ---- 2. warp 0: exclusive scan of totals -> offsets; running = offsets + this CTA's base ----
        if warp == 0:
            scan_expert_counts(total, n_exp, lane, running, before, True, offsets, bidx == 0)
        cute.arch.sync_threads()

        # ---- 3. chunks of THREADS assignments, in order ----
        lanes_below = (Int32(1) << lane) - 1
        per_thread = WARPS // self.scan_group  # warps whose counts one scan lane owns
        scan_e = tidx // self.scan_group
        scan_sub = tidx % self.scan_group
        scan_valid = scan_e < n_exp
        counts = cute.make_rmem_tensor((per_thread,), Int32)
        n_chunks = cute.ceil_div(end - start, THREADS)
        for chunk in range(n_chunks):
            a = start + chunk * THREADS + tidx
            valid = a < end
            expert = Int32(0)
            if valid:
                expert = ids_s[a - start]
            peers = cute.arch.vote_ballot_sync(valid)
            for bit in cutlass.range_constexpr(self.bits):
                b = (expert >> bit) & 1
                ballot = cute.arch.vote_ballot_sync(b == 1)
                peers = peers & (ballot ^ (b - 1))  # b = 1: ballot, b = 0: ~ballot
            rank = cute.arch.popc(peers & lanes_below)
            if valid and rank == 0:
                warp_count[warp, expert] = (chunk << 8) | cute.arch.popc(peers)
            cute.arch.sync_threads()
            # scan: lanes (scan_e, scan_sub) own warps scan_sub * (WARPS // self.scan_group) + i of expert scan_e
            own = Int32(0)
            for i in cutlass.range_constexpr(WARPS // self.scan_group):
                c = Int32(0)
                if scan_valid:
                    tagged = warp_count[scan_sub * (WARPS // self.scan_group) + i, scan_e]
                    if (tagged >> 8) == chunk:
                        c = tagged & 0xFF
                counts[i] = c
                own += c
            inclusive = own
            for s in cutlass.range_constexpr(self.scan_group.bit_length() - 1):
                other = cute.arch.shuffle_sync_up(inclusive, offset=1 << s, mask_and_clamp=0)
                if scan_sub >= (1 << s):
                    inclusive += other
            base = Int32(0)
            if scan_valid:
                base = running[scan_e]
            base = cute.arch.shuffle_sync(base, lane - scan_sub)  # the group's first lane
            pos = base + inclusive - own
            for i in cutlass.range_constexpr(WARPS // self.scan_group):
                if counts[i] > 0:
                    warp_base[scan_sub * (WARPS // self.scan_group) + i, scan_e] = pos
                pos += counts[i]
            if scan_valid and scan_sub == self.scan_group - 1:
                running[scan_e] = base + inclusive
            cute.arch.sync_threads()
            if valid:
                pos = warp_base[warp, expert] + rank
                reverse[a] = pos
                gather[pos] = a // k


_compiled = CompileCache("routing")  # (E, K, single_cta) -> compiled function; never keyed on M



def make_compile_args(num_experts: int, top_k: int, single_cta: bool, stream=None):
    """(jit function, arguments) for cute.compile with placeholder pointers; M is dynamic."""
    gmem = cute.AddressSpace.gmem
    ptrs = tuple(make_ptr(Int32, 16, gmem, assumed_align=4) for _ in range(5))
    return RoutingKernel(num_experts, top_k, single_cta), (*ptrs, Int32(1), stream)


def compiled_routing(num_experts: int, top_k: int, single_cta: bool):
    key = (num_experts, top_k, single_cta)
    return _compiled.get(key, lambda: make_compile_args(num_experts, top_k, single_cta, current_stream()))


def workspace_size(num_rows: int, num_experts: int) -> int:
    """int32 elements of scratch the multi-CTA path needs (0 in single-CTA mode)."""
    if num_rows <= SINGLE_CTA_MAX_ROWS:
        return 0
    return -(-num_rows // ROWS_PER_CTA) * num_experts


def routing_metadata_into(topk_ids: torch.Tensor, num_experts: int, expert_offsets: torch.Tensor,
                          gather_index: torch.Tensor, reverse_index: torch.Tensor,
                          workspace: torch.Tensor | None = None) -> None:
    """Writes expert_offsets [E + 1], gather_index [M], reverse_index [M] (int32) on the current stream.
    topk_ids must hold ids in [0, E). workspace: int32 of workspace_size(M, E) elements, allocated here
    when None."""
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous():
        raise ValueError(f"topk_ids must be a contiguous [T, K] int32 tensor, got {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype}")
    num_tokens, top_k = topk_ids.shape
    ok, reason = supports(num_experts, top_k)
    if not ok:
        raise ValueError(f"routing_metadata kernel: {reason}")
    num_rows = num_tokens * top_k
    for name, t, n in (("expert_offsets", expert_offsets, num_experts + 1), ("gather_index", gather_index, num_rows),
                       ("reverse_index", reverse_index, num_rows)):
        if t.shape != (n,) or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{n}] int32 tensor, got {tuple(t.shape)} {t.dtype}")
    if num_rows == 0:
        expert_offsets.zero_()
        return
    single = num_rows <= SINGLE_CTA_MAX_ROWS
    need = workspace_size(num_rows, num_experts)
    if workspace is None:
        workspace = torch.empty(max(need, 1), dtype=torch.int32, device=topk_ids.device)
    elif workspace.numel() < need or workspace.dtype != torch.int32:
        raise ValueError(f"workspace must hold {need} int32 elements")
    fn = compiled_routing(num_experts, top_k, single)
    gmem = cute.AddressSpace.gmem
    fn(*(make_ptr(Int32, t.data_ptr(), gmem, assumed_align=4)
         for t in (topk_ids, workspace, expert_offsets, gather_index, reverse_index)),
       Int32(num_rows), current_stream())


def routing_metadata(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as light_moe.ops.reference.routing_metadata: (expert_offsets [E + 1],
    gather_index [M], reverse_index [M]), int32."""
    if topk_ids.dim() == 1:  # the reference treats a flat id vector as top_k = 1
        topk_ids = topk_ids.view(-1, 1)
    num_rows = topk_ids.numel()
    device = topk_ids.device
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    gather_index = torch.empty(num_rows, dtype=torch.int32, device=device)
    reverse_index = torch.empty(num_rows, dtype=torch.int32, device=device)
    routing_metadata_into(topk_ids.to(torch.int32).contiguous(), num_experts, expert_offsets, gather_index,
                          reverse_index)
    return expert_offsets, gather_index, reverse_index
