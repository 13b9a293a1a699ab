"""DeepSeek-V2 / V2-Lite / V3 against transformers on tiny random checkpoints (float32, CPU): greedy tokens
through continuous batching with chunked prefill identical to transformers' generate, prefill logits within
1e-4 relative; the pieces checked on their own: YaRN tables and softmax scale, the routers (grouped, sigmoid
with correction bias), the absorbed decode path of MLA against the decompressing one, the latent-only cache."""
import pytest
import torch

from light_moe import LightMoEEngine
from light_moe.executor.model_runner import kv_block_bytes
from light_moe.layers.mla import MLAttention
from light_moe.ops.attention import AttentionMetadata, paged_mla_attention
from light_moe.ops.backend import ReferenceOps
from tests.test_fidelity import assert_greedy_matches_transformers, assert_prefill_logits_match_transformers, hf_greedy
from tests.tiny_models import DEEPSEEK_FAMILIES, make_tiny_checkpoint


@pytest.fixture(scope="module", params=list(DEEPSEEK_FAMILIES))
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def test_greedy_tokens_match_transformers(checkpoint):
    engine = assert_greedy_matches_transformers(checkpoint)
    cfg = engine.model_config
    # the cache holds the latent and the rotary key only: one [blocks, block_size, L + R] tensor per layer
    assert all(len(layer) == 1 and layer[0].shape[-1] == cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
               for layer in engine.runner.kv_caches)
    assert kv_block_bytes(engine.model, 16, torch.float32) == cfg.num_layers * 16 * (32 + 8) * 4
    assert [layer.is_moe for layer in engine.model.model.layers] == [False, True, True]  # first_k_dense_replace


def test_prefill_logits_match_transformers(checkpoint):
    assert_prefill_logits_match_transformers(checkpoint)


def test_v3_without_rope_interleave_matches_transformers(tmp_path):
    assert_greedy_matches_transformers(make_tiny_checkpoint("deepseek_v3", tmp_path, rope_interleave=False))


def test_yarn_tables_and_softmax_scale_match_transformers(tmp_path):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    path = make_tiny_checkpoint("deepseek_v3", tmp_path)
    engine = LightMoEEngine(path, dtype="float32", device="cpu", show_progress=False)
    hf_model, _ = hf_greedy(path, [])
    rotary = DeepseekV3RotaryEmbedding(hf_model.config)
    positions = torch.arange(256).view(1, -1)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    ours = engine.model.model.layers[0].self_attn
    assert isinstance(ours, MLAttention)
    assert torch.equal(ours.rotary.cos, cos[0]) and torch.equal(ours.rotary.sin, sin[0])
    default_inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    default_cos = torch.cat([torch.outer(positions[0].float(), default_inv_freq)] * 2, -1).cos()
    assert (cos[0] - default_cos).abs().max() > 0.1  # YaRN really changed the tables
    assert ours.scale == hf_model.model.layers[0].self_attn.scaling != (16 + 8) ** -0.5


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_router_matches_transformers(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path)
    engine = LightMoEEngine(path, dtype="float32", device="cpu", show_progress=False)
    hf_model, _ = hf_greedy(path, [])
    block, hf_gate = engine.model.model.layers[1].mlp, hf_model.model.layers[1].mlp.gate
    x = torch.randn(64, 64) * 3
    with torch.no_grad():
        _, hf_weights, hf_ids = hf_gate(x)
    variant = block._router_variant()
    weights, ids, counts = ReferenceOps().router(x, block.gate.weight, block.top_k, block.renormalize, **variant)
    hf_ids, order = hf_ids.sort(dim=-1)
    ids, ours = ids.long().sort(dim=-1)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights.gather(1, ours), hf_weights.gather(1, order), rtol=1e-6, atol=1e-7)
    assert counts.sum() == 64 * block.top_k
    # the group limit is real: every token's experts lie in at most topk_group of the n_group groups
    spec = variant["spec"]
    groups = ids // (block.num_experts // spec.n_group)
    assert max(len(set(row)) for row in groups.tolist()) <= spec.topk_group
    if family == "deepseek_v3":  # and the correction bias changes the choice
        no_bias = ReferenceOps().router(x, block.gate.weight, block.top_k, block.renormalize, spec=spec)[1]
        assert not torch.equal(no_bias.long().sort(dim=-1)[0], ids)


