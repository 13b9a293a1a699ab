"""Dynamic expert load balancing: load statistics over a sliding window, the rebalancing policy,
and moving expert weights between ranks when the placement changes.

Shape legend: L MoE layers, E experts, N ranks.

Statistics. Every rank adds its routers' tokens-per-expert into a device-side sum each step
(ExpertLoadTracker: no host sync). Every LOAD_SYNC_STEPS steps rank 0 marks the StepPlan
`collect_load`; after that step's forward every rank packs [L, E + N] (its expert counts, and the
rows its own experts received in its column) and `dist.reduce`s it to rank 0, which records one
window entry. So the window is global, exact (not a 1/N sample: rank 0's own router sees only
its own sequences, and a sample is biased whenever the ranks' sequences differ, e.g. one long
prompt), and costs one [L, E + N] reduce per LOAD_SYNC_STEPS steps.

Rebalancing (engine.rebalance(), or automatically every `rebalance_interval` steps when the
window's predicted max/mean exceeds `rebalance_threshold`): rank 0 recomputes every layer's
placement with placement.replicated (load_aware plus copies of the hottest experts in
`num_redundant_experts` extra slots per rank) and puts it in the next StepPlan. Every rank applies
it before that step's forward, in layer order (apply_placements): the weights of experts a rank
gains come from the expert's home in the old placement, one all_to_all_single per changed
layer (variable splits computed by every rank from the two placements, so no counts exchange).
Because the new placement rides in the plan that every rank receives, all ranks switch at the same
step boundary and run the same collectives in the same order: no deadlock, and service stalls
only for the one step that also moves weights (one layer's worth of extra expert memory at a time).
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from light_moe.parallel.placement import ExpertPlacement, write_expert_load
from light_moe.runtime.device_to_host import HostCopy

LOAD_SYNC_STEPS = 8  # steps between reductions of the load statistics to rank 0


class ExpertLoadWindow:
    """Per-layer counts over the last `window_steps` records (one record: one [L, X] array)."""

    def __init__(self, num_layers: int, num_experts: int, window_steps: int = 1000):
        if window_steps <= 0:
            raise ValueError(f"window_steps must be positive, got {window_steps}")
        self._steps: deque[torch.Tensor] = deque(maxlen=window_steps)  # each [L, E] float64
        self._total = torch.zeros(num_layers, num_experts, dtype=torch.float64)  # [L, E]

    def record(self, tokens_per_expert: list[torch.Tensor] | torch.Tensor) -> None:
        """One record's counts: [L, E], or one [E] tensor per MoE layer (ModelRunner.expert_load())."""
        if isinstance(tokens_per_expert, list):
            if not tokens_per_expert:
                return
            tokens_per_expert = torch.stack([t.detach() for t in tokens_per_expert])
        step = tokens_per_expert.to("cpu", torch.float64)  # [L, E]
        if step.shape != self._total.shape:
            raise ValueError(f"expert load of shape {list(step.shape)}, expected {list(self._total.shape)}")
        if len(self._steps) == self._steps.maxlen:
            self._total -= self._steps[0]
        self._steps.append(step)
        self._total += step

    def clear(self) -> None:
        self._steps.clear()
        self._total.zero_()

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def load(self) -> list[list[float]]:
        """Counts summed over the window. [L][E]"""
        return self._total.tolist()

    def imbalance(self, placements: list[ExpertPlacement]) -> list[float]:
        """Per layer: the busiest rank's expected tokens over the mean rank's (1.0 = perfectly balanced);
        an expert with copies counts 1/c of its load on each holder."""
        return [p.imbalance(layer.tolist()) for layer, p in zip(self._total, placements)]

    def max_over_mean(self) -> list[float]:
        """Per layer max/mean of the columns (for a window of rows per rank: the measured balance)."""
        mean = self._total.mean(dim=1)
        ratio = self._total.max(dim=1).values / mean.clamp_min(1e-12)
        return [float(r) if m > 0 else 1.0 for r, m in zip(ratio, mean)]

    def save(self, path: str | Path) -> None:
        write_expert_load(path, self.load())


class ExpertLoadTracker:
    """Device-side running sum of tokens per expert between syncs: one add per step, no host sync."""

    def __init__(self) -> None:
        self._tokens: torch.Tensor | None = None  # [L, E] int64

    def add(self, tokens_per_expert: list[torch.Tensor]) -> None:
        if not tokens_per_expert:
            return
        step = torch.stack(tokens_per_expert).to(torch.int64)  # [L, E]
        self._tokens = step if self._tokens is None else self._tokens + step

    def take(self) -> torch.Tensor | None:
        tokens, self._tokens = self._tokens, None
        return tokens


