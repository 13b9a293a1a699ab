"""A launched step whose sampled tokens the host has not read yet (async scheduling, engine/engine.py).

The tokens stay on the device for the next step's inputs (executor/pending_tokens.py); a copy to pinned
host memory is queued right behind the sampler, with an event after it, so that reading them waits for
this step's kernels only, not for the step launched after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.engine.scheduler import ScheduledRequest


@dataclass
class InflightStep:
    sampling: list[ScheduledRequest]  # the requests whose tokens these are, in row order
    tokens: torch.Tensor  # [S] int64 on the device: the next step's placeholder inputs read it
    host_tokens: torch.Tensor  # [S] int64, filled by the queued copy
    host_logprobs: torch.Tensor | None  # [S] float32 when some row asked for logprobs
    event: torch.cuda.Event | None  # after the copies (CUDA); None on CPU, where they are done already

    @classmethod
    def start(cls, sampling: list[ScheduledRequest], tokens: torch.Tensor,
              logprobs: torch.Tensor | None) -> InflightStep:
        if tokens.device.type != "cuda":
            return cls(sampling, tokens, tokens, logprobs, None)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
            host_logprobs.copy_(logprobs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(sampling, tokens, host_tokens, host_logprobs, event)

    def read(self) -> tuple[list[int], list[float] | None]:
        """The sampled tokens (and logprobs), waiting for this step's kernels if they still run."""
        if self.event is not None:
            self.event.synchronize()
        return self.host_tokens.tolist(), None if self.host_logprobs is None else self.host_logprobs.tolist()
