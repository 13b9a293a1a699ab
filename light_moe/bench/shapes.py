"""Model shapes for benchmarks with random weights (`light-moe bench e2e --shape NAME --layers L`): the config.json
of a released checkpoint, cut to L layers, plus a small tokenizer (the benchmarks feed token ids).

  mixtral           Mixtral-8x7B: E=8, H=4096, I=14336, top-2, 32 heads, 8 KV heads
  deepseek-v2-lite  DeepSeek-V2-Lite: MLA (kv_lora_rank 512, rope dims 64, full-rank q), 64 experts of I=1408,
                    top-6, 2 shared experts, the first layer dense (I=10944), YaRN
  gpt-oss-20b       gpt-oss-20b: E=32, H=I=2880, top-4, 64 heads of 64, 8 KV heads, sinks, sliding window 128 on
                    every other layer, biased router and experts, YaRN (the release's experts are MXFP4; the
                    random weights here are in the engine's dtype, as the dequantised checkpoint would be)
"""
from __future__ import annotations

import json
from pathlib import Path

MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
    rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
    torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)

DEEPSEEK_V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
    topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=0.707, mscale_all_dim=0.707),
    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=100000, eos_token_id=100001)

GPT_OSS_20B = dict(
    architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=201088, hidden_size=2880,
    intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8, num_local_experts=32,
    num_experts_per_tok=4, sliding_window=128, attention_bias=True, swiglu_limit=7.0, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=150000,
    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                      original_max_position_embeddings=4096),
    tie_word_embeddings=False, torch_dtype="bfloat16", eos_token_id=200002, pad_token_id=199999)

SHAPES = {"mixtral": MIXTRAL_8X7B, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "gpt-oss-20b": GPT_OSS_20B}
# the released checkpoint each shape is cut from, for result labels
_RELEASES = {"mixtral": "mixtral-8x7b", "deepseek-v2-lite": "deepseek-v2-lite", "gpt-oss-20b": "gpt-oss-20b"}


def shape_config(shape: str, layers: int, **overrides) -> dict:
    """config.json of `shape` with `layers` layers (gpt-oss: its layer_types cut with them, sliding first);
    overrides replace fields (tests shrink the sizes)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; shapes: {', '.join(SHAPES)}")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"--layers must be a positive number of layers, got {layers!r}")
    config = {**SHAPES[shape], "num_hidden_layers": layers, **overrides}
    if config["model_type"] == "gpt_oss":
        config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return config


def shape_label(shape: str, layers: int) -> str:
    return f"{_RELEASES[shape]}-shape-{layers}-layers (random weights)"


def write_shaped_model(out: Path, shape: str, layers: int, **overrides) -> Path:
    """config.json of `shape` with `layers` layers (shape_config), plus a small tokenizer (ids only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shape_config(shape, layers, **overrides)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["benchmark text"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    return out
