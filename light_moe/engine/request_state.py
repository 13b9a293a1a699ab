"""Per-request engine state beside the scheduler's Request: sampling generator, detokenizer,
stop conditions (EOS, stop token ids, stop strings, max_tokens) and the output increments."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from light_moe.engine.outputs import RequestOutput
from light_moe.engine.request import Request
from light_moe.engine.sampler import SamplingRow
from light_moe.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class FailedRequestOutput(RequestOutput):
    """The last output of a request whose own host work raised (finish_reason "error"); the engine and the
    other requests went on. error: the exception, as "Type: message"."""

    error: str = ""


class RequestState:
    def __init__(self, request: Request, tokenizer: Tokenizer, generator: torch.Generator | None,
                 eos_token_ids: frozenset[int]):
        self.request = request
        self.params = request.sampling_params
        self.generator = generator
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop_ids = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(eos_token_ids))
        self.logprobs: list[float] | None = [] if self.params.logprobs else None
        self.emitted_text = ""
        self.emitted_tokens = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self._text_ids: int | None = None  # output ids the text still has to take in (set by accept)
        self._stop_searched = 0  # detok.text[:_stop_searched] holds no stop string

    def sampling_row(self) -> SamplingRow:
        seen = self.request.all_token_ids if self.params.repetition_penalty != 1.0 else []
        return SamplingRow(self.params, self.generator, seen)

    def _visible_text(self, finished: bool) -> tuple[str, bool]:
        """Apply stop strings: cut at the first match; while running, hold back a suffix that could
        still become a stop string so a stream never shows text that will be retracted."""
        text = self.detok.text
        stop_at = None
        for stop in self.params.stop:
            # the text before _stop_searched held no stop string: look only where a new one can end
            idx = text.find(stop, max(0, self._stop_searched - len(stop) + 1))
            if idx >= 0 and (stop_at is None or idx < stop_at[0]):
                stop_at = (idx, stop)
        if stop_at is None:
            self._stop_searched = len(text)
        if stop_at is not None:
            idx, stop = stop_at
            return text[: idx + (len(stop) if self.params.include_stop_str_in_output else 0)], True
        if not finished:
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
        return text, False

    def accept(self, token: int, logprob: float | None, now: float) -> str | None:
        """Take the token the scheduler just appended to the request and say whether the request ends with it
        ("stop": a stop token or stop string; "length": max_tokens; None). Only a request with stop strings
        detokenizes here (their check needs the text); the others' text and RequestOutput wait for emit(),
        which the engine may run while the GPUs compute the next step (async output processing)."""
        req = self.request
        if self.first_token_time is None:
            self.first_token_time = now
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        finish_reason = None
        if token in self.stop_ids:
            finish_reason = "stop"
        elif req.num_output_tokens >= self.params.max_tokens:
            finish_reason = "length"
        # a stop token is not part of the text (skip_special_tokens drops EOS; a stop id may be ordinary)
        self._text_ids = len(req.output_token_ids) - (token in self.stop_ids)
        if self.params.stop:
            self._detokenize()
            if self._visible_text(finish_reason is not None)[1]:
                finish_reason = "stop"
        return finish_reason

    def emit(self, finish_reason: str | None, now: float) -> RequestOutput:
        """The RequestOutput of the last accepted token (call before the next accept)."""
        self._detokenize()
        text, _ = self._visible_text(finish_reason is not None)
        return self._output(text, finish_reason, now)

    def _detokenize(self) -> None:
        if self._text_ids is not None:
            self.detok.update(self.request.output_token_ids[:self._text_ids])
            self._text_ids = None

    def _output(self, text: str, finish_reason: str | None, now: float) -> RequestOutput:
        req = self.request
        token_ids = list(req.output_token_ids)
        delta_text = text[len(self.emitted_text):] if text.startswith(self.emitted_text) else ""
        self.emitted_text = text
        delta_ids = token_ids[self.emitted_tokens:]
        self.emitted_tokens = len(token_ids)
        metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time}
        if finish_reason is not None:
            metrics["finish_time"] = now
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=list(req.prompt_token_ids), text=text,
            token_ids=token_ids, delta_text=delta_text, delta_token_ids=delta_ids,
            finished=finish_reason is not None, finish_reason=finish_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs), metrics=metrics,
            num_cached_tokens=req.num_cached_tokens)

    def final_output(self, reason: str) -> RequestOutput:
        self._detokenize()
        text, _ = self._visible_text(True)
        return self._output(text, reason, time.monotonic())

    def failed_output(self, exc: BaseException) -> FailedRequestOutput:
        """The request's last output after `exc`: the text already emitted (the detokenizer or the stop logic
        may be what failed, so nothing more is decoded), finish_reason "error"."""
        req = self.request
        return FailedRequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=list(req.prompt_token_ids),
            text=self.emitted_text, token_ids=list(req.output_token_ids[:self.emitted_tokens]), delta_text="",
            delta_token_ids=[], finished=True, finish_reason="error",
            logprobs=None if self.logprobs is None else self.logprobs[:self.emitted_tokens],
            metrics={"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                     "finish_time": time.monotonic()},
            num_cached_tokens=req.num_cached_tokens, error=f"{type(exc).__name__}: {exc}")
