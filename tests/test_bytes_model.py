"""The decode bytes model (light_moe/bench/bytes_model.py) against sums worked out by hand for tiny
models: a Qwen2-MoE (dense layer, shared expert and its gate, q/k/v bias), a tied-embedding Mixtral,
and W4A16 experts (int4 weights, group scales, zero points); plus the experts-hit formula against
a simulation of uniform random top-k routing."""
import json

import pytest
import torch

from light_moe.bench.bytes_model import (
    bound_tok_s,
    decode_step_bytes,
    expected_experts_hit,
    model_bytes,
    prefill_bytes,
    tensor_bytes,
)
from light_moe.models.loader import build_model
from light_moe.ops.select import select_backend
from light_moe.quant.scheme import W4A16Config

F32 = 4


def _build(tmp_path, hf: dict, quantization=None):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ops, _ = select_backend("reference", torch.device("cpu"))
    return build_model(tmp_path, ops, torch.float32, torch.device("cpu"), load_format="dummy", progress=False,
                       quantization=quantization)


QWEN2 = dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=320, hidden_size=64,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
             shared_expert_intermediate_size=80, decoder_sparse_step=1, mlp_only_layers=[1], torch_dtype="float32")


def test_qwen2_moe_bytes_by_hand(tmp_path):
    mb = model_bytes(_build(tmp_path, QWEN2), kv_element_size=F32)
    h, d, heads, kv_heads, vocab = 64, 16, 4, 2, 320
    attention = (h * heads * d + heads * d) + 2 * (h * kv_heads * d + kv_heads * d) + heads * d * h  # q, k, v bias
    norms = 2 * h
    moe_layer = attention + norms + 8 * h + 3 * h * 80 + h  # router gate, shared expert, its gate
    dense_layer = attention + norms + 3 * h * 96
    expected_dense = (2 * moe_layer + dense_layer + h + vocab * h) * F32  # final norm, lm_head
    assert mb.dense == expected_dense
    assert mb.row_bytes == h * F32 + 2 * d * F32  # embedding row + rotary cos and sin rows (float32)
    assert mb.expert_bytes == ((2 * 48 * h + h * 48) * F32,) * 2  # two MoE layers
    assert mb.kv_token_bytes == 2 * 3 * kv_heads * d * F32
    assert (mb.num_experts, mb.top_k) == (8, 2)

    batch, context = 5, 100.5
    step = decode_step_bytes(mb, batch, context)
    hit = 8 * (1 - (1 - 2 / 8) ** batch)
    assert step.experts_hit == pytest.approx((hit, hit))
    assert step.experts == pytest.approx(2 * hit * mb.expert_bytes[0])
    assert step.kv_read == round(batch * context * 2 * 3 * kv_heads * d * F32)
    assert step.kv_write == batch * 2 * 3 * kv_heads * d * F32
    assert step.rows == batch * mb.row_bytes
    assert step.total == pytest.approx(expected_dense + step.rows + step.experts + step.kv_read + step.kv_write)
    assert bound_tok_s(batch, step, 3e12) == pytest.approx(batch * 3e12 / step.total)
    # measured routing per layer replaces the uniform estimate
    measured = decode_step_bytes(mb, batch, context, experts_hit=[3, 6])
    assert measured.experts == 9 * mb.expert_bytes[0]
    with pytest.raises(ValueError, match="2 MoE layers"):
        decode_step_bytes(mb, batch, context, experts_hit=[3])
    # a prompt alone: all weights it touches, its KV written, nothing read from the cache
    prompt = prefill_bytes(mb, 64)
    assert prompt.kv_read == 0 and prompt.kv_write == 64 * mb.kv_token_bytes
    assert prompt.experts == pytest.approx(2 * expected_experts_hit(8, 2, 64) * mb.expert_bytes[0])


MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=256, hidden_size=64,
               intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True,
               torch_dtype="float32")


