"""Expert-load statistics and rebalancing of LightMoEEngine (docs/expert_parallel.md).

Rank 0 keeps a sliding window of the tokens routed to each expert (summed over ranks) and of the rows
each rank received; under expert parallelism it re-places the experts from that window, by request
(rebalance()) or when the RebalancePolicy says so, and the next step's plan carries the new placement.
LightMoEEngine inherits these methods; they use its workers, runner, model_config, config and stats.
"""
from __future__ import annotations

import logging

from light_moe.config import ParallelConfig
from light_moe.parallel.balancer import LOAD_SYNC_STEPS, ExpertLoadTracker, ExpertLoadWindow, RebalancePolicy
from light_moe.parallel.placement import place_experts
from light_moe.runtime.device_to_host import HostCopy

logger = logging.getLogger("light_moe.engine.engine")  # the engine's log, as before the split


class ExpertLoadBalancing:
    """Mixed into LightMoEEngine: the load window (_init_expert_load), its per-step record, the public
    statistics (expert_load_stats, expert_rank_balance, expert_placements) and rebalance()."""

    def _init_expert_load(self, num_moe: int, num_experts: int, parallel: ParallelConfig) -> None:
        records = max(1, -(-parallel.expert_load_window // LOAD_SYNC_STEPS))  # one record per sync
        self._expert_load = ExpertLoadWindow(num_moe, num_experts, records)  # global tokens per expert
        self._rank_rows = ExpertLoadWindow(num_moe, parallel.expert_parallel_size, records)  # rows received per rank
        self._load_tracker = ExpertLoadTracker()  # one process: device-side sums between records
        self._load_copy: HostCopy | None = None  # one process: the last sums on their way to the host
        self._rebalance_policy = RebalancePolicy(parallel.rebalance_interval, parallel.rebalance_threshold)

    def _record_expert_load(self) -> None:
        num_experts = self.model_config.num_experts
        if self.workers is not None:
            load = self.workers.take_load()  # [L, E + N] after every LOAD_SYNC_STEPS-th step
            if load is not None:
                self._expert_load.record(load[:, :num_experts])
                self._rank_rows.record(load[:, num_experts:])
            if self._rebalance_policy.due(self.stats["steps"], self._expert_load, self.expert_placements):
                self.rebalance()
            return
        self._load_tracker.add(self.runner.expert_load())
        if self.stats["steps"] % LOAD_SYNC_STEPS == 0:
            tokens = self._load_tracker.take()
            if tokens is not None:  # recorded once on the host: no wait for this step's kernels
                self._load_copy = HostCopy(tokens)
        if self._load_copy is not None and self._load_copy.ready():
            self._expert_load.record(self._load_copy.get())
            self._load_copy = None

    def expert_load_stats(self) -> list[list[float]]:
        """Tokens routed to each expert over the sliding window, summed over all ranks. [L][E]

        Updated every LOAD_SYNC_STEPS steps (one small reduce to rank 0, no per-step host sync)."""
        return self._expert_load.load()

    def expert_rank_balance(self) -> list[float]:
        """Measured per MoE layer: the busiest rank's expert rows over the mean rank's, over the window
        since the last placement change (1.0 with one process)."""
        if self.workers is None:
            return [1.0] * len(self.model_config.moe_layers)
        return self._rank_rows.max_over_mean()

    @property
    def expert_placements(self) -> list:
        """The placement per MoE layer that the last (or, after rebalance(), the next) step uses."""
        if self.workers is None:
            return []
        return list(self.workers.next_placements)

    def rebalance(self, expert_load: list[list[float]] | None = None) -> dict:
        """Re-place every layer's experts (with copies of hot experts in num_redundant_experts extra slots
        per rank) from the load window, or from `expert_load` ([L][E], e.g. a recorded file) if given.
        Decided here on rank 0 and carried in the next step's plan, so every rank switches at that step
        boundary. Returns the predicted max/mean tokens per rank per layer before and after; {} with one
        process or no load to go by."""
        load = expert_load if expert_load is not None else self._expert_load.load()
        if self.workers is None or (expert_load is None and self._expert_load.num_steps == 0):
            return {}
        parallel = self.config.parallel
        placements = place_experts("load_aware", self.model_config.num_experts, len(self.model_config.moe_layers),
                                   parallel.expert_parallel_size, load, parallel.num_redundant_experts)
        before = [p.imbalance(layer) for p, layer in zip(self.expert_placements, load)]
        after = [p.imbalance(layer) for p, layer in zip(placements, load)]
        self.workers.set_placements(placements)
        self._rank_rows.clear()
        self.stats["rebalances"] += 1
        logger.info("expert rebalance: predicted max/mean tokens per rank %.2f -> %.2f (worst layer)",
                    max(before), max(after))
        return {"before": before, "after": after}
