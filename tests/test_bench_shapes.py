"""The benchmark model shapes (light_moe/bench/shapes.py) and the bytes model of the new families: the full
gpt-oss-20b and DeepSeek-V2-Lite configs parse to the released architectures (parameter counts on the meta
device), both shapes cut to two layers with tiny sizes run through bench e2e's loop with random weights on the
CPU, and the bytes model counts gpt-oss's sinks, biases and sliding-window KV reads and DeepSeek's latent-only
KV cache (against the full K/V cache it replaces) as worked out by hand."""
import pytest
import torch

from light_moe import LightMoEEngine
from light_moe.bench.bytes_model import decode_step_bytes, kv_read_bytes, model_bytes
from light_moe.bench.e2e import run_e2e
from light_moe.bench.shapes import SHAPES, shape_config, shape_label, write_shaped_model
from light_moe.models.registry import resolve_architecture
from light_moe.ops.backend import ReferenceOps

F32 = 4
# tiny sizes of each shape (everything else, the architecture's choices, as released)
TINY = {
    "mixtral": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "gpt-oss-20b": dict(vocab_size=256, hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=8, sliding_window=8, max_position_embeddings=512),
    "deepseek-v2-lite": dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, max_position_embeddings=512),
}


def _meta_parameters(config: dict) -> int:
    model_cls = resolve_architecture(config)
    with torch.device("meta"):
        model = model_cls(model_cls.parse_config(config), ReferenceOps(), torch.bfloat16, torch.device("meta"))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape,layers,billions", [("gpt-oss-20b", 24, 20.91), ("deepseek-v2-lite", 27, 15.71),
                                                   ("mixtral", 32, 46.70)])
def test_full_shapes_are_the_released_architectures(shape, layers, billions):
    assert _meta_parameters(shape_config(shape, layers)) / 1e9 == pytest.approx(billions, abs=0.01)


def test_shape_configs_parse_to_the_released_choices():
    gpt_oss = resolve_architecture(SHAPES["gpt-oss-20b"]).parse_config(shape_config("gpt-oss-20b", 24))
    assert (gpt_oss.num_experts, gpt_oss.top_k, gpt_oss.head_dim, gpt_oss.num_kv_heads) == (32, 4, 64, 8)
    assert gpt_oss.sliding_window_layers == tuple(range(0, 24, 2)) and gpt_oss.layer_window == 128
    assert gpt_oss.attention_sinks and gpt_oss.experts.limit == 7.0 and gpt_oss.rope_scaling.factor == 32.0
    assert not gpt_oss.rope_scaling.truncate
    lite = resolve_architecture(SHAPES["deepseek-v2-lite"]).parse_config(shape_config("deepseek-v2-lite", 27))
    assert lite.mla.q_lora_rank is None and lite.mla.kv_lora_rank == 512 and lite.moe_layers == tuple(range(1, 27))
    assert (lite.num_experts, lite.top_k, lite.shared_expert_intermediate_size) == (64, 6, 2 * 1408)
    assert lite.rope_scaling.factor == 40 and lite.rope_scaling.mscale_all_dim == 0.707
    assert shape_label("gpt-oss-20b", 4) == "gpt-oss-20b-shape-4-layers (random weights)"
    with pytest.raises(ValueError, match="unknown model shape 'gpt-oss-120'"):
        shape_config("gpt-oss-120", 2)


@pytest.mark.parametrize("shape", ["gpt-oss-20b", "deepseek-v2-lite"])
def test_tiny_shapes_run_the_e2e_loop_with_random_weights(shape, tmp_path):
    path = write_shaped_model(tmp_path, shape, 2, **TINY[shape])
    engine = LightMoEEngine(path, dtype="float32", device="cpu", load_format="dummy", show_progress=False)
    assert len(engine.model.moe_blocks()) == (2 if shape == "gpt-oss-20b" else 1)  # V2-Lite: layer 0 dense
    (row,) = run_e2e(engine, [3], input_len=20, output_len=4)
    weights = model_bytes(engine.model, F32)
    parts = row["bytes_per_step_parts"]
    assert row["decode_tok_s"] > 0 and row["bound_tok_s"] > 0
    assert parts["kv_read"] == kv_read_bytes(weights, 3, row["mean_context"])
    assert parts["kv_write"] == 3 * weights.kv_token_bytes


def _build(tmp_path, config):
    path = write_shaped_model(tmp_path, config.pop("shape"), config.pop("layers"), **config)
    return LightMoEEngine(path, dtype="float32", device="cpu", load_format="dummy", show_progress=False).model


def test_gpt_oss_bytes_by_hand(tmp_path):
    mb = model_bytes(_build(tmp_path, dict(shape="gpt-oss-20b", layers=3, **TINY["gpt-oss-20b"])), F32)
    h, d, heads, kv_heads, experts, inter, vocab = 64, 16, 4, 2, 8, 64, 256
    attention = (h + 1) * heads * d + 2 * (h + 1) * kv_heads * d + (heads * d + 1) * h + heads  # biases, sinks
    layer = attention + 2 * h + (h + 1) * experts  # norms, router with its bias
    assert mb.dense == (3 * layer + h + vocab * h) * F32
    assert mb.expert_bytes == ((2 * inter * h + h * inter + 2 * inter + h) * F32,) * 3  # with the expert's biases
    kv_layer = 2 * kv_heads * d * F32
    assert mb.kv_token_bytes == mb.kv_token_bytes_full_kv == 3 * kv_layer
    assert mb.kv_token_bytes_windowed == 2 * kv_layer and mb.sliding_window == 8  # layers 0 and 2
    step = decode_step_bytes(mb, batch=5, context=100)
    assert step.kv_read == 5 * (100 * kv_layer + 8 * 2 * kv_layer)  # the windowed layers read 8 tokens
    assert decode_step_bytes(mb, batch=5, context=6).kv_read == 5 * 6 * 3 * kv_layer  # inside the window


def test_deepseek_latent_cache_bytes_against_a_full_kv_cache(tmp_path):
    config = dict(shape="deepseek-v2-lite", layers=3, **TINY["deepseek-v2-lite"])
    mb = model_bytes(_build(tmp_path, config), kv_element_size=2)
    heads, nope, rope, v_dim, lora = 4, 16, 8, 16, 32
    assert mb.kv_token_bytes == 3 * (lora + rope) * 2  # the latent and the rotary key per layer
    assert mb.kv_token_bytes_full_kv == 3 * heads * (nope + rope + v_dim) * 2  # per-head K and V
    assert mb.kv_token_bytes_windowed == 0 and mb.sliding_window is None
    step = decode_step_bytes(mb, batch=4, context=50)
    assert step.kv_read == 4 * 50 * mb.kv_token_bytes
    # the released shape: 576 values per token and layer against 16 heads x (192 + 128)
    lite = resolve_architecture(SHAPES["deepseek-v2-lite"]).parse_config(shape_config("deepseek-v2-lite", 27))
    assert lite.mla.kv_lora_rank + lite.mla.qk_rope_head_dim == 576
    assert lite.num_heads * (lite.head_dim + lite.mla.v_head_dim) == 5120
