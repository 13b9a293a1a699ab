"""Decides, each step, which requests run and how many of their tokens get computed. No tensors.

Policy (vLLM v1 / nano-vllm style, one token budget shared by prefill and decode):
  1. Running requests first, in arrival order (order of add_request calls). Each gets
     min(uncomputed tokens, budget left): one token for a decode, a chunk for a prefill.
     When its KV blocks cannot be allocated, the latest-arrived running request is preempted
     by recompute (blocks freed, num_computed_tokens = 0, outputs kept, put at the front of
     the waiting queue) until the allocation fits or the request itself was the victim.
  2. Then, only if nothing was preempted this step, waiting requests in FCFS order while
     seats (max_num_seqs), budget and blocks last. The first one that does not fit stops the
     scan, so a long prompt is never starved by shorter ones behind it. With prefix caching
     a request admitted (or readmitted after a preemption) first shares the cached blocks of its
     longest cached prefix of full blocks (kv_cache.py) and computes only the tokens after them.
  3. After a step's tokens are counted (update_from_output), each request's newly full blocks are
     registered in the prefix cache; preemption and finishing release blocks by reference count.

Data flow per engine step:
  out = scheduler.schedule()                      # engine runs the model on out.scheduled
  got = scheduler.update_from_output(out, ids)    # computed tokens advance, tokens appended
  for req in got: ...stop checks...; scheduler.finish_request(req.request_id, reason)
  for req in out.finished: ...emit them too: the scheduler ended them ("capacity")
A request always has at least one uncomputed token while it is unfinished: after its last
prompt chunk or a decode it receives a sampled token, and the next decode computes that token.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from light_moe.config import SchedulerConfig  # re-exported: lives with the other configs (EngineConfig holds it)
from light_moe.engine.kv_cache import BlockManager
from light_moe.engine.request import FINISH_REASONS, Request, RequestStatus
from light_moe.executor.batch import ScheduledRequest  # re-exported: the scheduler's output type

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests the scheduler finished itself (reason "capacity", never "length", which is max_tokens's)
    # because they can never be scheduled again: they outgrew the whole KV cache, or, without chunked
    # prefill, the token budget. Preemption comes first: only a request that cannot fit even alone ends.
    finished: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # sorted by arrival index
        self._requests: dict[str, Request] = {}  # unfinished requests only
        self._arrival_index: dict[str, int] = {}
        self._next_arrival_index = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None (finished requests are forgotten)."""
        return self._requests.get(request_id)

    # ---- request lifecycle ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if request.status is not RequestStatus.WAITING or request.block_table or request.num_computed_tokens:
            raise ValueError(
                f"request {request.request_id!r} must be new (WAITING, no blocks, nothing computed), got "
                f"status={request.status.name}, {len(request.block_table)} blocks, "
                f"num_computed_tokens={request.num_computed_tokens}"
            )
        # Its tokens plus one decode must fit the whole cache, or it could never make progress.
        needed = self.block_manager.num_blocks_for_tokens(request.num_tokens + 1)
        total = self.block_manager.max_blocks_per_request
        if needed > total:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_tokens} tokens and needs {needed} KV blocks "
                f"of {self.block_manager.block_size} tokens for them plus one decode, but the cache has only "
                f"{total} blocks"
            )
        if not self.config.enable_chunked_prefill and request.num_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_tokens} tokens, more than "
                f"max_num_batched_tokens={self.config.max_num_batched_tokens}; without chunked prefill the "
                "whole prompt must fit one step"
            )
        self._requests[request.request_id] = request
        self._arrival_index[request.request_id] = self._next_arrival_index
        self._next_arrival_index += 1
        self._waiting.append(request)

    def finish_request(self, request_id: str, reason: str) -> bool:
        """Remove the request, free its blocks, mark it FINISHED. False if unknown or already finished."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        del self._arrival_index[request_id]
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        return True

    def abort_request(self, request_id: str) -> bool:
        return self.finish_request(request_id, "abort")

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            num_new = min(self._num_uncomputed(request), budget)
            # the blocks it holds may have the slots already (a decode step, 15 times in 16): then nothing can fail
            # and nothing is allocated, which this per-request, per-step path skips
            if self.block_manager.blocks_needed(request, num_new):
                if self._can_never_fit(request, num_new):
                    self.finish_request(request.request_id, "capacity")
                    out.finished.append(request)
                    continue  # the list shifted left; the same index is the next request
                if not self._allocate_or_preempt(request, num_new, out):
                    continue  # it was preempted itself: the same index is the next request
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1

        # After a preemption the pool is known to be short; admitting now would only thrash.
        if not out.preempted:
            while self._waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
                request = self._waiting[0]
                remaining = self._num_uncomputed(request)
                if self._can_never_fit(request, min(remaining, budget) if self.config.enable_chunked_prefill
                                       else remaining):
                    self.finish_request(request.request_id, "capacity")
                    out.finished.append(request)
                    continue
                prefix = self.block_manager.find_cached_prefix(request)
                remaining -= len(prefix) * self.block_manager.block_size  # >= 1: the last token is never cached
                num_new = min(remaining, budget)
                if not self.config.enable_chunked_prefill and num_new < remaining:
                    break
                if not self.block_manager.allocate_slots(request, num_new, prefix):
                    break
                self._admitted(request, len(prefix) * self.block_manager.block_size)
                self._waiting.popleft()
                request.status = RequestStatus.RUNNING
                bisect.insort(self._running, request, key=lambda r: self._arrival_index[r.request_id])
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Advance computed tokens and append sampled tokens; returns the requests that got one."""
        received: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue  # aborted between schedule() and now; its blocks are gone already
            request.num_computed_tokens += item.num_new_tokens
            # the step that computed them is launched: its KV writes precede any later step's reads
            self.block_manager.cache_full_blocks(request)
            if not item.samples:
                continue
            if request.request_id not in sampled_token_ids:
                raise ValueError(
                    f"request {request.request_id!r} was scheduled to sample this step but sampled_token_ids "
                    "has no token for it"
                )
            request.output_token_ids.append(int(sampled_token_ids[request.request_id]))
            received.append(request)
        return received

    # ---- helpers -------------------------------------------------------------------------

    def _num_uncomputed(self, request: Request) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining <= 0:
            raise RuntimeError(
                f"request {request.request_id!r} has all {request.num_tokens} tokens computed and no new "
                "token: update_from_output must run (with a sampled token for it) between two schedule() calls"
            )
        return remaining

    def _can_never_fit(self, request: Request, num_new_tokens: int) -> bool:
        if not self.config.enable_chunked_prefill and num_new_tokens > self.config.max_num_batched_tokens:
            return True
        total_needed = len(request.block_table) + self.block_manager.blocks_needed(request, num_new_tokens)
        return total_needed > self.block_manager.max_blocks_per_request

    def _admitted(self, request: Request, num_cached_tokens: int) -> None:
        """A waiting request got its blocks: its cached prefix counts as computed."""
        request.num_computed_tokens = num_cached_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = num_cached_tokens

    def _scheduled(self, request: Request, num_new_tokens: int) -> ScheduledRequest:
        num_tokens = request.num_tokens
        is_decode = (
            num_new_tokens == 1
            and request.num_computed_tokens == num_tokens - 1
            and request.num_output_tokens > 0
        )
        samples = request.num_computed_tokens + num_new_tokens == num_tokens
        return ScheduledRequest(request, num_new_tokens, is_prefill=not is_decode, samples=samples)

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Slots for num_new more tokens of a running request, preempting the latest arrivals sharing its pool while
        they are short; False if it had to be preempted itself (it is waiting again)."""
        while not self.block_manager.allocate_slots(request, num_new):
            # The victim is the latest arrival whose blocks can make room (with one pool: the latest arrival); it
            # comes after the requests scheduled already, and it may be the request itself.
            victim = next(r for r in reversed(self._running) if self.block_manager.same_pool(r, request))
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self._running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self._waiting.appendleft(request)
