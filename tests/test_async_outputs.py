"""async_output_processing: step() returns a step's outputs from the next call (their text is made while
the GPUs run that step); every request's sequence of outputs is the same as without it, through stop
tokens, stop strings, max_tokens, logprobs, seeded sampling, preemption, a request the cache cannot hold,
and aborts."""
import pytest

from light_moe import LightMoEEngine, SamplingParams
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [list(range(10 + i, 30 + 3 * i)) for i in range(6)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


def engines(ckpt, **kwargs):
    common = dict(dtype="float32", device="cpu", show_progress=False, **kwargs)
    return LightMoEEngine(ckpt, **common), LightMoEEngine(ckpt, async_output_processing=True, **common)


def run(engine, requests) -> dict[str, list[tuple]]:
    """Each request's outputs in the order step() returned them (without the timing metrics)."""
    ids = [engine.add_request(p, params, request_id=f"r{i}") for i, (p, params) in enumerate(requests)]
    seen: dict[str, list[tuple]] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen[o.request_id].append((o.text, o.token_ids, o.delta_text, o.delta_token_ids, o.finished,
                                       o.finish_reason, o.logprobs))
    return seen


def mixed_requests(reference: LightMoEEngine) -> list:
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    full = reference.generate_outputs([PROMPTS[1]], greedy)[0]
    requests = [
        (PROMPTS[0], greedy),
        (PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[full.token_ids[4]])),
        (PROMPTS[2], SamplingParams(max_tokens=1, temperature=0.0)),
        (PROMPTS[3], SamplingParams(max_tokens=9, temperature=0.8, seed=7, logprobs=True)),
        (PROMPTS[4], SamplingParams(max_tokens=14, temperature=0.0, logprobs=True)),
    ]
    assert len(full.text) >= 6, "the tiny tokenizer should give text to cut a stop string from"
    requests.append((PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0, stop=[full.text[3:6]])))
    return requests


def test_same_outputs_one_step_later(ckpt):
    sync, lagged = engines(ckpt)
    requests = mixed_requests(sync)
    want, got = run(sync, requests), run(lagged, requests)
    assert got == want
    assert want["r1"][-1][5] == "stop" and want["r5"][-1][5] == "stop" and want["r2"][-1][5] == "length"
    # the stop string ends the request at the first token whose text contains it, not a token later
    stop, stopped_ids = requests[5][1].stop[0], want["r5"][-1][1]
    assert stop in sync.tokenizer.decode(stopped_ids) and stop not in sync.tokenizer.decode(stopped_ids[:-1])
    assert not lagged.has_unfinished_requests() and lagged.block_manager.num_free_blocks == \
        sync.block_manager.num_free_blocks
    # the lag itself: a prefill step returns nothing yet; the next call returns its first tokens
    rid = lagged.add_request(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0))
    assert lagged.step() == []
    first = lagged.step()
    assert [o.request_id for o in first] == [rid] and len(first[0].token_ids) == 1
    while lagged.has_unfinished_requests():
        lagged.step()


def test_preemption_and_a_request_the_cache_cannot_hold(ckpt):
    # 12 blocks of 8 tokens cannot hold six growing sequences (preemption); max_tokens 200 outgrows the whole
    # cache, so the scheduler itself ends those requests with "length"
    sync, lagged = engines(ckpt, block_size=8, num_kv_blocks=12)
    requests = [(p, SamplingParams(max_tokens=40 if i % 2 else 200, temperature=0.0)) for i, p in enumerate(PROMPTS)]
    want, got = run(sync, requests), run(lagged, requests)
    assert sync.stats["preemptions"] > 0 and lagged.stats["preemptions"] > 0
    assert got == want
    assert any(outs[-1][5] == "length" and len(outs[-1][1]) < 200 for outs in want.values())
    assert lagged.block_manager.num_free_blocks == 12


def test_abort_drops_the_pending_output(ckpt):
    _, lagged = engines(ckpt)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    a = lagged.add_request(PROMPTS[0], params)
    b = lagged.add_request(PROMPTS[1], params)
    assert lagged.step() == []  # both first tokens pending
    assert lagged.abort(a)
    outputs = lagged.step()
    assert [o.request_id for o in outputs] == [b]
    while lagged.has_unfinished_requests():
        outputs = lagged.step()
        assert all(o.request_id == b for o in outputs)
    assert outputs[-1].finished and len(outputs[-1].token_ids) == 6
