"""Per-request state beside the scheduler's Request: sampling generator, stop conditions (EOS, stop token ids,
stop strings, max_tokens) and the output increments, with the text side (detokenizer, stop strings, what was
emitted) in TextState.

    RequestState    the engine's: tokens accepted one by one; RequestOutputs, or, with detokenize False
                    (the API server's engine-core process), TokenDeltas: new ids, no text, no stop strings
    FrontendState   the API process's half of a split server (server/engine_client.py): TokenDeltas in,
                    the RequestOutputs the engine would have built out (the same TextState code)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from light_moe.engine.list_prefix import ListPrefix
from light_moe.engine.outputs import RequestOutput, TokenDelta
from light_moe.engine.request import Request
from light_moe.engine.sampler import SamplingRow
from light_moe.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from light_moe.sampling_params import SamplingParams


@dataclass
class FailedRequestOutput(RequestOutput):
    """The last output of a request whose own host work raised (finish_reason "error"); the engine and the
    other requests went on. error: the exception, as "Type: message"."""

    error: str = ""


class TextState:
    """The text of one request's output tokens: detokenized incrementally, cut at stop strings, and what the
    request's outputs have shown so far."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer)
        self.emitted_text = ""
        self.emitted_tokens = 0
        self._text_ids: int | None = None  # output ids the text still has to take in (set by take)
        self._stop_searched = 0  # detok.text[:_stop_searched] holds no stop string

    def take(self, num_text_ids: int) -> None:
        """The text is to cover the first num_text_ids output ids (decoded lazily, by update)."""
        self._text_ids = num_text_ids

    def update(self, output_ids: list[int]) -> None:
        if self._text_ids is not None:
            self.detok.update(output_ids, self._text_ids)  # a length, not a slice: no copy of the ids per token
            self._text_ids = None

    def stop_string_found(self, output_ids: list[int], finished: bool) -> bool:
        self.update(output_ids)
        return self.visible_text(finished)[1]

    def visible_text(self, finished: bool) -> tuple[str, bool]:
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

    def advance(self, text: str, token_ids: list[int]) -> tuple[str, list[int]]:
        """(delta text, delta ids) since the last output, which now shows `text` and `token_ids`."""
        delta_text = text[len(self.emitted_text):] if text.startswith(self.emitted_text) else ""
        self.emitted_text = text
        delta_ids = token_ids[self.emitted_tokens:]
        self.emitted_tokens = len(token_ids)
        return delta_text, delta_ids


class _Outputs:
    """What RequestState and FrontendState share: a request's RequestOutputs from its text and tokens (they
    set text, logprobs, arrival_time and first_token_time)."""

    text: TextState
    logprobs: list[float] | None
    arrival_time: float
    first_token_time: float | None

    def _metrics(self, now: float, finished: bool) -> dict:
        metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time}
        if finished:
            metrics["finish_time"] = now
        return metrics

    def _build(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], token_ids: list[int],
               text: str, finish_reason: str | None, now: float, num_cached_tokens: int,
               views: bool = False) -> RequestOutput:
        """token_ids: the request's output ids so far, and self.logprobs theirs: copied into the output, or, with
        views, shown through ListPrefix views (both lists must then only ever grow)."""
        delta_text, delta_ids = self.text.advance(text, token_ids)
        logprobs = self.logprobs
        if views:
            token_ids = ListPrefix(token_ids, len(token_ids))
            if logprobs is not None:
                logprobs = ListPrefix(logprobs, len(logprobs))
        else:
            token_ids = list(token_ids)
            if logprobs is not None:
                logprobs = list(logprobs)
        return RequestOutput(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, text=text, token_ids=token_ids,
            delta_text=delta_text, delta_token_ids=delta_ids, finished=finish_reason is not None,
            finish_reason=finish_reason, logprobs=logprobs, metrics=self._metrics(now, finish_reason is not None),
            num_cached_tokens=num_cached_tokens)

    def _failed(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], output_ids: list[int],
                error: str, now: float, num_cached_tokens: int) -> FailedRequestOutput:
        """The text and tokens already emitted (the detokenizer or the stop logic may be what failed, so
        nothing more is decoded), finish_reason "error"."""
        emitted = self.text.emitted_tokens
        return FailedRequestOutput(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, text=self.text.emitted_text,
            token_ids=list(output_ids[:emitted]), delta_text="", delta_token_ids=[], finished=True,
            finish_reason="error", logprobs=None if self.logprobs is None else self.logprobs[:emitted],
            metrics=self._metrics(now, True), num_cached_tokens=num_cached_tokens, error=error)


