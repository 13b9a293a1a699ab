"""What the engine hands back for a request after each step: a RequestOutput (text and token ids so far), or,
from an engine that leaves the text to another process (LightMoEEngine.detokenize False: the API server's
engine-core process, server/engine_core.py), a TokenDelta (the new token ids only)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # generated text so far (stop strings already applied)
    token_ids: list[int]  # generated token ids so far
    delta_text: str  # text new since the previous output of this request
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[float] | None = None  # of each generated token, when asked for
    metrics: dict = field(default_factory=dict)  # arrival / first_token / finish times (monotonic s)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (usage.prompt_tokens_details)


class TokenDelta(NamedTuple):
    """A request's new tokens of one step, without text (a tuple: cheap to build and to pickle, one per request
    per step). finish_reason "stop" here is always a stop token (the last id; it has no text): stop strings need
    the text, so whoever detokenizes looks for them. first_scheduled_time: time.monotonic() when the scheduler
    first admitted the request (queue time); error: "Type: message" with finish_reason "error"."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None
    num_cached_tokens: int
    first_scheduled_time: float | None
    error: str | None = None
