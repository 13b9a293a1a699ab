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
     then all_to_all_single of the rows [M, H] and of their local expert ids [M] with those
     variable splits
  3. the owner runs its local experts on the R received rows as top-1 routing with weight 1.0
     (exact: the router weights are applied at home)
  4. all_to_all_single sends the [R, H] results back along the reversed splits; they arrive in
     send order, so reverse_index = inverse(order) lets the backend's combine sum
     w[t, k] * y[t, k] over k in slot order, as the single-process path does.
A token whose K experts share a rank is sent K times (no per-rank de-duplication yet: with K=8 of
128 experts on 8 ranks that costs up to ~K/N-fold extra traffic; see docs/expert_parallel.md).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from light_moe.parallel.placement import ExpertPlacement


class Routed(NamedTuple):
    """Rows for this rank's experts, in the form MoEOps.experts takes, plus what combine needs."""

    x: torch.Tensor  # [R, H]
    topk_weights: torch.Tensor  # [R, K'] float32
    topk_ids: torch.Tensor  # [R, K'] int32, local expert ids
    handle: Any = None


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


class AllToAllDispatcher:
    """Expert parallelism over a torch.distributed group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, placement: ExpertPlacement, rank: int, group, ops, device: torch.device):
        self.rank = rank
        self.world_size = placement.world_size
        self.group = group
        self.ops = ops  # the backend's combine applies the router weights
        self.local_experts = placement.local_experts[rank]
        self.expert_to_rank = torch.tensor(placement.expert_to_rank, dtype=torch.long, device=device)  # [E]
        self.expert_to_local = torch.tensor(placement.expert_to_local(), dtype=torch.long, device=device)  # [E]

    def _all_to_all(self, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=self.group)
        return out

    def dispatch(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Routed:
        top_k = topk_ids.shape[1]
        flat = topk_ids.flatten().long()  # [M]
        dest = self.expert_to_rank[flat]  # [M]
        order = torch.sort(dest, stable=True).indices  # [M]
        send_counts = torch.bincount(dest, minlength=self.world_size)  # [N]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()  # host sync: split sizes
        rows = self._all_to_all(x.index_select(0, order // top_k), recv_splits, send_splits)  # [R, H]
        local_ids = self._all_to_all(self.expert_to_local[flat[order]], recv_splits, send_splits)  # [R]
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=x.device)  # [R, 1]
        handle = _Exchange(order, send_splits, recv_splits, topk_weights)
        return Routed(rows, ones, local_ids.view(-1, 1).to(torch.int32), handle)

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        ex: _Exchange = routed.handle
        back = self._all_to_all(y, ex.send_splits, ex.recv_splits)  # [M, H] in send order
        if ex.order.numel() == 0:  # an idle rank still had to serve the exchange above
            return back.new_zeros(ex.topk_weights.shape[0], back.shape[1])
        reverse_index = torch.empty_like(ex.order)
        reverse_index[ex.order] = torch.arange(ex.order.numel(), device=ex.order.device)
        return self.ops.combine(back, reverse_index.to(torch.int32), ex.topk_weights)  # [T, H]


def make_dispatchers(placements: list[ExpertPlacement], rank: int, group, ops, device) -> list[AllToAllDispatcher]:
    """One dispatcher per MoE layer (placements may differ per layer)."""
    return [AllToAllDispatcher(p, rank, group, ops, device) for p in placements]
