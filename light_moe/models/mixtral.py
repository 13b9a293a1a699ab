"""Mixtral: every layer MoE, softmax over all experts then top-k renormalised (equivalent to
Mixtral's softmax over the top-k logits), experts named w1 (gate), w3 (up), w2 (down)."""
from light_moe.config import ModelConfig, hf_int
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, intermediate_size_of, num_experts_of, top_k_of


class MixtralForCausalLM(MoECausalLM):
    moe_module_name = "block_sparse_moe"
    expert_gate_name, expert_up_name, expert_down_name = "w1", "w3", "w2"

    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        base = decoder_fields(hf, "MixtralForCausalLM", rms_norm_eps=1e-5, rope_theta=1e6)
        return ModelConfig(
            **base,
            num_experts=num_experts_of(hf),
            top_k=top_k_of(hf),
            moe_intermediate_size=intermediate_size_of(hf, "intermediate_size"),
            norm_topk_prob=True,
            moe_layers=tuple(range(base["num_layers"])),
            sliding_window=hf_int(hf, "sliding_window", None, minimum=1),
        )
