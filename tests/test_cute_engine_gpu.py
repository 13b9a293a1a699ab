"""The whole engine on the CuTe backend (H100/H200, bf16) against the reference backend, and CUDA-graph
decode against eager decode. Tokens must agree; a divergence is accepted only where it is a near-tie:
the reference's margin between the two tokens is within the measured logit difference of the two
paths at that position (bf16 rounding in a different order can flip only such a choice)."""
import pytest
import torch

from light_moe import LightMoEEngine, SamplingParams
from tests.test_fidelity import engine_prefill_logits
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.gpu

PROMPTS = [[7, 3, 99], list(range(20, 31)), list(range(100, 157)), list(range(200, 240))]


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def checkpoint(request, tmp_path_factory):
    # kernel-friendly sizes: H and I multiples of 64, head_dim 64 (the attention and rotary kernels take 64 / 128)
    extra = dict(hidden_size=256, intermediate_size=128)
    if request.param == "qwen3_moe":
        extra.update(hidden_size=128, moe_intermediate_size=128, head_dim=64)
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), **extra)


def assert_agree(engine_a, engine_b, prompt, tokens_a, tokens_b):
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        if a != b:
            ids = prompt + tokens_a[:i]
            la = engine_prefill_logits(engine_a, ids)[-1].float()
            lb = engine_prefill_logits(engine_b, ids)[-1].float()
            noise = (la - lb).abs().max().item()
            margin = abs((lb[b] - lb[a]).item())
            assert margin <= 2 * noise, f"token {i}: {a} vs {b}, margin {margin:.4f}, path difference {noise:.4f}"
            return
    assert len(tokens_a) == len(tokens_b)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_cute_backend_matches_reference(checkpoint):
    params = SamplingParams(max_tokens=32, temperature=0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20)
    ref = LightMoEEngine(checkpoint, moe_backend="reference", **common)
    cute = LightMoEEngine(checkpoint, moe_backend="cute", enforce_eager=True, **common)
    assert cute.ops.name == "cute"
    for prompt, a, b in zip(PROMPTS, ref.generate_outputs(PROMPTS, params), cute.generate_outputs(PROMPTS, params)):
        assert_agree(ref, cute, prompt, a.token_ids, b.token_ids)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_cuda_graph_decode_matches_eager(checkpoint):
    params = SamplingParams(max_tokens=40, temperature=0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  moe_backend="cute")
    sync = dict(async_scheduling=False)
    eager = LightMoEEngine(checkpoint, enforce_eager=True, **sync, **common)
    graphs = LightMoEEngine(checkpoint, **sync, **common)
    assert graphs.runner.decode_graphs is not None and eager.runner.decode_graphs is None
    out_e = eager.generate_outputs(PROMPTS, params)
    out_g = graphs.generate_outputs(PROMPTS, params)
    assert len(graphs.runner.decode_graphs.graphs) > 0  # decode really replayed graphs
    for prompt, a, b in zip(PROMPTS, out_e, out_g):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
    # batch sizes that need padding (3 -> bucket 4) and a second run reusing captured graphs
    again = graphs.generate_outputs(PROMPTS[:3], params)
    for prompt, a, b in zip(PROMPTS, out_e, again):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
    # async output processing / async scheduling: the graphs' tokens, one step later (async scheduling: the
    # decode graphs' input ids filled on the device from the last step's sampled tokens). bf16: a wasted row
    # of an ended request changes the next batch's shape, so near-ties are allowed as above
    graphs.shutdown()
    for flags in (dict(async_output_processing=True, **sync), dict(async_scheduling=True)):  # both name the key
        lagged = LightMoEEngine(checkpoint, **flags, **common)
        out_a = lagged.generate_outputs(PROMPTS, params)
        assert len(lagged.runner.decode_graphs.graphs) > 0
        for prompt, a, b in zip(PROMPTS, out_e, out_a):
            assert_agree(eager, lagged, prompt, a.token_ids, b.token_ids)
        if flags["async_scheduling"]:
            assert lagged.stats["steps_ahead"] > lagged.stats["steps"] // 2
        lagged.shutdown()


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_w4a16_cute_backend_matches_the_dequantising_reference(checkpoint):
    """Same RTN-quantized experts on both sides: the W4A16 kernel against the reference that
    dequantises per expert; CUDA-graph decode on the CuTe side."""
    from light_moe.kernels.w4a16_layout import W4A16Weights

    params = SamplingParams(max_tokens=24, temperature=0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  quantization="w4a16")
    ref = LightMoEEngine(checkpoint, moe_backend="reference", **common)
    cute = LightMoEEngine(checkpoint, moe_backend="cute", **common)
    assert all(isinstance(b.prepared[0], W4A16Weights) for b in cute.model.moe_blocks())
    assert cute.runner.decode_graphs is not None
    for prompt, a, b in zip(PROMPTS, ref.generate_outputs(PROMPTS, params), cute.generate_outputs(PROMPTS, params)):
        assert_agree(ref, cute, prompt, a.token_ids, b.token_ids)


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
def test_piecewise_prefill_graphs_match_eager(checkpoint):
    """Prefill and mixed steps replayed from piecewise graphs (executor/prefill_graphs.py: pieces split at the
    eager attention) against the eager engine: whole prompts in one step, prompts chunked over several steps
    (a small token budget), and decodes sharing steps with prefill chunks; a second round reuses the graphs
    with other token counts in the same buckets."""
    params = SamplingParams(max_tokens=24, temperature=0.0)
    common = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
                  moe_backend="cute", async_scheduling=False)
    eager = LightMoEEngine(checkpoint, enforce_eager=True, **common)
    for budget in (2048, 48):  # 48: the 57-token prompt is chunked, other requests decode beside it
        graphs = LightMoEEngine(checkpoint, max_num_batched_tokens=budget, **common)
        assert graphs.runner.prefill_graphs is not None and eager.runner.prefill_graphs is None
        out_e = eager.generate_outputs(PROMPTS, params)
        out_g = graphs.generate_outputs(PROMPTS, params)
        assert graphs.runner.prefill_graphs.captured, "no prefill step was replayed from graphs"
        fallbacks = {op for op, _ in graphs.ops._logged}
        assert not fallbacks & {"decode attention", "prefill attention", "rotary + KV write", "RMSNorm"}, fallbacks
        for prompt, a, b in zip(PROMPTS, out_e, out_g):
            assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
        shorter = [p[: max(1, len(p) - 5)] for p in PROMPTS]
        for prompt, a, b in zip(shorter, eager.generate_outputs(shorter, params),
                                graphs.generate_outputs(shorter, params)):
            assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
        graphs.shutdown()
