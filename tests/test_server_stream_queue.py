"""The per-token hand-over of a split server's API process: RequestStream's queue (a deque and one waiter) and
FrontendState's outputs, whose unfinished ones show the request's growing lists through ListPrefix views."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from light_moe.engine.list_prefix import ListPrefix
from light_moe.engine.outputs import RequestOutput, TokenDelta
from light_moe.engine.request_state import FrontendState
from light_moe.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from light_moe.sampling_params import SamplingParams
from light_moe.server.engine_loop import RequestFailedError, RequestStream

DEMO = Path(__file__).resolve().parents[1] / "light_moe" / "assets" / "demo-moe"


def _output(ids, text, finished=False):
    return RequestOutput("r", None, [1], text, ids, text[-1:], ids[-1:], finished, "length" if finished else None)


def test_list_prefix_reads_as_the_list_it_stands_for():
    items = [5, 6, 7, 8]
    view = ListPrefix(items, 3)
    items.append(9)  # the list grows after the view was taken: the view does not
    assert len(view) == 3 and list(view) == [5, 6, 7] and view == [5, 6, 7] and view != [5, 6, 7, 8]
    assert view[0] == 5 and view[-1] == 7 and view[1:] == [6, 7] and view[::-1] == [7, 6, 5]
    assert view[len(view) - 2:] == [6, 7] and view[5:] == [] and view == ListPrefix(items, 3)
    assert repr(view) == "[5, 6, 7]" and 7 in view and 8 not in view
    for index in (3, -4):
        with pytest.raises(IndexError):
            view[index]
    with pytest.raises(TypeError):
        hash(view)


def test_a_handler_takes_what_was_queued_while_it_slept_and_wakes_once():
    async def main():
        stream = RequestStream("r", asyncio.get_running_loop(), 0.0, True)
        got = []

        async def handler():
            async for out in stream:
                got.append(out.delta_text)

        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0)
        assert stream._waiter is not None  # asleep on its waiter
        stream._put(_output([7], "a"))
        stream._put(_output([7, 8], "ab"))  # no second wake-up for the same sleep
        assert stream._waiter is None
        await asyncio.sleep(0)
        assert got == ["a", "b"]  # in-process: one output per token, both taken at one wake-up
        stream._put(_output([7, 8, 9], "abc", finished=True))
        await task
        assert got == ["a", "b", "c"] and stream.finished

    asyncio.run(main())


def test_a_cancelled_handler_leaves_the_stream_usable():
    async def main():
        stream = RequestStream("r", asyncio.get_running_loop(), 0.0, True, join_outputs=True)
        waiting = asyncio.ensure_future(stream.next())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        stream._put(_output([7], "a"))  # the cancelled waiter is not woken (set_result on it would raise)
        stream._put(RequestFailedError("boom"))
        assert (await stream.next()).delta_text == "a"
        with pytest.raises(RequestFailedError):
            await stream.next()
        assert stream.finished

    asyncio.run(main())


@pytest.mark.parametrize("logprobs", [False, True])
def test_frontend_outputs_are_snapshots_without_copies(logprobs):
    tokenizer = Tokenizer(DEMO)
    ids = tokenizer.encode(" the expert layer and the cache of every batch", add_special_tokens=False)
    frontend = FrontendState("r", [1], SamplingParams(max_tokens=len(ids), logprobs=logprobs),
                             tokenizer, 0.0)
    outputs = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        delta = TokenDelta("r", [token], "length" if last else None, [-0.5 - i] if logprobs else None, 0, 0.0)
        outputs.append(frontend.update(delta, 1.0))
    for n, out in enumerate(outputs, 1):  # read after the whole request: each still shows its own step
        assert out.token_ids == ids[:n] and len(out.token_ids) == n
        assert out.logprobs == ([-0.5 - i for i in range(n)] if logprobs else None)
        assert isinstance(out.token_ids, ListPrefix) != out.finished
    final = outputs[-1]
    assert type(final.token_ids) is list and final.token_ids is not frontend.token_ids
    assert final.text == tokenizer.decode(ids) == "".join(o.delta_text for o in outputs)


def test_the_detokenizer_takes_a_length_as_it_took_a_slice():
    tokenizer = Tokenizer(DEMO)
    ids = tokenizer.encode(" the model serves tokens to the expert layer", add_special_tokens=False)
    by_slice, by_length = IncrementalDetokenizer(tokenizer), IncrementalDetokenizer(tokenizer)
    for n in range(1, len(ids) + 1):
        assert by_length.update(ids, n) == by_slice.update(ids[:n])
        assert (by_length.text, by_length.prefix_offset, by_length.read_offset) == (
            by_slice.text, by_slice.prefix_offset, by_slice.read_offset)
    assert by_length.text == tokenizer.decode(ids)
