"""One generation request as the scheduler and the engine see it: token ids, progress, KV blocks.

Plain data, no tensors. The scheduler owns `status`, `num_computed_tokens`, `block_table`,
`num_preemptions`, `first_scheduled_time` and `num_cached_tokens`; the block manager owns the prefix-cache
fields `block_hashes` and `num_cached_blocks`; the engine owns the other timing fields and decides when a
request finishes.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from light_moe.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


# stop: a stop token or string; length: max_tokens; abort: abort() (a client went away, shutdown);
# capacity: the engine can no longer hold the request (its tokens outgrew the whole KV cache, or, without
# chunked prefill, one step's token budget); error: the request's own host work raised (engine.py).
FINISH_REASONS = ("stop", "length", "abort", "capacity", "error")


# eq=False: requests are compared by identity; two requests with equal tokens are still two requests.
@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # time.monotonic() by default; the scheduler orders by add_request order, never by this clock.
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens [0, num_computed_tokens) have their KV in the cache. After a preemption this drops to 0
    # and the next prefill recomputes prompt + outputs.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    # time.monotonic() when the scheduler first admitted it (queue time = this - arrival), kept over preemptions
    first_scheduled_time: float | None = None
    # Prompt tokens whose KV came from the prefix cache at its first admission (0 without prefix caching)
    num_cached_tokens: int = 0
    # Prefix caching (kv_cache.py): chained hashes of the first full blocks of all_token_ids, extended lazily and
    # never changed (a block is hashed only once all its tokens are final, no async placeholder among them), so
    # they survive preemption; and how many blocks of block_table were offered to the cache.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt; expected at least one token id")
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode step reads one token)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
