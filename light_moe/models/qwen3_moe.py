"""Qwen3-MoE: per-head q/k RMSNorm before RoPE, explicit head_dim, norm_topk_prob, no shared
expert; the same decoder_sparse_step / mlp_only_layers rule as Qwen2-MoE."""
from light_moe.config import ModelConfig, hf_field
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, num_experts_of, sparse_layers


class Qwen3MoeForCausalLM(MoECausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        base = decoder_fields(hf, "Qwen3MoeForCausalLM", rms_norm_eps=1e-6)
        return ModelConfig(
            **base,
            num_experts=num_experts_of(hf),
            top_k=hf_field(hf, "num_experts_per_tok"),
            moe_intermediate_size=hf_field(hf, "moe_intermediate_size"),
            norm_topk_prob=hf_field(hf, "norm_topk_prob", False),
            intermediate_size=hf_field(hf, "intermediate_size", 0),
            moe_layers=sparse_layers(hf, base["num_layers"]),
            qkv_bias=hf_field(hf, "attention_bias", False),
            qk_norm="per_head",
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        )
