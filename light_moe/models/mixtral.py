"""Mixtral: every layer MoE, softmax over all experts then top-k renormalised (equivalent to
Mixtral's softmax over the top-k logits), experts named w1 (gate), w3 (up), w2 (down)."""
from light_moe.config import ModelConfig, hf_field, rope_theta_of
from light_moe.models.base import MoECausalLM
from light_moe.models.common import eos_ids_of


class MixtralForCausalLM(MoECausalLM):
    moe_module_name = "block_sparse_moe"
    expert_gate_name, expert_up_name, expert_down_name = "w1", "w3", "w2"

    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        heads = hf_field(hf, "num_attention_heads")
        layers = hf_field(hf, "num_hidden_layers")
        return ModelConfig(
            architecture="MixtralForCausalLM",
            vocab_size=hf_field(hf, "vocab_size"),
            hidden_size=hf_field(hf, "hidden_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf_field(hf, "num_key_value_heads", heads),
            head_dim=hf_field(hf, "head_dim", hf_field(hf, "hidden_size") // heads),
            max_position_embeddings=hf_field(hf, "max_position_embeddings"),
            rms_norm_eps=hf_field(hf, "rms_norm_eps", 1e-5),
            rope_theta=rope_theta_of(hf, 1e6),
            num_experts=hf_field(hf, "num_local_experts"),
            top_k=hf_field(hf, "num_experts_per_tok"),
            moe_intermediate_size=hf_field(hf, "intermediate_size"),
            norm_topk_prob=True,
            moe_layers=tuple(range(layers)),
            tie_word_embeddings=hf_field(hf, "tie_word_embeddings", False),
            sliding_window=hf.get("sliding_window"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids_of(hf),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32",
        )
