"""gpt-oss against transformers' GptOssForCausalLM on tiny random checkpoints (float32, CPU): greedy tokens through
continuous batching with chunked prefill identical to transformers' generate, prefill logits within 1e-4 relative,
with sinks, alternating sliding-window (8, crossed by the prompts) / full layers, biased router and experts and the
clamped SwiGLU (limit 1.0, so it binds), each shown to matter; an MXFP4 checkpoint written by the test (the tiny
model's experts quantized with quant/mxfp4.py) loads and matches transformers on transformers' own dequantisation
of it; the pieces on their own (YaRN tables, the expert block, the MXFP4 codec, the reference attention with sinks
and a window, the uncached profile attention); the CuTe backend hands gpt-oss's experts to the grouped GEMMs."""
import json
import logging
import math
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from light_moe import LightMoEEngine, SamplingParams
from light_moe.config import ExpertConfig
from light_moe.ops import reference
from light_moe.ops.attention import AttentionMetadata
from light_moe.ops.backend import ReferenceOps
from light_moe.quant import mxfp4
from tests.test_fidelity import (
    NEW_TOKENS,
    PROMPTS,
    assert_greedy_matches_transformers,
    assert_prefill_logits_match_transformers,
    engine_prefill_logits,
    hf_greedy,
)
from tests.tiny_models import make_tiny_checkpoint

SPEC = ExpertConfig(activation="clamped_swiglu", alpha=1.702, limit=1.0, bias=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))


def test_greedy_tokens_match_transformers(checkpoint):
    engine = assert_greedy_matches_transformers(checkpoint)
    cfg = engine.model_config
    assert cfg.sliding_window_layers == (0, 2) and cfg.layer_window == 8 and cfg.sliding_window is None
    attn = [layer.self_attn for layer in engine.model.model.layers]
    assert [a.sliding_window for a in attn] == [8, None, 8] and all(a.sinks is not None for a in attn)
    assert engine.config.max_model_len == 256  # the window does not cap the context (full layers see it all)


def test_prefill_logits_match_transformers(checkpoint):
    assert_prefill_logits_match_transformers(checkpoint)


def _relative_error(engine, hf_model, prompt) -> float:
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0]
    logits = engine_prefill_logits(engine, prompt)
    return ((logits - expected).norm() / expected.norm()).item()


def _without_sinks(model):
    for layer in model.model.layers:
        layer.self_attn.sinks.data.zero_()


def _without_window(model):
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None


def _without_clamp(model):
    for block in model.moe_blocks():
        block.expert_spec = ExpertConfig(activation="clamped_swiglu", alpha=1.702, limit=1e6, bias=True)


def _without_expert_biases(model):
    for block in model.moe_blocks():
        block.local_biases = tuple(torch.zeros_like(b) for b in block.local_biases)


def _without_router_bias(model):
    for block in model.moe_blocks():
        block.gate.bias.data.zero_()


def _gate_up_interleaved(model):  # read gate_up_proj's columns as [gate; up] halves instead of interleaved
    for block in model.moe_blocks():
        w13, inter = block.experts.w13.data, block.experts.w13.shape[1] // 2
        w13.copy_(torch.stack((w13[:, :inter], w13[:, inter:]), dim=2).reshape(w13.shape))


@pytest.mark.parametrize("change", [_without_sinks, _without_window, _without_clamp, _without_expert_biases,
                                    _without_router_bias, _gate_up_interleaved])
def test_each_feature_matters(checkpoint, change):
    """The fidelity tests can fail: dropping any one gpt-oss feature moves the logits far from transformers'."""
    engine = LightMoEEngine(checkpoint, dtype="float32", device="cpu", show_progress=False)
    hf_model, _ = hf_greedy(checkpoint, [])
    assert _relative_error(engine, hf_model, PROMPTS[3]) < 1e-4
    change(engine.model)
    assert _relative_error(engine, hf_model, PROMPTS[3]) > 1e-2


def test_yarn_tables_match_transformers(checkpoint):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    engine = LightMoEEngine(checkpoint, dtype="float32", device="cpu", show_progress=False)
    hf_model, _ = hf_greedy(checkpoint, [])
    cos, sin = GptOssRotaryEmbedding(hf_model.config)(torch.zeros(1), torch.arange(256).view(1, -1))
    ours = engine.model.model.layers[0].self_attn
    half = ours.head_dim // 2  # transformers' gpt-oss tables hold each angle once, ours twice (rotate-half)
    assert torch.equal(ours.rotary.cos[:, :half], cos[0]) and torch.equal(ours.rotary.cos[:, half:], cos[0])
    assert torch.equal(ours.rotary.sin[:, :half], sin[0])
    assert cos[0, 0, 0].item() == pytest.approx(0.1 * math.log(4) + 1)  # YaRN's attention factor is in the tables
    assert ours.scale == hf_model.model.layers[0].self_attn.scaling == 16 ** -0.5