def reduce_load(tracker: ExpertLoadTracker, dispatchers, num_experts: int, rank: int, group,
                device: torch.device) -> HostCopy | None:
    """Every rank: sum its statistics since the last call into rank 0. Rank 0 gets [L, E + N] float64
    (tokens per expert, then rows received per rank) as a copy on its way to the host (read it when
    ready(): a `.cpu()` here would hold rank 0 until the step's kernels finish); the others None."""
    world = dist.get_world_size(group)
    packed = torch.zeros(len(dispatchers), num_experts + world, dtype=torch.float64, device=device)  # [L, E + N]
    tokens = tracker.take()
    if tokens is not None:
        packed[:, :num_experts] = tokens.to(device, torch.float64)
    for layer, d in enumerate(dispatchers):
        packed[layer, num_experts + rank] = d.rows_received
        d.rows_received.zero_()
    dist.reduce(packed, dst=0, group=group)
    return HostCopy(packed) if rank == 0 else None


class RebalancePolicy:
    """When to rebalance on its own: every `interval` steps (0: never) if the window's predicted
    max/mean tokens per rank, in its worst layer, exceeds `threshold`. The prediction (load under
    the current placement) is used rather than the measured rows per rank, because the measured
    window still holds the old placement's rows for a while after a switch and would trigger again."""

    def __init__(self, interval: int, threshold: float):
        self.interval, self.threshold = interval, threshold

    def due(self, step: int, window: ExpertLoadWindow, placements: list[ExpertPlacement]) -> bool:
        if self.interval <= 0 or step % self.interval or window.num_steps == 0:
            return False
        return max(window.imbalance(placements)) > self.threshold


@torch.inference_mode()
def move_experts(block, old: ExpertPlacement, new: ExpertPlacement, rank: int,
                 group) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank, for one MoE layer: this rank's stacked weights under `new` ([E_new, 2I, H],
    [E_new, H, I]). Experts it keeps are copied locally; each expert it gains is sent by that
    expert's home rank in `old`, all in one all_to_all_single with splits every rank can compute."""
    w13, w2 = block.experts.w13.data, block.experts.w2.data
    world = new.world_size
    old_index = {e: i for i, e in enumerate(old.local_experts[rank])}

    def gained(r: int) -> list[int]:
        return [e for e in new.local_experts[r] if e not in old.local_experts[r]]

    sends = [[e for e in gained(d) if old.expert_to_rank[e] == rank] for d in range(world)]
    recvs = [[e for e in gained(rank) if old.expert_to_rank[e] == s] for s in range(world)]
    n13, n2 = w13[0].numel(), w2[0].numel()
    per_expert = n13 + n2
    pieces = [torch.cat([w13[old_index[e]].flatten(), w2[old_index[e]].flatten()]) for d in sends for e in d]
    send_buf = torch.cat(pieces) if pieces else w13.new_empty(0)
    recv_buf = w13.new_empty(per_expert * sum(len(r) for r in recvs))
    dist.all_to_all_single(recv_buf, send_buf, [len(r) * per_expert for r in recvs],
                           [len(d) * per_expert for d in sends], group=group)
    received = {}
    for k, e in enumerate(e for s in recvs for e in s):
        flat = recv_buf[k * per_expert:(k + 1) * per_expert]
        received[e] = (flat[:n13].view(w13.shape[1:]), flat[n13:].view(w2.shape[1:]))
    mine = new.local_experts[rank]
    new13 = torch.stack([w13[old_index[e]] if e in old_index else received[e][0] for e in mine])
    new2 = torch.stack([w2[old_index[e]] if e in old_index else received[e][1] for e in mine])
    return new13, new2


def apply_placements(blocks, dispatchers, placements: list[ExpertPlacement], rank: int, group) -> int:
    """Every rank, at the same step boundary: switch each MoE layer to its new placement. Returns the
    number of layers that changed (identical on every rank, so all join the same collectives)."""
    changed = 0
    for block, dispatcher, placement in zip(blocks, dispatchers, placements):
        if placement == dispatcher.placement:
            continue
        w13, w2 = move_experts(block, dispatcher.placement, placement, rank, group)
        block.set_local_experts(placement.local_experts[rank], w13, w2)
        dispatcher.set_placement(placement)
        changed += 1
    return changed