def test_tied_embedding_counts_the_lm_head_whole_and_the_rows_per_token(tmp_path):
    mb = model_bytes(_build(tmp_path, MIXTRAL), kv_element_size=2)
    h, d = 64, 16
    attention = h * h + 2 * h * 2 * d + h * h
    assert mb.dense == (2 * (attention + 2 * h + 4 * h) + h + 256 * h) * F32  # lm_head = the tied embedding
    assert mb.row_bytes == h * F32 + 2 * d * F32
    assert mb.kv_token_bytes == 2 * 2 * 2 * d * 2  # KV elements of 2 bytes


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_expert_bytes_are_the_stored_tensors(tmp_path, symmetric):
    model = _build(tmp_path, {**MIXTRAL, "tie_word_embeddings": False}, W4A16Config(group_size=32, symmetric=symmetric))
    mb = model_bytes(model, kv_element_size=2)
    h, inter, g = 64, 96, 32
    w13 = 2 * inter * (h // 8) * 4 + 2 * inter * (h // g) * F32  # int32 words of 8 nibbles + fp32 scales
    w2 = h * (inter // 8) * 4 + h * (inter // g) * F32
    if not symmetric:
        w13 += 2 * inter * (h // g)  # uint8 zero points
        w2 += h * (inter // g)
    assert mb.expert_bytes == (w13 + w2,) * 2
    fp32_expert = (2 * inter * h + h * inter) * F32
    assert mb.expert_bytes[0] < 0.2 * fp32_expert  # 4 bits + a 32-bit scale per 32 weights: ~0.16x
    # the quantized experts are not counted again as dense
    attention = h * h + 2 * h * 2 * 16 + h * h
    assert mb.dense == (2 * (attention + 2 * h + 4 * h) + h + 256 * h) * F32


def test_tensor_bytes_walks_dataclasses_and_tuples():
    from light_moe.quant.w4a16 import QuantizedWeight

    q = QuantizedWeight(torch.zeros(2, 16, 4, dtype=torch.int32), torch.zeros(2, 16, 1, dtype=torch.bfloat16),
                        torch.zeros(2, 16, 1, dtype=torch.uint8), 32)
    assert tensor_bytes(q) == 2 * 16 * 4 * 4 + 2 * 16 * 2 + 2 * 16
    assert tensor_bytes((torch.zeros(3, dtype=torch.float16), None, 7)) == 6


@pytest.mark.parametrize("num_experts,top_k,tokens", [(8, 2, 1), (8, 2, 4), (8, 2, 16), (64, 6, 10), (128, 8, 3)])
def test_experts_hit_matches_uniform_random_routing(num_experts, top_k, tokens):
    gen = torch.Generator().manual_seed(0)
    trials = 4000
    picks = torch.rand(trials, tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices  # k distinct each
    hit = torch.zeros(trials, num_experts, dtype=torch.bool)
    hit.scatter_(1, picks.reshape(trials, -1), True)
    simulated = hit.sum(1).float().mean().item()
    expected = expected_experts_hit(num_experts, top_k, tokens)
    assert expected == pytest.approx(simulated, rel=0.02)
    assert expected_experts_hit(num_experts, top_k, 1) == pytest.approx(top_k)
    assert expected_experts_hit(num_experts, top_k, 10_000) == pytest.approx(num_experts)


def test_a_prepared_layout_outside_the_parameters_counts_once(tmp_path):
    """A module may hold its weight as a backend layout in `prepared` (QuantizedLinear does) and free the
    parameter, or keep both as one memory: counted once either way."""
    model = _build(tmp_path, QWEN2)
    before = model_bytes(model, kv_element_size=F32).dense
    o_proj = model.model.layers[0].self_attn.o_proj
    o_proj.prepared = (o_proj.weight,)  # the reference keeps the canonical tensor: no new memory
    assert model_bytes(model, kv_element_size=F32).dense == before
    o_proj.prepared = (torch.zeros(10, dtype=torch.int32), None)
    weight_bytes = o_proj.weight.numel() * F32
    o_proj.weight.data = o_proj.weight.data.new_empty(0)  # the parameter freed, the layout holds the weight
    assert model_bytes(model, kv_element_size=F32).dense == before - weight_bytes + 40