def test_expert_block_matches_transformers_on_large_activations(checkpoint):
    """The router (bias, softmax over the top-k logits) and the experts (biases, clamped SwiGLU) of one layer on
    inputs large enough that most gate / up values are clamped."""
    engine = LightMoEEngine(checkpoint, dtype="float32", device="cpu", show_progress=False)
    hf_model, _ = hf_greedy(checkpoint, [])
    torch.manual_seed(1)
    x = torch.randn(40, 64) * 4
    block, hf_mlp = engine.model.model.layers[1].mlp, hf_model.model.layers[1].mlp
    with torch.no_grad():
        expected = hf_mlp(x[None])[0][0]
        gate_up = x @ hf_mlp.experts.gate_up_proj[0] + hf_mlp.experts.gate_up_proj_bias[0]
    assert (gate_up.abs() > 1.0).float().mean() > 0.5  # the clamp binds on most values
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_expert_activation_is_transformers_apply_gate():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(0)
    gate_up = torch.randn(32, 2 * 24) * 5  # transformers' interleaved columns
    hf = types.SimpleNamespace(alpha=1.702, limit=1.0)
    expected = GptOssExperts._apply_gate(hf, gate_up)
    got = reference.expert_activation(gate_up[:, 0::2], gate_up[:, 1::2], SPEC)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plain = reference.expert_activation(gate_up[:, 0::2], gate_up[:, 1::2])
    torch.testing.assert_close(plain, torch.nn.functional.silu(gate_up[:, 0::2]) * gate_up[:, 1::2])


def test_w4a16_experts_keep_the_biases_and_the_clamp(checkpoint):
    """W4A16 experts (RTN on load) run with the same biases and activation: equal to the float model holding the
    dequantised int4 experts."""
    quantized = LightMoEEngine(checkpoint, dtype="float32", device="cpu", quantization="w4a16", quant_group_size=32,
                               show_progress=False)
    dense = LightMoEEngine(checkpoint, dtype="float32", device="cpu", show_progress=False)
    for q_block, f_block in zip(quantized.model.moe_blocks(), dense.model.moe_blocks()):
        w13, w2 = q_block.prepared
        experts = range(q_block.num_experts)
        f_block.experts.w13.data.copy_(torch.stack([reference.expert_weight(w13, e) for e in experts]))
        f_block.experts.w2.data.copy_(torch.stack([reference.expert_weight(w2, e) for e in experts]))
    got, want = (engine_prefill_logits(e, PROMPTS[3]) for e in (quantized, dense))
    assert ((got - want).norm() / want.norm()).item() < 1e-5


# ---- MXFP4 -------------------------------------------------------------------------------------------------
def test_mxfp4_codec_matches_transformers_decoder():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    w = torch.randn(3, 64, 40) * torch.logspace(-3, 1, 40)  # [E, K, N], groups of very different sizes
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (3, 40, 2, 16) and scales.shape == (3, 40, 2) and blocks.dtype == scales.dtype == torch.uint8
    ours = mxfp4.dequantize(blocks, scales, torch.float32)
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.bfloat16).float(), ours)  # exact in bf16
    assert all(torch.equal(a, b) for a, b in zip(mxfp4.quantize(ours), (blocks, scales)))  # exact round trip
    # within half an FP4 step of the input (at most one group scale s = 2 ** (floor(log2 amax) - 2)), or two
    # where the group's largest values, up to 8 s, saturate at 6 s (the OCP MX rule)
    groups = w.transpose(1, 2).reshape(3, 40, 2, 32)
    scale = torch.exp2(torch.floor(torch.log2(groups.abs().amax(-1))) - 2).unsqueeze(-1)
    err = (ours - w).transpose(1, 2).reshape(3, 40, 2, 32).abs()
    assert bool((err <= torch.where(groups.abs() > 6 * scale, 2 * scale, scale)).all()) and err.max() > 0


