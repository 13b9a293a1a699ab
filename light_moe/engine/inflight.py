"""A launched step whose sampled tokens the host has not read yet (async scheduling, engine/engine.py).

The tokens stay on the device for the next step's inputs (executor/pending_tokens.py); a copy to pinned
host memory is queued right behind the sampler (runtime/device_to_host.py), so that reading them waits
for this step's kernels only, not for the step launched after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.executor.batch import ScheduledRequest
from light_moe.runtime.device_to_host import HostCopy


@dataclass
class InflightStep:
    sampling: list[ScheduledRequest]  # the requests whose tokens these are, in row order
    tokens: torch.Tensor  # [S] int64 on the device: the next step's placeholder inputs read it
    host_tokens: HostCopy
    host_logprobs: HostCopy | None  # when some row asked for logprobs

    @classmethod
    def start(cls, sampling: list[ScheduledRequest], tokens: torch.Tensor,
              logprobs: torch.Tensor | None) -> InflightStep:
        return cls(sampling, tokens, HostCopy(tokens), None if logprobs is None else HostCopy(logprobs))

    def read(self) -> tuple[list[int], list[float] | None]:
        """The sampled tokens (and logprobs), waiting for this step's kernels if they still run."""
        tokens = self.host_tokens.get().tolist()
        return tokens, None if self.host_logprobs is None else self.host_logprobs.get().tolist()
