"""Qwen2-MoE: q/k/v bias, a shared expert scaled by sigmoid(shared_expert_gate), MoE only on
layers chosen by decoder_sparse_step and mlp_only_layers (the rest are dense SwiGLU)."""
from light_moe.config import ModelConfig, hf_field
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, num_experts_of, sparse_layers


class Qwen2MoeForCausalLM(MoECausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        base = decoder_fields(hf, "Qwen2MoeForCausalLM", rms_norm_eps=1e-6, head_dim_field=False)
        return ModelConfig(
            **base,
            num_experts=num_experts_of(hf),
            top_k=hf_field(hf, "num_experts_per_tok"),
            moe_intermediate_size=hf_field(hf, "moe_intermediate_size"),
            norm_topk_prob=hf_field(hf, "norm_topk_prob", False),
            intermediate_size=hf_field(hf, "intermediate_size", 0),
            shared_expert_intermediate_size=hf_field(hf, "shared_expert_intermediate_size", 0),
            shared_expert_gate=True,
            moe_layers=sparse_layers(hf, base["num_layers"]),
            qkv_bias=hf_field(hf, "qkv_bias", True),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        )
