"""Moving routed tokens to the ranks that own their experts and the results back.

Shape legend: T tokens on this rank, K top-k, H hidden, M = T * K routed rows (assignments)
sent by this rank, R rows received for this rank's experts, N ranks, E experts.

The MoE block does  routed = dispatch(x, w, ids) -> ops.experts(routed...) -> combine(y, routed):
communication stays here, the expert math stays in the MoEOps backend, so kernels and expert
parallelism combine without knowing of each other.

LocalDispatcher (one process) hands the inputs through untouched, so the single-process path
runs exactly the ops it ran before expert parallelism existed.

AllToAllDispatcher, per MoE layer and step (every rank, even with T = 0, joins all three
collectives, in the same order, because every rank runs every MoE layer):
  1. each assignment (t, k) goes to rank expert_to_rank[topk_ids[t, k]]; assignments are sorted
     stably by destination, so each rank's rows are contiguous (send order = `order`)
  2. all_to_all of the per-rank row counts [N] (each rank learns how much it will receive),
     then one all_to_all_single of the rows [M, H], each packed with its local expert id (the
     layout of the fixed path below), with those variable splits
  3. the owner runs its local experts on the R received rows as top-1 routing with weight 1.0
     (exact: the router weights are applied at home)
  4. all_to_all_single sends the [R, H] results back along the reversed splits; they arrive in
     send order, so reverse_index = inverse(order) lets the backend's combine sum
     w[t, k] * y[t, k] over k in slot order, as the single-process path does.
Copies of hot experts (placement.replicated): an assignment to an expert with c holders goes to
one of them round-robin (see AllToAllDispatcher); the tables [E, C] map (expert, copy) to the rank
and the local id there. Without copies (C = 1) the route is the plain table lookup.
set_placement() swaps the tables when the engine rebalances (parallel/balancer.py); the phases
(route, exchange_counts, send_rows, send_back, finish) are public so that parallel/overlap.py can
interleave two micro-batches.
Fixed-capacity mode (small, decode-sized steps; `capacity` > 0, set per step from the StepPlan):
every rank sends exactly C rows to every rank in ONE all_to_all_single of equal splits. Each row is
packed as bytes: the hidden row, then its destination-local expert id as int32 (-1: padding).
No counts exchange, no host read of any device value (no split sizes), so decode steps are captured
in CUDA graphs (executor/cuda_graphs.py; `dry_run` lets a capturing rank warm up without
collectives). With a PeerExchange (`peer`, parallel/p2p_exchange.py; ep_exchange="p2p") the two
equal-split exchanges go over NVLink through symmetric memory instead of NCCL: the same bytes in the same
places, so packing and unpacking are shared. Padding rows get the local id E_local and
MoEOps.experts(padded=True) skips them, so every real expert sees exactly the rows, in exactly the order,
of the variable-split path (bit-identical results). The results return by the same fixed exchange in reverse.
A token whose K experts share a rank is sent K times (no per-rank de-duplication yet: with K=8 of
128 experts on 8 ranks that costs up to ~K/N-fold extra traffic; see docs/expert_parallel.md).
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from light_moe.parallel.p2p_exchange import COMBINE, DISPATCH, PeerExchange
from light_moe.parallel.placement import ExpertPlacement


class Routed(NamedTuple):
    """Rows for this rank's experts, in the form MoEOps.experts takes, plus what combine needs."""

    x: torch.Tensor  # [R, H]
    topk_weights: torch.Tensor  # [R, K'] float32
    topk_ids: torch.Tensor  # [R, K'] int32, local expert ids
    handle: Any = None
    padded: bool = False  # fixed-capacity exchange: rows with id == E_local are padding (experts skip them)


