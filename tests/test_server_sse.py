"""Streamed chunks built from per-request templates (light_moe/server/sse.py) are, byte for byte, what
json.dumps(chunk, ensure_ascii=False) gives for the dicts the server built before: on hostile text (quotes,
backslashes, newlines, control characters, non-ASCII, lone surrogates), hostile ids and model names, logprobs
(with non-finite values) and every finish reason."""
import json
import math

import pytest

from light_moe.server.sse import ChatChunks, CompletionChunks, encode

TEXTS = ["", "hello", ' "quoted" ', "back\\slash\\", "line\nbreak\r\ttab", "\x00\x01\x1f\x7f\x80\x9f",
         "caf\u00e9 \u4e2d\u6587 \U0001f600", "\u2028\u2029", "\ud800 lone", "</script>", "\\u0041", "'single'"]
IDS = ["cmpl-0123456789abcdef", 'id-"with"-quotes\\', "id-\u00fc\n"]
MODELS = ["demo-moe", 'Mixtral "8x7B"\\v0.1', "mod\u00e8le\t\u4e2d"]
LOGPROBS = [None, {"tokens": ["a", '"'], "token_logprobs": [-0.5, -1e-9], "top_logprobs": None, "text_offset": [0, 1]},
            {"content": [{"token": "\n", "logprob": -math.inf, "bytes": [10], "top_logprobs": []}]},
            {"content": [{"token": "x", "logprob": math.nan, "bytes": [120], "top_logprobs": []}]}]
FINISH = [None, "stop", "length", "abort", "capacity"]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}}


def _dumps(chunk: dict) -> str:
    return json.dumps(chunk, ensure_ascii=False)


def _completion_chunk(request_id, created, model, choices, usage) -> dict:  # the server's dict (app.py _body)
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def _chat_chunk(request_id, created, model, delta, logprobs=None, finish_reason=None) -> dict:  # as app.py built it
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "usage": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


@pytest.mark.parametrize("value", [None, *TEXTS, 0, -1.5, math.inf, True, [1, "a"], USAGE])
def test_encode_is_json_dumps(value):
    assert encode(value) == json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("request_id", IDS)
@pytest.mark.parametrize("model", MODELS)
def test_completion_chunks_equal_json_dumps(request_id, model):
    chunks = CompletionChunks(request_id, 1700000000, model)
    for text in TEXTS:
        for logprobs in LOGPROBS:
            for finish in FINISH:
                choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
                expected = _dumps(_completion_chunk(request_id, 1700000000, model, [choice], None))
                assert chunks.choice(text, logprobs, finish) == expected
    assert chunks.usage(USAGE) == _dumps(_completion_chunk(request_id, 1700000000, model, [], USAGE))


@pytest.mark.parametrize("request_id", IDS)
@pytest.mark.parametrize("model", MODELS)
def test_chat_chunks_equal_json_dumps(request_id, model):
    chunks = ChatChunks(request_id, 1700000000, model)
    assert chunks.role() == _dumps(_chat_chunk(request_id, 1700000000, model, {"role": "assistant", "content": ""}))
    for text in [None, *TEXTS]:
        for logprobs in LOGPROBS:
            for finish in FINISH:
                delta = {} if text is None else {"content": text}
                expected = _dumps(_chat_chunk(request_id, 1700000000, model, delta, logprobs, finish))
                assert chunks.content(text, logprobs, finish) == expected
    usage_chunk = _chat_chunk(request_id, 1700000000, model, {})
    usage_chunk["choices"] = []
    usage_chunk["usage"] = USAGE
    assert chunks.usage(USAGE) == _dumps(usage_chunk)


def test_chunks_are_json_that_reads_back():
    chunk = json.loads(ChatChunks("chatcmpl-1", 5, "m").content('a"\n\u4e2d', None, "stop"))
    assert chunk["choices"][0] == {"index": 0, "delta": {"content": 'a"\n\u4e2d'}, "logprobs": None,
                                   "finish_reason": "stop"}
    assert chunk["usage"] is None and chunk["model"] == "m" and chunk["created"] == 5
