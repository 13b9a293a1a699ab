"""ScheduledRequest: one sequence of a step as the executor takes it (the scheduler's output, rank 0's
step plans unpacked on the other ranks). Defined here, below the engine, so the executor never
imports the engine; engine/scheduler.py re-exports it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from light_moe.engine.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    # Tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) are computed this step;
    # request.num_computed_tokens still holds the start until update_from_output.
    num_new_tokens: int
    # False only for a decode: the single token computed is the request's latest sampled token.
    # Recomputing prompt + outputs after a preemption is a prefill.
    is_prefill: bool
    # True when this step computes the last known token, so its logits give the next token.
    samples: bool
