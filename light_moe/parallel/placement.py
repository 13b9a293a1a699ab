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
  replicated   load_aware plus `redundant` extra expert slots per rank, filled with copies of the
               hottest experts (EPLB-style): an expert with c copies is expected to take load/c
               tokens on each of its holders, because the dispatcher splits its tokens round-robin
               over the copies (parallel/dispatch.py). No placement can balance a layer whose hottest
               expert takes more than 1/N of the tokens; copies can.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from light_moe.config import PLACEMENT_STRATEGIES


@dataclass(frozen=True)
class ExpertPlacement:
    """One MoE layer's experts over N ranks."""

    expert_to_rank: tuple[int, ...]  # [E]
    local_experts: tuple[tuple[int, ...], ...]  # [N][E_r] global ids, ascending

    @classmethod
    def from_ranks(cls, expert_to_rank: list[int], world_size: int) -> ExpertPlacement:
        local = tuple(tuple(e for e, r in enumerate(expert_to_rank) if r == rank) for rank in range(world_size))
        return cls(tuple(expert_to_rank), local)

    @classmethod
    def from_local(cls, local_experts: list[list[int]], num_experts: int) -> ExpertPlacement:
        """From each rank's experts; an expert may live on several ranks (copies). expert_to_rank then
        names the lowest rank holding it (its home: the source of its weights when copies move)."""
        local = tuple(tuple(sorted(set(experts))) for experts in local_experts)
        home = [-1] * num_experts
        for rank in reversed(range(len(local))):
            for e in local[rank]:
                home[e] = rank
        missing = [e for e in range(num_experts) if home[e] < 0]
        if missing:
            raise ValueError(f"experts {missing} are on no rank")
        return cls(tuple(home), local)

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    @property
    def world_size(self) -> int:
        return len(self.local_experts)

    def expert_to_local(self) -> list[int]:
        """[E] index of each expert within its home rank's local list."""
        return [self.local_experts[r].index(e) for e, r in enumerate(self.expert_to_rank)]

    def expert_ranks(self) -> list[tuple[int, ...]]:
        """[E][C_e] every rank holding each expert, ascending (C_e = 1 without copies)."""
        ranks: list[list[int]] = [[] for _ in range(self.num_experts)]
        for rank, experts in enumerate(self.local_experts):
            for e in experts:
                ranks[e].append(rank)
        return [tuple(r) for r in ranks]

    @property
    def has_replicas(self) -> bool:
        return sum(len(x) for x in self.local_experts) > self.num_experts

    def rank_load(self, expert_load: list[float]) -> list[float]:
        """[N] expected tokens per rank: each expert's load split evenly over its copies."""
        per_rank = [0.0] * self.world_size
        for e, ranks in enumerate(self.expert_ranks()):
            for r in ranks:
                per_rank[r] += float(expert_load[e]) / len(ranks)
        return per_rank

    def imbalance(self, expert_load: list[float]) -> float:
        """The busiest rank's expected tokens over the mean rank's (1.0 = perfectly balanced)."""
        per_rank = self.rank_load(expert_load)
        mean = sum(per_rank) / len(per_rank)
        return max(per_rank) / mean if mean > 0 else 1.0


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


def replicated(expert_load: list[float], world_size: int, redundant: int) -> ExpertPlacement:
    """load_aware with `redundant` extra slots per rank holding copies of the hottest experts.

    1. copies: start with one per expert; N * redundant times give one more copy to the expert with
       the highest load per copy (at most N copies: never two on one rank);
    2. packing: copies, heaviest load-per-copy first, each onto the least-loaded rank that has a free
       slot and does not hold that expert yet (a copy that fits nowhere is dropped: its expert's
       other copies take its share).
    Ties go to the lower expert id and the lower rank, so every rank computes the same placement.
    Example (tests): load [40, 20, 10, 10, 5, 5, 5, 5] on 4 ranks: load_aware's best is 1.6 (expert 0
    alone is 40 of a mean 25), one redundant slot per rank gives 1.0.
    """
    num_experts = len(expert_load)
    if redundant <= 0:
        return load_aware(expert_load, world_size)
    load = [max(0.0, float(v)) for v in expert_load]
    copies = [1] * num_experts
    for _ in range(world_size * redundant):
        growable = [e for e in range(num_experts) if copies[e] < world_size]
        if not growable:
            break
        e = max(growable, key=lambda e: (load[e] / copies[e], -e))
        copies[e] += 1
    capacity = [num_experts // world_size + (1 if r < num_experts % world_size else 0) + redundant
                for r in range(world_size)]
    items = sorted(((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    rank_load = [0.0] * world_size
    local: list[list[int]] = [[] for _ in range(world_size)]
    placed = [0] * num_experts
    for share, e in items:
        open_ranks = [r for r in range(world_size) if capacity[r] > 0 and e not in local[r]]
        if not open_ranks:
            if placed[e] == 0:  # cannot happen (first copies come first in load order), but never lose one
                raise RuntimeError(f"no rank left for expert {e}")
            continue
        r = min(open_ranks, key=lambda r: (rank_load[r], r))
        local[r].append(e)
        capacity[r] -= 1
        placed[e] += 1
        rank_load[r] += share
    return ExpertPlacement.from_local(local, num_experts)


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
                  expert_load: list[list[float]] | None = None, redundant: int = 0) -> list[ExpertPlacement]:
    """One placement per MoE layer ([L]). `redundant` extra slots per rank hold copies of hot experts
    (load_aware only: the others have no load to choose them by)."""
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
    return [replicated(layer, world_size, redundant) for layer in expert_load]