def write_mxfp4_checkpoint(src, dst):
    """A copy of the float checkpoint `src` with its experts in MXFP4 (OpenAI's layout and quantization_config),
    and the float checkpoint transformers dequantises it to (its own decoder), for the reference."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(src / "model.safetensors")
    packed, dequantised = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.quantize(t)
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            dequantised[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        else:
            packed[name] = dequantised[name] = t
    config = json.loads((src / "config.json").read_text())
    for out, weights, extra in ((dst / "mxfp4", packed, {"quantization_config": {"quant_method": "mxfp4"}}),
                                (dst / "reference", dequantised, {})):
        out.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps({**config, **extra}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out / f).write_bytes((src / f).read_bytes())
    return dst / "mxfp4", dst / "reference"


def test_mxfp4_checkpoint_matches_transformers_on_its_dequantisation(checkpoint, tmp_path):
    packed, dequantised = write_mxfp4_checkpoint(checkpoint, tmp_path)
    engine = LightMoEEngine(packed, dtype="float32", device="cpu", max_num_batched_tokens=16, show_progress=False)
    outputs = engine.generate_outputs(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    hf_model, expected = hf_greedy(dequantised, PROMPTS)
    assert [o.token_ids for o in outputs] == expected
    assert _relative_error(engine, hf_model, PROMPTS[3]) < 1e-4
    float_engine = LightMoEEngine(checkpoint, dtype="float32", device="cpu", show_progress=False)
    for block, full in zip(engine.model.moe_blocks(), float_engine.model.moe_blocks()):
        assert not torch.equal(block.experts.w13, full.experts.w13)  # really quantized
        assert (block.experts.w13 - full.experts.w13).norm() < 0.2 * full.experts.w13.norm()


def test_mxfp4_errors_name_the_tensor(checkpoint, tmp_path):
    packed, _ = write_mxfp4_checkpoint(checkpoint, tmp_path)
    tensors = load_file(packed / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj"

    def rewrite(**changes):
        weights = dict(tensors)
        for key, value in changes.items():
            if value is None:
                del weights[key]
            else:
                weights[key] = value
        save_file(weights, packed / "model.safetensors", metadata={"format": "pt"})

    def load():
        LightMoEEngine(packed, dtype="float32", device="cpu", show_progress=False)

    rewrite(**{name + "_scales": None})
    with pytest.raises(ValueError, match=f"checkpoint tensor {name}_scales is missing"):
        load()
    rewrite(**{name + "_scales": tensors[name + "_scales"].float()})
    with pytest.raises(ValueError, match=f"{name}_scales .* has dtype F32; a MXFP4 scales tensor must be one of U8"):
        load()
    rewrite(**{name + "_blocks": tensors[name + "_blocks"][:, :, :1].contiguous()})
    with pytest.raises(ValueError, match=rf"expected tensor {name}_blocks of shape \[8, 64, 2, 16\], found "
                                         r"\[8, 64, 1, 16\]"):
        load()
    rewrite(**{name + "_blocks": None, name + "_scales": None})
    with pytest.raises(ValueError, match=f"checkpoint tensor {name} is missing, and so are its MXFP4"):
        load()


# ---- the CuTe backend: gpt-oss's experts on the grouped GEMMs' epilogue variants ---------------------------
def test_cute_backend_runs_gpt_oss_experts_on_the_grouped_gemms(monkeypatch, caplog):
    """prepare_expert_weights(spec=) repacks gpt-oss's experts for the grouped GEMM like any others; expert_up /
    expert_down hand the spec and the biases to it as its epilogue variant (kernels/expert_epilogue.py, checked
    on the GPU by tests/kernels/test_expert_epilogue_gpu.py), so the layer may be captured in a CUDA graph;
    weights the kernels cannot take stay canonical and on the reference."""
    pytest.importorskip("cutlass")
    from light_moe.config import RouterConfig
    from light_moe.kernels import grouped_gemm
    from light_moe.kernels.expert_epilogue import DEFAULT_EPILOGUE, ExpertEpilogue
    from light_moe.ops import cute_backend

    torch.manual_seed(0)
    ops = cute_backend.CuteOps()
    w13, w2 = torch.randn(4, 128, 64, dtype=torch.bfloat16), torch.randn(4, 64, 64, dtype=torch.bfloat16)
    b13, b2 = torch.randn(4, 128, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        w13p, w2p = ops.prepare_expert_weights(w13, w2, spec=SPEC)
    assert "grouped GEMM" not in caplog.text
    assert torch.equal(w13p, grouped_gemm.prepare_expert_weights(w13, w2)[0]) and torch.equal(w2p, w2)
    gate, router_spec = torch.randn(4, 64, dtype=torch.bfloat16), RouterConfig(scoring="softmax_topk", gate_bias=True)
    assert ops.graph_safe(gate, 2, w13p, w2p, expert_spec=SPEC)
    assert not ops.graph_safe(gate, 2, w13, w2, spec=router_spec, expert_spec=SPEC)  # canonical: reference experts

    calls = []
    monkeypatch.setattr(grouped_gemm, "expert_up", lambda *args, **kw: calls.append(kw) or args[0])
    monkeypatch.setattr(grouped_gemm, "expert_down", lambda *args, **kw: calls.append(kw) or args[0])
    x, offsets = torch.randn(6, 64, dtype=torch.bfloat16), torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    gather = torch.tensor([0, 3, 1, 2, 5, 4], dtype=torch.int32)
    ops.expert_up(x, gather, offsets, w13p, spec=SPEC, bias=b13)
    ops.expert_down(x, offsets, w2p, bias=b2)
    ops.expert_up(x, gather, offsets, w13p)
    assert calls[0]["epilogue"] == ExpertEpilogue("clamped_swiglu", 1.702, 1.0, bias=True) and calls[0]["bias"] is b13
    assert calls[1]["bias"] is b2
    assert calls[2] == dict(epilogue=DEFAULT_EPILOGUE, bias=None)

    # canonical weights run the reference (w2 itself was marked: its prepared form is the same tensor)
    w2 = w2.clone()
    act = ops.expert_up(x, gather, offsets, w13, spec=SPEC, bias=b13)
    assert torch.equal(act, reference.expert_up(x, gather, offsets, w13, SPEC, b13))
    assert torch.equal(ops.expert_down(act, offsets, w2, bias=b2), reference.expert_down(act, offsets, w2, b2))
    assert len(calls) == 3


# ---- reference attention with sinks and a sliding window ----------------------------------------------------
def test_uncached_profile_attention_equals_the_paged_one():
    torch.manual_seed(0)
    n, heads, kv_heads, dim = 23, 4, 2, 8
    q, k, v = torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
    sinks = torch.randn(heads)
    meta = AttentionMetadata.for_lengths([n], [n], torch.zeros(1, 1, dtype=torch.int32))
    for window in (None, 5):
        paged = ReferenceOps().attention(q, k[None], v[None], meta, 0.3, sinks=sinks, sliding_window=window)
        got = reference.causal_attention_sinks(q, k, v, 0.3, sinks, window, chunk=4)  # 6 chunks, the last short
        torch.testing.assert_close(got, paged, rtol=1e-5, atol=1e-6)


def test_config_errors_name_their_field():
    from light_moe.models.gpt_oss import GptOssForCausalLM

    base = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
    cfg = GptOssForCausalLM.parse_config(base)  # transformers' defaults: alternating layers, YaRN, window 128
    assert cfg.sliding_window_layers == (0,) and cfg.layer_window == 128 and cfg.rope_scaling.factor == 32.0
    assert cfg.experts == ExpertConfig(activation="clamped_swiglu", alpha=1.702, limit=7.0, bias=True)
    assert cfg.qkv_bias and cfg.o_proj_bias and cfg.attention_sinks and cfg.router.gate_bias
    with pytest.raises(ValueError, match="layer_types must list 2 entries"):
        GptOssForCausalLM.parse_config({**base, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="swiglu_limit"):
        GptOssForCausalLM.parse_config({**base, "swiglu_limit": -1.0})
    full = GptOssForCausalLM.parse_config({**base, "layer_types": ["full_attention"] * 2, "sliding_window": None})
    assert full.sliding_window_layers == () and full.layer_window is None


@pytest.mark.parametrize("window", [None, 4])
def test_sinks_and_sliding_window_match_transformers(window):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, scale = 4, 2, 8, 4, 0.35
    ctx_lens, q_lens = [7, 10, 3], [2, 10, 1]  # a prefill chunk over a cached past, a whole prefill, a decode
    sinks = torch.randn(heads)
    k_cache, v_cache = torch.randn(12, block_size, kv_heads, dim), torch.randn(12, block_size, kv_heads, dim)
    tables = torch.tensor([[4, 9, 0], [1, 2, 7], [11, 0, 0]], dtype=torch.int32)
    meta = AttentionMetadata.for_lengths(ctx_lens, q_lens, tables)
    q = torch.randn(sum(q_lens), heads, dim)
    got = ReferenceOps().attention(q, k_cache, v_cache, meta, scale, sinks=sinks, sliding_window=window)

    module = types.SimpleNamespace(sinks=sinks, num_key_value_groups=heads // kv_heads, training=False)
    start = 0
    for b, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        k = k_cache[tables[b].long()].reshape(-1, kv_heads, dim)[:c].transpose(0, 1)[None]  # [1, g, C, D]
        v = v_cache[tables[b].long()].reshape(-1, kv_heads, dim)[:c].transpose(0, 1)[None]
        qpos, kpos = torch.arange(c - n, c)[:, None], torch.arange(c)[None]
        allowed = (kpos <= qpos) & ((kpos > qpos - window) if window is not None else True)
        mask = torch.zeros(n, c).masked_fill(~allowed, float("-inf"))[None, None]
        expected, _ = eager_attention_forward(module, q[start:start + n].transpose(0, 1)[None], k, v, mask, scale)
        torch.testing.assert_close(got[start:start + n], expected[0], rtol=1e-5, atol=1e-6)
        start += n
    # the sinks and the window really change the result
    plain = ReferenceOps().attention(q, k_cache, v_cache, meta, scale)
    assert (plain - got).abs().max() > 1e-3