class RequestState(_Outputs):
    def __init__(self, request: Request, tokenizer: Tokenizer, generator: torch.Generator | None,
                 eos_token_ids: frozenset[int], detokenize: bool = True):
        self.request = request
        self.params = request.sampling_params
        self.generator = generator
        self.detokenize = detokenize  # False: TokenDeltas out, stop strings left to whoever detokenizes
        self.text = TextState(tokenizer, self.params)
        self.stop_ids = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(eos_token_ids))
        self.logprobs: list[float] | None = [] if self.params.logprobs else None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    def sampling_row(self) -> SamplingRow:
        seen = self.request.all_token_ids if self.params.repetition_penalty != 1.0 else []
        return SamplingRow(self.params, self.generator, seen)

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
        self.text.take(len(req.output_token_ids) - (token in self.stop_ids))
        if self.params.stop and self.detokenize:
            if self.text.stop_string_found(req.output_token_ids, finish_reason is not None):
                finish_reason = "stop"
        return finish_reason

    def emit(self, finish_reason: str | None, now: float) -> RequestOutput | TokenDelta:
        """The RequestOutput (TokenDelta without detokenize) of the last accepted token (call before the next
        accept)."""
        if not self.detokenize:
            return self._delta(finish_reason)
        self.text.update(self.request.output_token_ids)
        text, _ = self.text.visible_text(finish_reason is not None)
        return self._output(text, finish_reason, now)

    def _output(self, text: str, finish_reason: str | None, now: float) -> RequestOutput:
        req = self.request
        # the prompt ids are shared, not copied per token (Request copied them once; nothing changes them)
        return self._build(req.request_id, req.prompt, req.prompt_token_ids, req.output_token_ids, text,
                           finish_reason, now, req.num_cached_tokens)

    def _delta(self, finish_reason: str | None, error: str | None = None) -> TokenDelta:
        req = self.request
        start = self.text.emitted_tokens
        ids = req.output_token_ids[start:] if error is None else []
        self.text.emitted_tokens += len(ids)
        logprobs = None if self.logprobs is None or error is not None else self.logprobs[start:]
        return TokenDelta(req.request_id, ids, finish_reason, logprobs, req.num_cached_tokens,
                          req.first_scheduled_time, error)

    def final_output(self, reason: str) -> RequestOutput | TokenDelta:
        if not self.detokenize:
            return self._delta(reason)
        self.text.update(self.request.output_token_ids)
        text, _ = self.text.visible_text(True)
        return self._output(text, reason, time.monotonic())

    def failed_output(self, exc: BaseException) -> FailedRequestOutput | TokenDelta:
        """The request's last output after `exc`: the text already emitted (the detokenizer or the stop logic
        may be what failed, so nothing more is decoded), finish_reason "error"."""
        error = f"{type(exc).__name__}: {exc}"
        if not self.detokenize:
            return self._delta("error", error)
        req = self.request
        return self._failed(req.request_id, req.prompt, req.prompt_token_ids, req.output_token_ids, error,
                            time.monotonic(), req.num_cached_tokens)


class FrontendState(_Outputs):
    """A request's text side in the API process of a split server: the engine-core process sends TokenDeltas
    (new ids; a "stop" there is a stop token), this turns them into the RequestOutputs the engine itself would
    have built, stop strings included (the tokens after the one completing a stop string are dropped; the
    caller tells the engine core to stop the request)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 arrival_time: float):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.text = TextState(tokenizer, params)
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None

    def update(self, delta: TokenDelta, now: float) -> RequestOutput:
        if delta.error is not None:
            return self.failed(delta.error, now, delta.num_cached_tokens)
        if delta.token_ids and self.first_token_time is None:
            self.first_token_time = now
        finish_reason, ids, logprobs = delta.finish_reason, delta.token_ids, delta.logprobs
        if self.params.stop:  # token by token, as the engine's accept() looks for them
            for i, token in enumerate(ids):
                self.token_ids.append(token)
                ends = finish_reason if i == len(ids) - 1 else None
                self.text.take(len(self.token_ids) - (ends == "stop"))
                if self.text.stop_string_found(self.token_ids, ends is not None):
                    finish_reason, ids = "stop", ids[:i + 1]
                    logprobs = None if logprobs is None else logprobs[:i + 1]
                    break
        elif ids:
            self.token_ids.extend(ids)
            self.text.take(len(self.token_ids) - (finish_reason == "stop"))
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.extend(logprobs)
        self.text.update(self.token_ids)
        text, _ = self.text.visible_text(finish_reason is not None)
        # the prompt ids are shared, not copied: nothing changes them; token_ids and logprobs only grow, so an
        # unfinished output shows them through views (a copy per token was O(n^2) per request), the last a copy
        return self._build(self.request_id, None, self.prompt_token_ids, self.token_ids, text, finish_reason,
                           now, delta.num_cached_tokens, views=finish_reason is None)

    def failed(self, error: str, now: float, num_cached_tokens: int = 0) -> FailedRequestOutput:
        return self._failed(self.request_id, None, self.prompt_token_ids, self.token_ids, error, now,
                            num_cached_tokens)
