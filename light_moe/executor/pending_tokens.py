"""Input tokens that are still on the device (async scheduling).

With async scheduling the engine schedules and launches step n+1 before the host has read the tokens that
step n sampled: a decode row of step n+1 then carries the placeholder -(i + 1) for its input token, i the
row of that token in step n's sampled tokens, which stay on the device. The runner (eager or CUDA graph)
copies them into the step's input ids on the stream; under expert parallelism rank 0 broadcasts step n's
sampled tokens to every rank first (executor/workers.py). Token ids are never negative otherwise.
"""
from __future__ import annotations

import torch

from light_moe.runtime.host_to_device import to_device


def placeholder(row: int) -> int:
    """The input token that stands for row `row` of the previous step's sampled tokens."""
    return -row - 1


def has_pending(host_ids) -> bool:
    return bool(host_ids) and min(host_ids) < 0  # min runs in C: prefill steps carry thousands of ids


def fill_pending_tokens(ids: torch.Tensor, host_ids: list[int], prev_tokens: torch.Tensor | None) -> None:
    """Async scheduling schedules a step before the host knows the tokens the previous step sampled: such an
    input token is a placeholder -(i + 1), i its row in the previous step's sampled tokens (still on the
    device). Copy them into ids (the step's input ids, already on the device) from prev_tokens, on the
    stream, without a host read."""
    if not has_pending(host_ids):  # every synchronous step
        return
    if prev_tokens is None:
        raise RuntimeError("the step has input tokens still pending from the previous step, but no sampled "
                           "tokens to take them from")
    rows = [row for row, t in enumerate(host_ids) if t < 0]
    index = to_device([rows, [-host_ids[row] - 1 for row in rows]], torch.long, ids.device)  # [2, P]: one upload
    ids.index_copy_(0, index[0], prev_tokens.index_select(0, index[1].to(prev_tokens.device)).to(ids.device))
