"""Which rank owns which expert, per MoE layer.

Shape legend: E experts, N ranks (expert_parallel_size), L MoE layers.
A placement is the expert -> rank map plus, per rank, its local experts in ascending global id;
an expert's local id on its owner is its index in that list. Every strategy gives each rank
E // N or E // N + 1 experts, so expert weight memory per rank falls as 1/N whatever the load.

  contiguous   rank r owns experts [r*E//N, (r+1)*E//N)      (the natural checkpoint order)
  round_robin  expert e lives on rank e % N                  (spreads neighbouring experts)
  load_aware   greedy longest-processing-time packing of recorded per-layer expert load
               (tokens routed to each expert) under the same per-rank expert count, so hot
               experts land on different ranks; one placement per layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PLACEMENT_STRATEGIES = ("contiguous", "round_robin", "load_aware")


@dataclass(frozen=True)
class ExpertPlacement:
    """One MoE layer's experts over N ranks."""

    expert_to_rank: tuple[int, ...]  # [E]
    local_experts: tuple[tuple[int, ...], ...]  # [N][E_r] global ids, ascending

    @classmethod
    def from_ranks(cls, expert_to_rank: list[int], world_size: int) -> ExpertPlacement:
        local = tuple(tuple(e for e, r in enumerate(expert_to_rank) if r == rank) for rank in range(world_size))
        return cls(tuple(expert_to_rank), local)

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    @property
    def world_size(self) -> int:
        return len(self.local_experts)

    def expert_to_local(self) -> list[int]:
        """[E] index of each expert within its owner's local list."""
        local = [0] * self.num_experts
        for experts in self.local_experts:
            for i, e in enumerate(experts):
                local[e] = i
        return local


def contiguous(num_experts: int, world_size: int) -> ExpertPlacement:
    ranks = [0] * num_experts
    for r in range(world_size):
        for e in range(r * num_experts // world_size, (r + 1) * num_experts // world_size):
            ranks[e] = r
    return ExpertPlacement.from_ranks(ranks, world_size)


def round_robin(num_experts: int, world_size: int) -> ExpertPlacement:
    return ExpertPlacement.from_ranks([e % world_size for e in range(num_experts)], world_size)


def load_aware(expert_load: list[float], world_size: int) -> ExpertPlacement:
    """Heaviest expert first onto the least-loaded rank that still has an expert slot free.

    Slots: the first E % N ranks take E // N + 1 experts, the others E // N (as contiguous does).
    Ties (equal load) go to the lower expert id and the lower rank, so every rank computes the
    same placement from the same statistics.
    """
    num_experts = len(expert_load)
    capacity = [num_experts // world_size + (1 if r < num_experts % world_size else 0) for r in range(world_size)]
    rank_load = [0.0] * world_size
    ranks = [0] * num_experts
    for e in sorted(range(num_experts), key=lambda e: (-float(expert_load[e]), e)):
        open_ranks = [r for r in range(world_size) if capacity[r] > 0]
        r = min(open_ranks, key=lambda r: (rank_load[r], r))
        ranks[e] = r
        capacity[r] -= 1
        rank_load[r] += float(expert_load[e])
    return ExpertPlacement.from_ranks(ranks, world_size)


def read_expert_load(path: str | Path) -> list[list[float]]:
    """Recorded load: JSON {"expert_load": [[tokens per expert] per MoE layer]} (see record_expert_load)."""
    try:
        data = json.loads(Path(path).read_text())
        load = data["expert_load"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not an expert-load file ({{'expert_load': [[...], ...]}}): {exc}") from exc
    return [[float(v) for v in layer] for layer in load]


def write_expert_load(path: str | Path, expert_load: list[list[float]]) -> None:
    Path(path).write_text(json.dumps({"expert_load": [[float(v) for v in layer] for layer in expert_load]}))


def place_experts(strategy: str, num_experts: int, num_moe_layers: int, world_size: int,
                  expert_load: list[list[float]] | None = None) -> list[ExpertPlacement]:
    """One placement per MoE layer ([L])."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"expert_placement must be one of {PLACEMENT_STRATEGIES}, got {strategy!r}")
    if world_size > num_experts:
        raise ValueError(f"expert_parallel_size {world_size} exceeds the model's {num_experts} experts: "
                         "every rank needs at least one expert")
    if strategy == "contiguous":
        return [contiguous(num_experts, world_size)] * num_moe_layers
    if strategy == "round_robin":
        return [round_robin(num_experts, world_size)] * num_moe_layers
    if expert_load is None:
        raise ValueError("expert_placement='load_aware' needs recorded expert load (expert_load_file)")
    if len(expert_load) != num_moe_layers or any(len(layer) != num_experts for layer in expert_load):
        shape = [len(expert_load), len(expert_load[0]) if expert_load else 0]
        raise ValueError(f"expert load has shape {shape}, expected [{num_moe_layers}, {num_experts}] "
                         "(MoE layers x experts) for this model")
    return [load_aware(layer, world_size) for layer in expert_load]
