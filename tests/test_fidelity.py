"""Model fidelity against transformers on tiny random checkpoints of every family (float32, CPU):
greedy tokens through continuous batching with chunked prefill are identical to transformers'
generate, and prefill logits through the paged-cache path match within 1e-4 relative."""
import pytest
import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.engine.request import Request
from light_moe.engine.scheduler import ScheduledRequest
from tests.tiny_models import FAMILIES, make_tiny_checkpoint

PROMPTS = [[7, 3, 99], list(range(20, 31)), [5] * 2 + list(range(100, 127)), list(range(200, 247))]
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def hf_greedy(path, prompts, device="cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return model, outs


def assert_greedy_matches_transformers(path) -> LightMoEEngine:
    """Greedy tokens of the engine (float32, CPU) equal transformers' generate; returns the engine."""
    # a small token budget forces chunked prefill and mixes prefill chunks with decodes
    engine = LightMoEEngine(path, dtype="float32", device="cpu", max_num_batched_tokens=16, show_progress=False)
    outputs = engine.generate_outputs(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    _, expected = hf_greedy(path, PROMPTS)
    for out, exp in zip(outputs, expected):
        assert out.token_ids == exp
        assert out.finish_reason == "length"
    assert engine.stats["max_batch_size"] > 1  # requests really shared steps
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    return engine


def test_greedy_tokens_match_transformers(checkpoint):
    assert_greedy_matches_transformers(checkpoint)


def engine_prefill_logits(engine, prompt: list[int]) -> torch.Tensor:
    """Logits of every prompt position through the paged-cache path of the engine. [N, V]"""
    request = Request("probe", prompt, SamplingParams())
    assert engine.block_manager.allocate_slots(request, len(prompt))
    try:
        ids, positions, meta, _ = engine.runner.prepare([ScheduledRequest(request, len(prompt), True, True)])
        with torch.inference_mode():
            hidden = engine.model(ids, positions, engine.runner.kv_caches, meta)
            return engine.model.compute_logits(hidden)
    finally:
        engine.block_manager.free(request)


def assert_prefill_logits_match_transformers(path) -> None:
    """The engine's prefill logits of one prompt within 1e-4 (relative L2) of transformers' (float32, CPU)."""
    engine = LightMoEEngine(path, dtype="float32", device="cpu", show_progress=False)
    hf_model, _ = hf_greedy(path, [])
    prompt = PROMPTS[3]
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0].float()
    logits = engine_prefill_logits(engine, prompt)
    rel = (logits - expected).norm() / expected.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_prefill_logits_match_transformers(checkpoint):
    assert_prefill_logits_match_transformers(checkpoint)
