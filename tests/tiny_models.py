"""Tiny random checkpoints of every supported family, written with transformers' save_pretrained,
plus a small byte-level BPE tokenizer, for fidelity tests against transformers."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route tokens.",
    "import os\nimport sys\nprint('hello world')\nfor i in range(10):\n    print(i)\n",
    "Light-MoE serves mixture-of-experts language models with paged attention.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def save_tokenizer(out: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE}))


def _config(family: str, **overrides):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    families = {
        "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                          shared_expert_intermediate_size=80, decoder_sparse_step=1, mlp_only_layers=[1],
                          norm_topk_prob=False),
        "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=24,
                          norm_topk_prob=True),
        "olmoe": dict(num_experts=8, num_experts_per_tok=2, clip_qkv=8.0),
    }
    classes = {"mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig,
               "olmoe": OlmoeConfig}
    if family not in classes:
        raise ValueError(family)
    return classes[family](**{**common, **families[family], **overrides})


def _deepseek_config(family: str, **overrides):
    import transformers

    class_name, specific = DEEPSEEK_FAMILIES[family]
    return getattr(transformers, class_name)(**{**_DEEPSEEK, **specific, **overrides})


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# DeepSeek (multi-head latent attention, YaRN, grouped routing, shared experts, a first dense layer): tested in
# tests/test_fidelity_deepseek.py. Four heads and four KV heads (MLA has no KV head groups).
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, mscale=0.707,
             mscale_all_dim=0.707, beta_fast=32, beta_slow=1)
_DEEPSEEK = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
                 first_k_dense_replace=1, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, tie_word_embeddings=False)
DEEPSEEK_FAMILIES = {
    # V2-Lite: full-rank q_proj, plain softmax top-k, two shared experts, default RoPE
    "deepseek_v2_lite": ("DeepseekV2Config", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                                  routed_scaling_factor=1.0)),
    # V2: q LoRA, group-limited routing, YaRN
    "deepseek_v2": ("DeepseekV2Config", dict(q_lora_rank=48, topk_method="group_limited_greedy", n_group=4,
                                             topk_group=2, n_shared_experts=1, routed_scaling_factor=16.0,
                                             rope_parameters=_YARN)),
    # V3: noaux_tc (sigmoid, correction bias, groups by their two best), renormalised and scaled, YaRN
    "deepseek_v3": ("DeepseekV3Config", dict(q_lora_rank=48, n_group=4, topk_group=2, n_shared_experts=1,
                                             routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=_YARN)),
}


# gpt-oss (sinks, alternating sliding-window / full layers, biased router and experts, clamped SwiGLU, YaRN):
# tested in tests/test_fidelity_gpt_oss.py. A window of 8 that every test prompt but the shortest crosses;
# swiglu_limit 1.0 so the clamp binds on these small activations (7.0, the released value, never would);
# expert widths multiples of 32, as MXFP4 groups them.
GPT_OSS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
               swiglu_limit=1.0, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
               tie_word_embeddings=False,
               rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                    truncate=False, original_max_position_embeddings=64))


def _gpt_oss_config(**overrides):
    from transformers import GptOssConfig

    return GptOssConfig(**{**GPT_OSS, **overrides})


def make_tiny_checkpoint(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Random weights (scaled up so routing and logits are not all near-ties)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if family == "gpt_oss":
        cfg = _gpt_oss_config(**overrides)
    else:
        cfg = _deepseek_config(family, **overrides) if family in DEEPSEEK_FAMILIES else _config(family, **overrides)
    cfg.initializer_range = 0.08
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init: make the choice depend on it
                buffer.uniform_(-0.1, 0.1)
        if family == "gpt_oss":  # expert and projection biases are zeros at init: make them matter
            for name, param in model.named_parameters():
                if name.endswith(("bias", "sinks")):
                    param.uniform_(-0.5, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(out)
    return out
