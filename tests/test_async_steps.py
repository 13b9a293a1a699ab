"""async_output_processing (a step's text and outputs made during the next step) and async_scheduling (a
step scheduled and launched before the last step's tokens are read back, its inputs filled on the device):
step() returns a step's outputs from the next call, and every request's sequence of outputs is the same as
the synchronous engine's, through stop tokens, stop strings, max_tokens, logprobs, seeded sampling, the
repetition penalty, preemption, a request the cache cannot hold, and aborts."""
import pytest

from light_moe import LightMoEEngine, SamplingParams
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [list(range(10 + i, 30 + 3 * i)) for i in range(6)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


MODES = {"outputs": dict(async_output_processing=True, async_scheduling=False),
         "scheduling": dict(async_scheduling=True),
         "both": dict(async_output_processing=True, async_scheduling=True)}


def engines(ckpt, mode: str, **kwargs):
    common = dict(dtype="float32", device="cpu", show_progress=False, **kwargs)
    return LightMoEEngine(ckpt, async_scheduling=False, **common), LightMoEEngine(ckpt, **MODES[mode], **common)


def run(engine, requests) -> dict[str, list[tuple]]:
    """Each request's outputs in the order step() returned them (without the timing metrics)."""
    ids = [engine.add_request(p, params, request_id=f"r{i}") for i, (p, params) in enumerate(requests)]
    seen: dict[str, list[tuple]] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen[o.request_id].append((o.text, o.token_ids, o.delta_text, o.delta_token_ids, o.finished,
                                       o.finish_reason, o.logprobs))
    return seen


def same(got: dict, want: dict) -> bool:
    """Equal outputs; logprobs within 1e-5: under async scheduling a request that ended with the last token
    still has its (wasted) row in the next step, and a batch of another shape may round the float32 logits
    of the others differently in the last bits."""
    if got.keys() != want.keys() or any(len(got[k]) != len(want[k]) for k in got):
        return False
    for k in got:
        for a, b in zip(got[k], want[k]):
            if a[:6] != b[:6] or (a[6] is None) != (b[6] is None):
                return False
            if a[6] is not None and a[6] != pytest.approx(b[6], abs=1e-5):
                return False
    return True


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


PENALTY = (PROMPTS[5], SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3))


@pytest.mark.parametrize("mode", list(MODES))
def test_same_outputs_one_step_later(ckpt, mode):
    sync, lagged = engines(ckpt, mode)
    requests = mixed_requests(sync)
    want, got = run(sync, requests), run(lagged, requests)
    assert same(got, want)
    # async scheduling really launched steps ahead (most of them: not the first, nor those after a fallback)
    assert (lagged.stats["steps_ahead"] > lagged.stats["steps"] // 2) == MODES[mode]["async_scheduling"]
    # with a repetition penalty (its sampling needs every token on the host: read back before each step)
    assert same(run(lagged, requests + [PENALTY]), run(sync, requests + [PENALTY]))
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


@pytest.mark.parametrize("mode", list(MODES))
def test_preemption_and_a_request_the_cache_cannot_hold(ckpt, mode):
    # 12 blocks of 8 tokens cannot hold six growing sequences (preemption); max_tokens 200 outgrows the whole
    # cache, so the scheduler itself ends those requests with "capacity"
    sync, lagged = engines(ckpt, mode, block_size=8, num_kv_blocks=12)
    requests = [(p, SamplingParams(max_tokens=40 if i % 2 else 200, temperature=0.0)) for i, p in enumerate(PROMPTS)]
    want, got = run(sync, requests), run(lagged, requests)
    assert sync.stats["preemptions"] > 0 and lagged.stats["preemptions"] > 0
    assert same(got, want)
    assert any(outs[-1][5] == "capacity" and len(outs[-1][1]) < 200 for outs in want.values())
    assert lagged.block_manager.num_free_blocks == 12


@pytest.mark.parametrize("mode", list(MODES))
def test_abort_drops_the_pending_output(ckpt, mode):
    _, lagged = engines(ckpt, mode)
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


@pytest.mark.parametrize("mode", list(MODES))
def test_requests_arriving_mid_generation_in_prefill_chunks(ckpt, mode):
    """A request that arrives while others decode is prefilled in chunks (16 tokens per step) alongside their
    decode rows, whose inputs are placeholders under async scheduling: one flattened batch of both kinds."""
    sync, lagged = engines(ckpt, mode, max_num_batched_tokens=16)
    late = (list(range(40, 90)), SamplingParams(max_tokens=6, temperature=0.0))
    results = []
    for engine in (sync, lagged):
        seen: dict[str, list[tuple]] = {}
        for i, p in enumerate(PROMPTS[:3]):
            engine.add_request(p[:8], SamplingParams(max_tokens=20, temperature=0.0), request_id=f"r{i}")
        calls = 0
        while engine.has_unfinished_requests():
            if calls == 4:
                engine.add_request(*late, request_id="late")
            for o in engine.step():
                seen.setdefault(o.request_id, []).append((o.token_ids, o.finished, o.finish_reason))
            calls += 1
        results.append(seen)
    assert results[1] == results[0]
    assert results[0]["late"][-1] == (results[0]["late"][-1][0], True, "length")
    assert len(results[0]["late"][-1][0]) == 6
