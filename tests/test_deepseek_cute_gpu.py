"""A tiny DeepSeek-V2 (V2-Lite's layout: 16 heads, full-rank q_proj, L = 512, R = 64 as every DeepSeek) on the CuTe
backend, whose decode steps run MLA on kernels/mla_decode_attention.py, against the reference backend (bf16,
H100/H200), and CUDA-graph decode against eager decode on the CuTe backend.

Tokens are compared as tests/test_cute_engine_gpu.py does, and for the same reason: a tiny random model routes
with near-ties inside bf16 rounding, and one flipped expert choice moves later logits far beyond that noise, so
the CuTe engine runs with the reference's expert choices forced (assert_agree_with_forced_routing: every
forward's router logits, which see the attention output of every layer before, within 10% of their scale; a
token may differ only where the reference's margin between the two tokens is within the logit difference of
the two paths). V2-Lite's router (softmax top-k, no renormalisation, scaling 1) is the one the forced routing
reproduces exactly.
"""
import pytest
import torch

from light_moe import LightMoEEngine, SamplingParams
from tests.test_cute_engine_gpu import PROMPTS, assert_agree, assert_agree_with_forced_routing
from tests.tiny_models import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="CuTe kernels need sm_90")]

# a 240-token prompt: 8 tiles of the kernel, several splits
LONG_PROMPT = list(range(10, 250))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # DeepSeek's MLA shapes (the kernel takes L = 512, R = 64, h a multiple of 16); kernel-friendly H and I
    return make_tiny_checkpoint("deepseek_v2_lite", tmp_path_factory.mktemp("deepseek_v2_lite_mla"), kv_lora_rank=512,
                                qk_rope_head_dim=64, num_attention_heads=16, num_key_value_heads=16, hidden_size=128,
                                intermediate_size=128, moe_intermediate_size=64, max_position_embeddings=512)


COMMON = dict(dtype="bfloat16", device="cuda", show_progress=False, kv_cache_memory_bytes=64 << 20,
              async_scheduling=False)


def test_cute_backend_matches_reference(checkpoint, monkeypatch):
    from light_moe.kernels import mla_decode_attention as mla_kernel

    calls = []
    kernel = mla_kernel.mla_decode_attention

    def counted(q_abs, *args, **kwargs):
        calls.append(tuple(q_abs.shape))
        return kernel(q_abs, *args, **kwargs)

    monkeypatch.setattr(mla_kernel, "mla_decode_attention", counted)
    ref = LightMoEEngine(checkpoint, moe_backend="reference", enforce_eager=True, **COMMON)
    cute = LightMoEEngine(checkpoint, moe_backend="cute", enforce_eager=True, **COMMON)
    assert cute.ops.name == "cute"
    cfg = cute.model_config
    assert (cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim, cfg.num_heads) == (512, 64, 16)
    for prompt in PROMPTS + [LONG_PROMPT]:
        assert_agree_with_forced_routing(ref, cute, prompt, 24)
    # every decode step's MLA ran on the kernel (3 layers, one sequence per step); prefill stayed on the reference
    assert len(calls) >= 3 * 23 * len(PROMPTS) and all(shape[1:] == (16, 576) for shape in calls)
    fallbacks = {op for op, _ in cute.ops._logged}
    assert "MLA decode attention" not in fallbacks and "MLA prefill attention" in fallbacks, cute.ops._logged
    assert "MLA rotary + latent write" not in fallbacks, cute.ops._logged  # kernels/mla_rope_kv.py


def test_cuda_graph_decode_matches_eager(checkpoint):
    """Decode steps captured in CUDA graphs (batches padded to a bucket, the kernel's split workspace allocated in
    the capture) against eager steps, both on the CuTe backend."""
    params = SamplingParams(max_tokens=32, temperature=0.0)
    prompts = PROMPTS + [LONG_PROMPT]
    eager = LightMoEEngine(checkpoint, moe_backend="cute", enforce_eager=True, **COMMON)
    graphs = LightMoEEngine(checkpoint, moe_backend="cute", **COMMON)
    assert graphs.runner.decode_graphs is not None
    out_e = eager.generate_outputs(prompts, params)
    out_g = graphs.generate_outputs(prompts, params)
    assert len(graphs.runner.decode_graphs.graphs) > 0  # decode really replayed graphs
    assert "MLA decode attention" not in {op for op, _ in graphs.ops._logged}
    for prompt, a, b in zip(prompts, out_e, out_g):
        assert_agree(eager, graphs, prompt, a.token_ids, b.token_ids)
