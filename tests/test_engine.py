"""Engine behaviour on CPU: preemption and seeded sampling reproducibility, stop conditions,
streaming, chat, and clear errors for bad input that leave the engine usable."""
import pytest

from light_moe import LightMoEEngine, SamplingParams
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def engine(ckpt):
    return LightMoEEngine(ckpt, dtype="float32", device="cpu", show_progress=False)


PROMPTS = [list(range(10 + i, 30 + 3 * i)) for i in range(6)]


def test_preempted_requests_give_the_same_greedy_tokens(ckpt, engine):
    params = SamplingParams(max_tokens=40, temperature=0.0)
    expected = [o.token_ids for o in engine.generate_outputs(PROMPTS, params)]
    # 12 blocks of 8 tokens cannot hold six growing sequences: the scheduler must preempt
    small = LightMoEEngine(ckpt, dtype="float32", device="cpu", block_size=8, num_kv_blocks=12,
                           show_progress=False)
    got = [o.token_ids for o in small.generate_outputs(PROMPTS, params)]
    assert small.stats["preemptions"] > 0
    assert got == expected
    assert small.block_manager.num_free_blocks == 12


def test_seeded_sampling_is_independent_of_the_batch(engine):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate_outputs([PROMPTS[0]], params)[0].token_ids
    batch = engine.generate_outputs(PROMPTS[:4], params)
    mixed = engine.generate_outputs([PROMPTS[2], PROMPTS[0]], params)
    assert batch[0].token_ids == alone
    assert mixed[1].token_ids == alone
    again = engine.generate_outputs([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0.9, seed=99))
    assert again[0].token_ids != alone  # a different seed changes the draw


def test_stop_token_ids_and_strings(engine):
    params = SamplingParams(max_tokens=20, temperature=0.0)
    full = engine.generate_outputs([PROMPTS[1]], params)[0]
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    out = engine.generate_outputs([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0.0,
                                                               stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]
    text = full.text
    if len(text) >= 6:
        stop = text[3:6]
        out = engine.generate_outputs([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0.0, stop=[stop]))[0]
        assert out.finish_reason == "stop"
        assert out.text == text[: text.find(stop)]


def test_eos_finishes_unless_ignored(ckpt):
    engine = LightMoEEngine(ckpt, dtype="float32", device="cpu", show_progress=False)
    full = engine.generate_outputs([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0))[0]
    engine.eos_token_ids = frozenset({full.token_ids[3]})
    stopped = engine.generate_outputs([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 4
    ignored = engine.generate_outputs([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert ignored[0].token_ids == full.token_ids


def test_stream_concatenates_to_generate(engine):
    prompt = "def fibonacci(n):"
    text = engine.generate(prompt, max_tokens=16, temperature=0.0)
    assert isinstance(text, str)
    pieces = list(engine.stream(prompt, max_tokens=16, temperature=0.0))
    assert "".join(pieces) == text
    assert engine.generate([prompt, "hello"], max_tokens=16, temperature=0.0)[0] == text


def test_chat_uses_the_template(engine):
    ids = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert engine.tokenizer.decode(ids) == "<|user|>\nhi\n<|assistant|>\n"
    assert isinstance(engine.chat([{"role": "user", "content": "hi"}], max_tokens=4), str)


def test_logprobs_and_abort(engine):
    out = engine.generate_outputs([PROMPTS[0]], SamplingParams(max_tokens=5, temperature=0.0, logprobs=True))[0]
    assert len(out.logprobs) == 5 and all(lp <= 0.0 for lp in out.logprobs)
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.abort(rid)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


@pytest.mark.parametrize("bad, error", [
    (dict(prompts=""), ValueError),
    (dict(prompts=[]), ValueError),
    (dict(prompts="hello", max_tokens=0), ValueError),
    (dict(prompts="hello", max_tokens=-3), ValueError),
    (dict(prompts=list(range(5)) * 60), ValueError),  # 300 tokens > context window of 256
    (dict(prompts="hello", max_tokens=400), ValueError),  # prompt + max_tokens beyond the window
    (dict(prompts=[1, 2, 10_000]), ValueError),  # outside the vocabulary
    (dict(prompts=[[1, -2, 3]]), ValueError),  # below it
    (dict(prompts=[[1, True, 3]]), TypeError),  # a bool is not a token id
    (dict(prompts=[[1, 2.0, 3]]), TypeError),
    (dict(prompts=3.5), TypeError),
])
def test_bad_input_is_a_clear_error_and_the_engine_survives(engine, bad, error):
    args = dict(bad)
    prompts = args.pop("prompts")
    with pytest.raises(error):
        engine.generate(prompts, **args)
    assert not engine.has_unfinished_requests()
    assert engine.generate("hello", max_tokens=3, temperature=0.0) != ""  # still usable


def test_unknown_model_directory_and_parallel_sizes(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LightMoEEngine(tmp_path / "nope")
    with pytest.raises(ValueError, match="expert_parallel_size"):
        LightMoEEngine(ckpt, expert_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LightMoEEngine(ckpt, tensor_parallel_size=2)


def test_shutdown_frees_the_kv_cache_and_refuses_more_work(ckpt):
    engine = LightMoEEngine(ckpt, dtype="float32", device="cpu", show_progress=False)
    assert len(engine.generate_outputs([1, 2, 3], SamplingParams(max_tokens=2))[0].token_ids) == 2
    engine.shutdown()
    assert engine.runner.kv_caches == [] and engine.runner.decode_graphs is None
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate([1, 2, 3], SamplingParams(max_tokens=2))
    engine.shutdown()  # idempotent


def test_host_step_profile_script_times_every_phase():
    """scripts/profile_host_step.py (host cost per step, model stubbed out) runs and fills each phase."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    try:
        import profile_host_step
    finally:
        sys.path.pop(0)
    row = profile_host_step.measure(4, 3, 8, str(profile_host_step.DEMO_MODEL_DIR))
    for phase in ("schedule", "prepare", "sample", "update", "accept", "emit", "plan"):
        assert row[phase] > 0, phase
    assert row["step_ms"] > 0 and row["plan_kib"] > 0
    from light_moe.engine.request_state import RequestState
    assert RequestState.accept.__name__ == "accept"  # the script put the methods back


def test_token_id_prompts_accept_int_subclasses_but_not_bools(engine):
    import enum

    class Token(enum.IntEnum):
        A = 5

    assert engine.validate([1, Token.A, 3], SamplingParams(max_tokens=2))[1] == [1, Token.A, 3]
    with pytest.raises(TypeError):
        engine.validate([1, False], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"token ids \[-1\] are outside the vocabulary"):
        engine.validate([1, -1], SamplingParams(max_tokens=2))