def test_absorbed_decode_equals_decompressed_attention():
    torch.manual_seed(0)
    heads, nope, rope, v_dim, lora, block_size = 4, 16, 8, 12, 32, 4
    ctx_lens = [5, 11, 1]
    cache = torch.randn(16, block_size, lora + rope)
    tables = torch.tensor([[3, 7, 0], [1, 2, 9], [5, 0, 0]], dtype=torch.int32)
    kv_b = torch.randn(heads * (nope + v_dim), lora) * 0.2
    q = torch.randn(3, heads, nope + rope)

    def meta(query_lens):
        return AttentionMetadata.for_lengths(ctx_lens, query_lens, tables)

    decode = paged_mla_attention(q, cache, kv_b, meta([1, 1, 1]), 0.3)  # absorbed
    # the same last rows through the decompressing path: a step with two query rows for the middle sequence
    q2 = torch.cat([q[:1], torch.randn(1, heads, nope + rope), q[1:]])
    naive = paged_mla_attention(q2, cache, kv_b, meta([1, 2, 1]), 0.3)
    torch.testing.assert_close(decode, naive[[0, 2, 3]], rtol=1e-5, atol=1e-5)
    # and against plain attention over the decompressed keys of sequence 1
    latents = cache[tables[1].long()].reshape(-1, lora + rope)[: ctx_lens[1]]
    kv = (latents[:, :lora] @ kv_b.t()).view(-1, heads, nope + v_dim)
    k = torch.cat([kv[..., :nope], latents[:, None, lora:].expand(-1, heads, rope)], -1)
    probs = torch.softmax(torch.einsum("hd,chd->hc", q[1], k) * 0.3, -1)
    torch.testing.assert_close(decode[1], torch.einsum("hc,chv->hv", probs, kv[..., nope:]), rtol=1e-5, atol=1e-5)


def test_config_errors_name_their_field(tmp_path):
    from light_moe.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    base = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32)
    with pytest.raises(ValueError, match="topk_method"):
        DeepseekV2ForCausalLM.parse_config({**base, "topk_method": "noaux_tc"})
    with pytest.raises(ValueError, match="n_group"):
        DeepseekV3ForCausalLM.parse_config({**base, "n_group": 3, "topk_group": 1})
    with pytest.raises(ValueError, match="topk_group"):
        DeepseekV3ForCausalLM.parse_config({**base, "n_group": 4, "topk_group": 5})
    cfg = DeepseekV3ForCausalLM.parse_config({**base, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1})
    assert cfg.moe_layers == (1,) and cfg.router.correction_bias and cfg.mla.q_lora_rank == 1536


def test_cute_backend_routes_cpu_tensors_on_the_reference_and_unprepared_weights_stay_out_of_graphs():
    pytest.importorskip("cutlass")
    from light_moe.config import RouterConfig
    from light_moe.ops.cute_backend import CuteOps

    torch.manual_seed(0)
    x, gate = torch.randn(8, 64), torch.randn(16, 64)
    spec = RouterConfig(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", correction_bias=True,
                        routed_scaling_factor=2.5)
    bias = torch.randn(16) * 0.1
    ops = CuteOps()
    got = ops.route(x, gate, 4, True, spec=spec, correction_bias=bias)
    expected = ReferenceOps().route(x, gate, 4, True, spec=spec, correction_bias=bias)
    for a, b in zip(got[:3], expected[:3]):
        assert torch.equal(a, b)
    assert got[3] is None
    w13, w2 = torch.zeros(16, 64, 64, dtype=torch.bfloat16), torch.zeros(16, 64, 32, dtype=torch.bfloat16)
    assert not ops.graph_safe(gate.bfloat16(), 4, w13, w2, spec=spec)
