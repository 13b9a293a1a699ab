"""Expert load statistics over a sliding window of steps: the input of load_aware placement.

Shape legend: L MoE layers, E experts, N ranks.
Record ModelRunner.expert_load() after each step, then save() the window and start an engine
with expert_placement="load_aware", expert_load_file=<that file>. Under expert parallelism each
rank's router sees only its own sequences, so recording on rank 0 samples 1/N of the traffic;
sequences are spread evenly, so the estimate is unbiased (not exact).
Not done yet (issue 7): moving or replicating hot experts while serving.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from light_moe.parallel.placement import ExpertPlacement, write_expert_load


class ExpertLoadWindow:
    def __init__(self, num_layers: int, num_experts: int, window_steps: int = 1000):
        if window_steps <= 0:
            raise ValueError(f"window_steps must be positive, got {window_steps}")
        self._steps: deque[torch.Tensor] = deque(maxlen=window_steps)  # each [L, E] float64
        self._total = torch.zeros(num_layers, num_experts, dtype=torch.float64)  # [L, E]

    def record(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """One step's counts, one [E] tensor per MoE layer (ModelRunner.expert_load())."""
        if not tokens_per_expert:
            return
        step = torch.stack([t.detach().to("cpu", torch.float64) for t in tokens_per_expert])  # [L, E]
        if step.shape != self._total.shape:
            raise ValueError(f"expert load of shape {list(step.shape)}, expected {list(self._total.shape)}")
        if len(self._steps) == self._steps.maxlen:
            self._total -= self._steps[0]
        self._steps.append(step)
        self._total += step

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def load(self) -> list[list[float]]:
        """Tokens per expert summed over the window. [L][E]"""
        return self._total.tolist()

    def imbalance(self, placements: list[ExpertPlacement]) -> list[float]:
        """Per layer: the busiest rank's tokens over the mean rank's (1.0 = perfectly balanced)."""
        ratios = []
        for layer_load, placement in zip(self._total, placements):
            per_rank = [float(layer_load[list(experts)].sum()) for experts in placement.local_experts]
            mean = sum(per_rank) / len(per_rank)
            ratios.append(max(per_rank) / mean if mean > 0 else 1.0)
        return ratios

    def save(self, path: str | Path) -> None:
        write_expert_load(path, self.load())