class LocalDispatcher:
    """One process holds every expert: dispatch and combine are the identity."""

    local_experts: tuple[int, ...] | None = None  # None: all experts

    def dispatch(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Routed:
        return Routed(x, topk_weights, topk_ids)

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        return y


class _Exchange(NamedTuple):
    order: torch.Tensor  # [M] assignment ids in send order
    send_splits: list[int]  # [N]
    recv_splits: list[int]  # [N]
    topk_weights: torch.Tensor  # [T, K]


class _Route(NamedTuple):
    """Where this rank's assignments go (device tensors; no host sync yet)."""

    order: torch.Tensor  # [M] assignment ids sorted by destination rank
    token_of_row: torch.Tensor  # [M] token of each row in send order
    local_ids: torch.Tensor  # [M] expert id on the destination rank, send order
    send_counts: torch.Tensor  # [N]


class _FixedExchange(NamedTuple):
    """Fixed-capacity exchange: where this rank's M sent rows sit in the [N * C] send buffer."""

    reverse_index: torch.Tensor  # [M] buffer position (= position in the returned buffer) of assignment t * K + k
    topk_weights: torch.Tensor  # [T, K]


def _counts(values: torch.Tensor, size: int) -> torch.Tensor:
    """bincount without a host sync (torch.bincount on CUDA reads the max on the host)."""
    return torch.zeros(size, dtype=torch.long, device=values.device).scatter_add_(0, values, torch.ones_like(values))


class ExchangeTiming:
    """Wall time of the expert exchange on this rank (bench ep). Synchronises the device around each
    exchange, so it is a measurement mode, never on while serving."""

    def __init__(self) -> None:
        self.dispatch_s = self.combine_s = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.dispatch_s = self.combine_s = 0.0
        self.calls = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AllToAllDispatcher:
    """Expert parallelism over a torch.distributed group (gloo on CPU, NCCL on GPU).

    Copies (placement.replicated): an expert held by c ranks has its assignments split over them
    round-robin, by the assignment's occurrence among this rank's assignments to that expert,
    offset by this rank's id (so one decode token per rank still spreads). The choice depends only
    on the routing and the rank: reproducible, and every copy holds identical weights.
    """

    def __init__(self, placement: ExpertPlacement, rank: int, group, ops, device: torch.device,
                 peer: PeerExchange | None = None):
        self.rank = rank
        self.world_size = placement.world_size
        self.group = group
        self.ops = ops  # the backend's combine applies the router weights
        self.device = device
        self.timing: ExchangeTiming | None = None
        # rows this rank's experts computed since the last reset (load statistics): a device counter added
        # to in place, so a CUDA-graph replay of the fixed exchange keeps counting
        self.rows_received = torch.zeros((), dtype=torch.long, device=device)
        # warm-up before a CUDA-graph capture (executor/cuda_graphs.py): run every kernel with the step's
        # shapes but exchange nothing (each rank "receives" its own send buffer), so a rank that captures
        # issues no more collectives than its peers, which replay or run eagerly
        self.dry_run = False
        # fixed-capacity mode: rows per destination rank this step (0: variable splits). Set by the
        # rank executor from StepPlan.exchange_capacity, identical on every rank for a step.
        self.capacity = 0
        # the fixed-capacity exchange over NVLink peer-to-peer writes (parallel/p2p_exchange.py), shared by every
        # layer of this rank; None: NCCL all_to_all_single. Steps above the capacity always use NCCL.
        self.peer = peer
        self.exchanges = {"variable": 0, "fixed": 0}  # dispatch calls per mode (tests, bench)
        self.set_placement(placement)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Switch the routing tables (the block swaps the weights: parallel/balancer.py)."""
        self.placement = placement
        self.local_experts = placement.local_experts[self.rank]
        ranks = placement.expert_ranks()  # [E][C_e]
        self.max_copies = max(len(r) for r in ranks)
        local_index = [{e: i for i, e in enumerate(experts)} for experts in placement.local_experts]
        pad = [list(r) + [r[0]] * (self.max_copies - len(r)) for r in ranks]
        self.copy_rank = torch.tensor(pad, dtype=torch.long, device=self.device)  # [E, C]
        self.copy_local = torch.tensor([[local_index[r][e] for r in row] for e, row in enumerate(pad)],
                                       dtype=torch.long, device=self.device)  # [E, C]
        self.num_copies = torch.tensor([len(r) for r in ranks], dtype=torch.long, device=self.device)  # [E]

    # ---- phases (the overlap scheduler in parallel/overlap.py interleaves them) -------------------
    def _targets(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Destination rank [M] and local expert id there [M] of each assignment (no host sync)."""
        if self.max_copies == 1:
            return self.copy_rank[flat, 0], self.copy_local[flat, 0]
        num_experts = self.num_copies.shape[0]
        by_expert = torch.sort(flat, stable=True).indices  # [M]
        counts = _counts(flat, num_experts)  # [E]
        starts = torch.cumsum(counts, 0) - counts  # [E]
        occurrence = torch.empty_like(flat)
        occurrence[by_expert] = torch.arange(flat.numel(), device=flat.device) - starts[flat[by_expert]]
        choice = (occurrence + self.rank) % self.num_copies[flat]  # [M]
        return self.copy_rank[flat, choice], self.copy_local[flat, choice]

    def route(self, topk_ids: torch.Tensor) -> _Route:
        top_k = topk_ids.shape[1]
        flat = topk_ids.flatten().long()  # [M]
        dest, local = self._targets(flat)
        order = torch.sort(dest, stable=True).indices  # [M]
        send_counts = _counts(dest, self.world_size)  # [N]
        return _Route(order, order // top_k, local[order], send_counts)

    def exchange_counts(self, route: _Route, async_op: bool = False):
        recv_counts = torch.empty_like(route.send_counts)
        work = dist.all_to_all_single(recv_counts, route.send_counts, group=self.group, async_op=async_op)
        return recv_counts, work

    def send_rows(self, x: torch.Tensor, route: _Route, send_splits: list[int], recv_splits: list[int],
                  async_op: bool = False):
        """Rows [R, H] and their local expert ids [R] for this rank's experts (views of one received buffer,
        valid once the works are waited on); works to wait on. Each row travels packed with its id (the
        fixed path's layout), so one all_to_all carries both."""
        self.rows_received += sum(recv_splits)
        id_offset, width = self._layout(x)
        row_bytes = x.shape[1] * x.element_size()
        packed = torch.empty(route.token_of_row.numel(), width, dtype=torch.uint8, device=x.device)  # [M, W]
        packed[:, :row_bytes].view(x.dtype).copy_(x.index_select(0, route.token_of_row))
        packed[:, id_offset:].view(torch.int32).view(-1).copy_(route.local_ids)
        recv = packed.new_empty((sum(recv_splits), width))  # [R, W]
        work = dist.all_to_all_single(recv, packed, recv_splits, send_splits, group=self.group, async_op=async_op)
        rows = recv[:, :row_bytes].view(x.dtype)  # [R, H] (strided view)
        ids = recv[:, id_offset:].view(torch.int32).view(-1)  # [R]
        return rows, ids, [work] if work is not None else []

    def send_back(self, y: torch.Tensor, ex: _Exchange, async_op: bool = False):
        back = y.new_empty((sum(ex.send_splits), y.shape[1]))  # [M, H] in send order
        work = dist.all_to_all_single(back, y.contiguous(), ex.send_splits, ex.recv_splits, group=self.group,
                                      async_op=async_op)
        return back, work

    def finish(self, back: torch.Tensor, ex: _Exchange) -> torch.Tensor:
        if ex.order.numel() == 0:  # an idle rank still had to serve the exchange
            return back.new_zeros(ex.topk_weights.shape[0], back.shape[1])
        reverse_index = torch.empty_like(ex.order)
        reverse_index[ex.order] = torch.arange(ex.order.numel(), device=ex.order.device)
        return self.ops.combine(back, reverse_index.to(torch.int32), ex.topk_weights)  # [T, H]

    @staticmethod
    def routed(rows: torch.Tensor, ids: torch.Tensor, ex: _Exchange) -> Routed:
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)  # [R, 1]
        return Routed(rows, ones, ids.view(-1, 1).to(torch.int32), ex)

    # ---- fixed-capacity path: no host sync, one equal-split exchange each way ---------------------
    @staticmethod
    def packed_layout(hidden: int, element_size: int) -> tuple[int, int]:
        """Packed row of the fixed exchange, in bytes: the hidden row (x's dtype), padding to a 4-byte
        boundary, then the destination-local expert id as int32 (-1: padding row). (id offset, width)"""
        row_bytes = hidden * element_size
        id_offset = -(-row_bytes // 4) * 4
        return id_offset, id_offset + 4

    @classmethod
    def _layout(cls, x: torch.Tensor) -> tuple[int, int]:
        return cls.packed_layout(x.shape[1], x.element_size())

    def _fixed_all_to_all(self, send: torch.Tensor, kind: int) -> torch.Tensor:
        """Block p of send [N * C, ...] to rank p; block q of the result from rank q (equal splits: no sizes to
        agree on). kind: DISPATCH or COMBINE, the peer exchange's inbox (its result is a view of it)."""
        if self.dry_run:  # no collective, no peer write or barrier: each rank "receives" its own send buffer
            if self.peer is not None:
                self.peer.check(send)  # shapes only: a capacity beyond the buffers fails here, not in a capture
            return send.clone()
        if self.peer is not None:
            return self.peer.exchange(send, kind)  # checks the shapes itself
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def dispatch_fixed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Routed:
        """Send exactly `capacity` packed rows to every rank (padded); receive N * capacity rows."""
        num_tokens, top_k = topk_ids.shape
        cap, world, hidden = self.capacity, self.world_size, x.shape[1]
        if num_tokens * top_k > cap:  # shapes only: host-known
            raise RuntimeError(f"fixed-capacity exchange: {num_tokens} tokens x top-{top_k} exceed the step's "
                               f"capacity of {cap} rows per rank (the step plan chose the wrong mode)")
        flat = topk_ids.flatten().long()  # [M]
        dest, local = self._targets(flat)
        # slot of assignment m in its destination's block: the number of earlier assignments to the same rank
        # (the order a stable sort by destination gives), from running counts per rank. No sort: a decode
        # step runs this once per layer, and each small kernel it saves is ~2 us of the exchange
        to_rank = dest.view(-1, 1) == torch.arange(world, device=dest.device)  # [M, N]
        slot = torch.cumsum(to_rank, 0).gather(1, dest.view(-1, 1)).view(-1) - 1  # [M] < counts <= M <= C
        position = dest * cap + slot  # [M] row of the send buffer (and of the returned results) of assignment m
        id_offset, width = self._layout(x)
        row_bytes = hidden * x.element_size()
        send = torch.zeros(world * cap, width, dtype=torch.uint8, device=x.device)  # [N * C, W]
        send_ids = send[:, id_offset:].view(torch.int32).view(-1)  # [N * C] view
        send_ids.fill_(-1)
        rows_out = x.unsqueeze(1).expand(num_tokens, top_k, hidden).reshape(-1, hidden)  # [M, H]: row m = token m // K
        send[:, :row_bytes].view(x.dtype).index_copy_(0, position, rows_out)
        send_ids.index_copy_(0, position, local.to(torch.int32))
        recv = self._fixed_all_to_all(send, DISPATCH)
        rows = recv[:, :row_bytes].view(x.dtype)  # [N * C, H] (strided view)
        ids = recv[:, id_offset:].view(torch.int32).view(-1)  # [N * C]
        valid = ids >= 0
        if not self.dry_run:
            self.rows_received.add_(valid.sum())  # on the device: no host sync
        num_local = len(self.local_experts)
        local_ids = torch.where(valid, ids, num_local).view(-1, 1)  # padding -> E_local, skipped by experts
        weights = valid.to(torch.float32).view(-1, 1)  # 1.0 for real rows, as in the variable path
        # position[m] is where assignment m's result comes back: the combine's reverse index as it is
        return Routed(rows, weights, local_ids, _FixedExchange(position, topk_weights), padded=True)

    def send_back_fixed(self, y: torch.Tensor) -> torch.Tensor:
        """Results of the N * C received rows back to their senders (the same fixed exchange, reversed):
        row p of the returned [N * C, H] is the result of this rank's send-buffer row p."""
        return self._fixed_all_to_all(y.contiguous(), COMBINE)

    def finish_fixed(self, back: torch.Tensor, ex: _FixedExchange) -> torch.Tensor:
        if ex.reverse_index.numel() == 0:  # an idle rank still had to serve the exchange
            return back.new_zeros(ex.topk_weights.shape[0], back.shape[1])
        return self.ops.combine(back, ex.reverse_index.to(torch.int32), ex.topk_weights)  # [T, H]

    # ---- the plain (blocking) path ---------------------------------------------------------------
    def _timed(self) -> bool:
        """Time this exchange (bench ep): never inside a CUDA-graph capture, which forbids synchronising."""
        return (self.timing is not None and not self.dry_run
                and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()))

    def dispatch(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Routed:
        timed = self._timed()
        if timed:
            _sync(self.device)
            start = time.perf_counter()
        if self.capacity > 0:
            self.exchanges["fixed"] += not self.dry_run
            routed = self.dispatch_fixed(x, topk_weights, topk_ids)
        else:
            self.exchanges["variable"] += 1
            route = self.route(topk_ids)
            recv_counts, _ = self.exchange_counts(route)
            send_splits, recv_splits = route.send_counts.tolist(), recv_counts.tolist()  # host sync: split sizes
            rows, ids, _ = self.send_rows(x, route, send_splits, recv_splits)
            routed = self.routed(rows, ids, _Exchange(route.order, send_splits, recv_splits, topk_weights))
        if timed:
            _sync(self.device)
            self.timing.dispatch_s += time.perf_counter() - start
            self.timing.calls += 1
        return routed

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        timed = self._timed()
        if timed:
            _sync(self.device)
            start = time.perf_counter()
        fixed = isinstance(routed.handle, _FixedExchange)
        back = self.send_back_fixed(y) if fixed else self.send_back(y, routed.handle)[0]
        if timed:
            _sync(self.device)
            self.timing.combine_s += time.perf_counter() - start
        return self.finish_fixed(back, routed.handle) if fixed else self.finish(back, routed.handle)


def make_dispatchers(placements: list[ExpertPlacement], rank: int, group, ops, device,
                     peer: PeerExchange | None = None) -> list[AllToAllDispatcher]:
    """One dispatcher per MoE layer (placements may differ per layer); `peer`, shared by all of them (layers run
    one after another): the fixed-capacity exchange over NVLink instead of NCCL."""
    return [AllToAllDispatcher(p, rank, group, ops, device, peer=peer) for p in placements]
