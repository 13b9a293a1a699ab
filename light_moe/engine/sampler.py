"""Token sampling for one step: penalties -> temperature -> top-k / top-p / min-p -> draw.

Shape legend: B sampling rows, V vocabulary.
Draws use the exponential race (argmax of p / q, q ~ Exp(1)), equivalent to sampling from p.
A seeded request draws its q from its own torch.Generator, so its tokens depend only on its
own logits and seed, not on what else is in the batch. Logprobs are those of the chosen token
under the model's raw distribution (log_softmax of the unprocessed logits), as vLLM reports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.runtime.host_to_device import to_device
from light_moe.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None  # per-request when seeded
    seen_token_ids: list[int]  # prompt + outputs, for the repetition penalty


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0 or not row.seen_token_ids:
            continue
        ids = to_device(sorted(set(row.seen_token_ids)), torch.long, logits.device)
        picked = logits[i, ids]
        logits[i, ids] = torch.where(picked > 0, picked / penalty, picked * penalty)


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; logits are already temperature-scaled."""
    vocab = logits.shape[-1]
    device = logits.device
    # decided from the host-side parameters (a device read here would synchronise with the step's kernels);
    # each filter's per-row values go to the device only when some row uses it
    if any(0 < r.params.top_k < vocab for r in rows) or any(r.params.top_p < 1.0 for r in rows):
        # clamped on the host: a top_k beyond the vocabulary means "no filter", and need not fit int64
        top_k = to_device([min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in rows], torch.long,
                          device)
        top_p = to_device([r.params.top_p for r in rows], torch.float32, device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device).expand_as(sorted_logits)
        drop = rank >= top_k.unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(r.params.min_p > 0 for r in rows):
        min_p = to_device([r.params.min_p for r in rows], torch.float32, device)
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator | None = None,
           ) -> tuple[list[int], list[float] | None]:
    """logits [B, V] float32 -> (token ids, logprobs of them or None if no row asked)."""
    tokens, logprobs = sample_on_device(logits, rows, default_generator)
    return tokens.tolist(), None if logprobs is None else logprobs.tolist()


def sample_on_device(logits: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] float32 -> (token ids [B] int64, logprobs [B] float32 or None), on logits' device, with
    no host synchronisation: every branch is decided from the rows' host-side parameters, so the draw can be
    queued behind the step's kernels (async scheduling) and read later."""
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs for r in rows) else None
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        logits = logits.clone()  # the penalty edits in place; the caller's logits stay intact
        _apply_repetition_penalty(logits, rows)
    tokens = logits.argmax(dim=-1)  # greedy rows use the penalised logits
    if not all(r.params.greedy for r in rows):
        greedy = to_device([r.params.greedy for r in rows], torch.bool, logits.device)
        temps = to_device([r.params.temperature if not r.params.greedy else 1.0 for r in rows], torch.float32,
                          logits.device)
        # shifted by each row's max first, so the largest scaled logit is 0 whatever the temperature: a small
        # one sends the others towards -inf, never the top one to +inf (inf - inf would be NaN in the softmax)
        shifted = logits - logits.max(dim=-1, keepdim=True).values
        scaled = _filter(shifted / temps.unsqueeze(1), rows)
        probs = torch.softmax(scaled, dim=-1)
        q = torch.empty_like(probs)
        for i, row in enumerate(rows):
            if row.params.greedy:
                q[i] = 1.0
            else:
                q[i].exponential_(generator=row.generator if row.generator is not None else default_generator)
        drawn = (probs / q).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, drawn)
    if raw_logprobs is None:
        return tokens, None
    return tokens, raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def rows_failing_alone(logits: torch.Tensor, rows: list[SamplingRow]) -> dict[int, Exception]:
    """After sample_on_device raised for a batch: {row: its error} for the rows that raise on their own. Each
    row is tried alone on a scratch generator, so a seeded row's own generator does not advance."""
    failures = {}
    for i, row in enumerate(rows):
        scratch = torch.Generator(device=logits.device).manual_seed(0)
        try:
            sample_on_device(logits[i:i + 1], [SamplingRow(row.params, None, row.seen_token_ids)], scratch)
        except Exception as exc:
            failures[i] = exc
    return failures
