"""What rank 0 tells every expert-parallel rank to run in one engine step (executor/workers.py).

It travels pickled, once per step (parallel/groups.broadcast_pickled). A flat int64 encoding was
tried and measured no faster than pickle on 64 sequences (the int lists dominate either way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from light_moe.parallel.placement import ExpertPlacement


class PlannedSequence(NamedTuple):
    """One sequence of a step. A NamedTuple, not a dataclass: 64 of them build, pickle and unpickle in
    ~2/3 of the time (a dataclass pickles its field names with every object), and unpickling is on the
    workers' critical path every step."""

    owner: int
    start: int  # num_computed_tokens before this step
    tokens: list[int]  # the chunk computed this step
    block_table: list[int]  # in the owner's local block ids
    is_prefill: bool
    samples: bool


@dataclass(frozen=True)
class StepPlan:
    sequences: list[PlannedSequence]  # in scheduled order
    placements: tuple[ExpertPlacement, ...] | None = None  # switch to these before this step's forward
    collect_load: bool = False  # after the step, reduce the expert-load statistics to rank 0
    # >0: every MoE exchange of this step is the fixed-capacity one, this many rows per rank pair
    # (parallel/dispatch.py); 0: variable splits. Chosen on rank 0 from the host-known token counts.
    exchange_capacity: int = 0
    # async scheduling: some tokens are placeholders for the previous step's sampled tokens, of which there
    # were this many; rank 0 broadcasts them on the device before the forward (executor/pending_tokens.py)
    prev_samples: int = 0


def exchange_capacity(tokens_per_rank: list[int], top_k: int, limit: int) -> int:
    """Rows per rank pair of a step's fixed-capacity exchange, or 0 for the variable-split path.

    A rank's R routed rows may all go to one rank, so the capacity must hold the largest R. R counts
    the tokens padded to a power of two, as a decode CUDA graph pads its batch (executor/cuda_graphs.py
    BATCH_BUCKETS), times top_k; the capacity is R rounded up to a power of two (few distinct shapes: one
    graph each) and capped at `limit`. Steps with R above `limit` (prefill) use variable splits."""
    tokens = max(tokens_per_rank, default=0)
    rows = _pow2(tokens) * top_k if tokens else 0
    if limit <= 0 or rows > limit:
        return 0
    return min(limit, _pow2(rows))


def _pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
