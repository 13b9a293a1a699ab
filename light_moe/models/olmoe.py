"""OLMoE: q/k RMSNorm over the whole projection (all heads), optional clip_qkv, every layer MoE,
top-k probabilities not renormalised unless norm_topk_prob."""
from light_moe.config import ModelConfig, hf_bool, hf_float
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, intermediate_size_of, num_experts_of, top_k_of


class OlmoeForCausalLM(MoECausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        base = decoder_fields(hf, "OlmoeForCausalLM", rms_norm_eps=1e-5, head_dim_field=False)
        return ModelConfig(
            **base,
            num_experts=num_experts_of(hf),
            top_k=top_k_of(hf),
            moe_intermediate_size=intermediate_size_of(hf, "intermediate_size"),
            norm_topk_prob=hf_bool(hf, "norm_topk_prob", False),
            moe_layers=tuple(range(base["num_layers"])),
            qkv_bias=hf_bool(hf, "attention_bias", False),
            qk_norm="full",
            clip_qkv=hf_float(hf, "clip_qkv", None),
        )
