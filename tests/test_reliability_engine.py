"""One request's failure is that request's alone (issue 19): a sampler or text error in the engine step ends
the request that caused it with finish_reason "error", frees its KV blocks, and the other requests of the
same steps finish exactly as they would have alone. A request the KV cache cannot hold ends with
"capacity", never "length"."""
import pytest

import light_moe.engine.sampler as sampler_module
from light_moe import LightMoEEngine, SamplingParams
from light_moe.engine.request_state import RequestState
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = {"a": "def fibonacci(n):", "b": "The quick brown fox", "c": "import os\nimport sys",
           "long": "Hello", "short": "Mixture of experts"}
MODES = {"sync": dict(async_scheduling=False), "async": dict(async_scheduling=True)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=512)


def _engine(ckpt, **kwargs) -> LightMoEEngine:
    return LightMoEEngine(ckpt, dtype="float32", device="cpu", show_progress=False, **kwargs)


def _run(engine: LightMoEEngine, requests: dict[str, SamplingParams]) -> dict:
    for rid, params in requests.items():
        engine.add_request(PROMPTS[rid], params, request_id=rid)
    final = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    assert engine.block_manager.usage == 0 and not engine.scheduler.has_unfinished_requests()
    return final


GOOD = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_sampler_error_fails_only_its_request(ckpt, mode, monkeypatch):
    engine = _engine(ckpt, **MODES[mode])
    alone = _run(engine, {"a": GOOD, "c": SEEDED})
    real = sampler_module._filter

    def filter_with_a_bug(logits, rows):  # where the overflow was; stands for a value the bounds missed
        if any(row.params.extra.get("poison") for row in rows):
            raise OverflowError("Overflow when unpacking long long")
        return real(logits, rows)

    monkeypatch.setattr(sampler_module, "_filter", filter_with_a_bug)
    poisoned = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, extra={"poison": True})
    got = _run(engine, {"a": GOOD, "b": poisoned, "c": SEEDED})
    assert got["b"].finish_reason == "error" and "Overflow" in got["b"].error
    for rid in ("a", "c"):  # the seeded row drew as it would have alone
        assert got[rid].token_ids == alone[rid].token_ids and got[rid].finish_reason == "length"
    # the engine goes on serving
    assert _run(engine, {"a": GOOD})["a"].token_ids == alone["a"].token_ids


@pytest.mark.parametrize("mode", list(MODES))
def test_a_text_error_fails_only_its_request(ckpt, mode, monkeypatch):
    engine = _engine(ckpt, **MODES[mode])
    alone = _run(engine, {"a": GOOD, "c": GOOD})
    real_emit = RequestState.emit

    def emit(self, finish_reason, now):
        if self.request.request_id == "b" and self.request.num_output_tokens >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated detokenizer failure")
        return real_emit(self, finish_reason, now)

    monkeypatch.setattr(RequestState, "emit", emit)
    got = _run(engine, {"a": GOOD, "b": GOOD, "c": GOOD})
    assert got["b"].finish_reason == "error" and "simulated detokenizer failure" in got["b"].error
    assert len(got["b"].token_ids) == 2  # what it had emitted before the failure
    assert got["a"].token_ids == alone["a"].token_ids and got["c"].token_ids == alone["c"].token_ids


def test_generate_raises_for_a_failed_request(ckpt, monkeypatch):
    engine = _engine(ckpt)
    monkeypatch.setattr(RequestState, "accept", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="failed: RuntimeError: boom"):
        engine.generate(PROMPTS["a"], max_tokens=4)
    assert engine.block_manager.usage == 0 and not engine.has_unfinished_requests()


def test_a_request_the_kv_cache_cannot_hold_ends_with_capacity(ckpt):
    """The cache (4 blocks of 16 tokens) is smaller than the context window (512): a request that outgrows it
    ends with "capacity" after the tokens that fit, distinguishable from max_tokens's "length"."""
    engine = _engine(ckpt, num_kv_blocks=4, block_size=16)
    got = _run(engine, {"long": SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                        "short": SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)})
    assert got["long"].finish_reason == "capacity" and 0 < len(got["long"].token_ids) < 200
    assert got["short"].finish_reason == "length" and len(got["short"].token_ids) == 5
