"""Qwen3-MoE: per-head q/k RMSNorm before RoPE, explicit head_dim, norm_topk_prob, no shared
expert; the same decoder_sparse_step / mlp_only_layers rule as Qwen2-MoE."""
from light_moe.config import ModelConfig, hf_bool, hf_int
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, intermediate_size_of, num_experts_of, sparse_layers, top_k_of


class Qwen3MoeForCausalLM(MoECausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        base = decoder_fields(hf, "Qwen3MoeForCausalLM", rms_norm_eps=1e-6)
        return ModelConfig(
            **base,
            num_experts=num_experts_of(hf),
            top_k=top_k_of(hf),
            moe_intermediate_size=intermediate_size_of(hf, "moe_intermediate_size"),
            norm_topk_prob=hf_bool(hf, "norm_topk_prob", False),
            intermediate_size=intermediate_size_of(hf, "intermediate_size", 0),
            moe_layers=sparse_layers(hf, base["num_layers"]),
            qkv_bias=hf_bool(hf, "attention_bias", False),
            qk_norm="per_head",
            sliding_window=hf_int(hf, "sliding_window", None, minimum=1) if hf_bool(hf, "use_sliding_window", False)
            else None,
        )
