"""OLMoE: q/k RMSNorm over the whole projection (all heads), optional clip_qkv, every layer MoE,
top-k probabilities not renormalised unless norm_topk_prob."""
from light_moe.config import ModelConfig, hf_field, rope_theta_of
from light_moe.models.base import MoECausalLM
from light_moe.models.common import eos_ids_of, num_experts_of


class OlmoeForCausalLM(MoECausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        heads = hf_field(hf, "num_attention_heads")
        layers = hf_field(hf, "num_hidden_layers")
        return ModelConfig(
            architecture="OlmoeForCausalLM",
            vocab_size=hf_field(hf, "vocab_size"),
            hidden_size=hf_field(hf, "hidden_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf_field(hf, "num_key_value_heads", heads),
            head_dim=hf_field(hf, "hidden_size") // heads,
            max_position_embeddings=hf_field(hf, "max_position_embeddings"),
            rms_norm_eps=hf_field(hf, "rms_norm_eps", 1e-5),
            rope_theta=rope_theta_of(hf),
            num_experts=num_experts_of(hf),
            top_k=hf_field(hf, "num_experts_per_tok"),
            moe_intermediate_size=hf_field(hf, "intermediate_size"),
            norm_topk_prob=hf_field(hf, "norm_topk_prob", False),
            moe_layers=tuple(range(layers)),
            qkv_bias=hf_field(hf, "attention_bias", False),
            qk_norm="full",
            clip_qkv=hf.get("clip_qkv"),
            tie_word_embeddings=hf_field(hf, "tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids_of(hf),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32",
        )
