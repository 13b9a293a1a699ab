"""Qwen2-MoE: q/k/v bias, a shared expert scaled by sigmoid(shared_expert_gate), MoE only on
layers chosen by decoder_sparse_step and mlp_only_layers (the rest are dense SwiGLU)."""
from light_moe.config import ModelConfig, hf_bool, hf_int
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, intermediate_size_of, num_experts_of, sparse_layers, top_k_of


class Qwen2MoeForCausalLM(MoECausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        base = decoder_fields(hf, "Qwen2MoeForCausalLM", rms_norm_eps=1e-6, head_dim_field=False)
        return ModelConfig(
            **base,
            num_experts=num_experts_of(hf),
            top_k=top_k_of(hf),
            moe_intermediate_size=intermediate_size_of(hf, "moe_intermediate_size"),
            norm_topk_prob=hf_bool(hf, "norm_topk_prob", False),
            intermediate_size=intermediate_size_of(hf, "intermediate_size", 0),
            shared_expert_intermediate_size=intermediate_size_of(hf, "shared_expert_intermediate_size", 0),
            shared_expert_gate=True,
            moe_layers=sparse_layers(hf, base["num_layers"]),
            qkv_bias=hf_bool(hf, "qkv_bias", True),
            sliding_window=hf_int(hf, "sliding_window", None, minimum=1) if hf_bool(hf, "use_sliding_window", False)
            else None,
        )
