"""The JSON of streamed chunks, built from text fixed per request with only the changing parts encoded.

A streamed request sends one chunk per token, and json.dumps of the whole nested dict (id, object, created,
model, choices, usage) cost more than any other step of building it (scripts/api_cpu_profile.py,
docs/server.md "API process CPU cost"). The parts that never change within a request are encoded once here;
each chunk then encodes its text, logprobs and finish reason alone and joins the pieces. The result is the
text json.dumps(chunk, ensure_ascii=False) gives for the dict the chunk stands for, byte for byte (default
separators, keys in the same order; tests/test_server_sse.py compares them on hostile text).

    CompletionChunks(id, created, model).choice(text, logprobs, finish_reason) / .usage(usage)
    ChatChunks(id, created, model).role() / .content(text, logprobs, finish_reason) / .usage(usage)
"""
from __future__ import annotations

import json
from json.encoder import encode_basestring  # what json.dumps(a_str, ensure_ascii=False) returns


def encode(value) -> str:
    """json.dumps(value, ensure_ascii=False), with the common cases (null, a string) taken directly."""
    if value is None:
        return "null"
    if type(value) is str:
        return encode_basestring(value)
    return json.dumps(value, ensure_ascii=False)


def _head(request_id: str, object_name: str, created: int, model: str) -> str:
    """'{"id": ..., "object": ..., "created": ..., "model": ...' without its closing brace."""
    return json.dumps({"id": request_id, "object": object_name, "created": created, "model": model},
                      ensure_ascii=False)[:-1]


class CompletionChunks:
    """/v1/completions chunks: {"id", "object": "text_completion", "created", "model", "choices", "usage"}."""

    def __init__(self, request_id: str, created: int, model: str):
        head = _head(request_id, "text_completion", created, model)
        self._choice = head + ', "choices": [{"index": 0, "text": '
        self._usage = head + ', "choices": [], "usage": '

    def choice(self, text: str, logprobs: dict | None, finish_reason: str | None) -> str:
        return (f'{self._choice}{encode(text)}, "logprobs": {encode(logprobs)}, '
                f'"finish_reason": {encode(finish_reason)}}}], "usage": null}}')

    def usage(self, usage: dict) -> str:
        return f"{self._usage}{encode(usage)}}}"


class ChatChunks:
    """/v1/chat/completions chunks: {"id", "object": "chat.completion.chunk", "created", "model", "usage",
    "choices": [{"index": 0, "delta", "logprobs", "finish_reason"}]}."""

    def __init__(self, request_id: str, created: int, model: str):
        head = _head(request_id, "chat.completion.chunk", created, model)
        self._choice = head + ', "usage": null, "choices": [{"index": 0, "delta": '
        self._usage = head + ', "usage": '

    def role(self) -> str:
        """The first chunk: the assistant's role, empty content."""
        return f'{self._choice}{{"role": "assistant", "content": ""}}, "logprobs": null, "finish_reason": null}}]}}'

    def content(self, text: str | None, logprobs: dict | None, finish_reason: str | None) -> str:
        """A chunk whose delta is {"content": text}, or {} when text is None."""
        delta = "{}" if text is None else f'{{"content": {encode(text)}}}'
        return (f'{self._choice}{delta}, "logprobs": {encode(logprobs)}, '
                f'"finish_reason": {encode(finish_reason)}}}]}}')

    def usage(self, usage: dict) -> str:
        return f'{self._usage}{encode(usage)}, "choices": []}}'
