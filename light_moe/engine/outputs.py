"""What the engine hands back for a request after each step."""
from __future__ import annotations

from dataclasses import dataclass, field


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
