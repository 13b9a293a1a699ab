"""DeepSeek-V2 / V2-Lite and DeepSeek-V3: multi-head latent attention (layers/mla.py: optional q LoRA, a
kv_lora_rank latent plus a decoupled rotary key per token in the paged cache, YaRN), the first
first_k_dense_replace layers dense, then MoE layers (every moe_layer_freq-th) with n_shared_experts ungated
shared experts (one SwiGLU of n_shared_experts x moe_intermediate_size) beside the routed ones.

Routing (config.RouterConfig, ops/reference.py spec_router): V2 softmax top-k, optionally group-limited
(topk_method group_limited_greedy: n_group groups scored by their best expert, topk_group kept); V3 noaux_tc:
sigmoid scores plus gate.e_score_correction_bias for the choice, groups scored by their two best experts.
Both multiply the weights by routed_scaling_factor; norm_topk_prob renormalises them first (+1e-20).
Checkpoint names are DeepSeek's (mlp.shared_experts.*, experts.E.gate_proj / up_proj / down_proj).
"""
from light_moe.config import MODEL_LIMITS, MLAConfig, ModelConfig, RouterConfig, hf_bool, hf_field, hf_float, hf_int
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, intermediate_size_of, top_k_of, yarn_scaling_of


def _mla_config(hf: dict, rope_interleave: bool) -> MLAConfig:
    q_lora_rank = hf.get("q_lora_rank", 1536)  # present and null: V2-Lite's full-rank q_proj
    return MLAConfig(
        q_lora_rank=None if q_lora_rank is None else hf_int(hf, "q_lora_rank", 1536, minimum=1),
        kv_lora_rank=hf_int(hf, "kv_lora_rank", 512, minimum=1),
        qk_nope_head_dim=hf_int(hf, "qk_nope_head_dim", 128, maximum=MODEL_LIMITS["head_dim"]),
        qk_rope_head_dim=hf_int(hf, "qk_rope_head_dim", 64, minimum=2, maximum=MODEL_LIMITS["head_dim"]),
        v_head_dim=hf_int(hf, "v_head_dim", 128, minimum=1, maximum=MODEL_LIMITS["head_dim"]),
        rope_interleave=rope_interleave,
        attention_bias=hf_bool(hf, "attention_bias", False),
    )


def _deepseek_config(hf: dict, architecture: str, router: RouterConfig, norm_topk_prob: bool,
                     first_k_dense: int, rope_interleave: bool) -> ModelConfig:
    if hf_field(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    base = decoder_fields(hf, architecture, rms_norm_eps=1e-6, head_dim_field=False, rope_types=("default", "yarn"))
    mla = _mla_config(hf, rope_interleave)
    num_layers = base["num_layers"]
    num_experts = hf_int(hf, "n_routed_experts", minimum=1, maximum=MODEL_LIMITS["num_experts"])
    if num_experts % router.n_group:
        raise ValueError(f"config.json: n_routed_experts {num_experts} is not a multiple of n_group {router.n_group}")
    first_dense = hf_int(hf, "first_k_dense_replace", first_k_dense, maximum=num_layers)
    freq = hf_int(hf, "moe_layer_freq", 1, minimum=1)
    moe_inter = intermediate_size_of(hf, "moe_intermediate_size")
    n_shared = hf_int(hf, "n_shared_experts", 0, maximum=MODEL_LIMITS["num_experts"])
    # every head gets its own keys and values from the latent: there are no KV head groups to declare
    base.update(num_kv_heads=base["num_heads"], head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    return ModelConfig(
        **base,
        num_experts=num_experts,
        top_k=top_k_of(hf),
        moe_intermediate_size=moe_inter,
        norm_topk_prob=norm_topk_prob,
        intermediate_size=intermediate_size_of(hf, "intermediate_size", 0),
        shared_expert_intermediate_size=moe_inter * n_shared,
        moe_layers=tuple(i for i in range(first_dense, num_layers) if i % freq == 0),
        router=router,
        rope_scaling=yarn_scaling_of(hf),
        mla=mla,
    )


class _DeepseekForCausalLM(MoECausalLM):
    def checkpoint_name(self, param_name: str) -> str:
        return super().checkpoint_name(param_name).replace(".mlp.shared_expert.", ".mlp.shared_experts.")


class DeepseekV2ForCausalLM(_DeepseekForCausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        method = hf_field(hf, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"config.json: topk_method {method!r} is not supported for DeepSeek-V2 "
                             "(greedy | group_limited_greedy)")
        if hf_field(hf, "scoring_func", "softmax") != "softmax":
            raise ValueError(f"config.json: scoring_func {hf['scoring_func']!r}: DeepSeek-V2 scores with softmax")
        grouped = method == "group_limited_greedy"
        n_group = hf_int(hf, "n_group", minimum=1) if grouped else 1
        router = RouterConfig(scoring="softmax", n_group=n_group,
                              topk_group=hf_int(hf, "topk_group", minimum=1, maximum=n_group) if grouped else 1,
                              group_score="max", routed_scaling_factor=hf_float(hf, "routed_scaling_factor", 1.0))
        # transformers' DeepseekV2 ignores norm_topk_prob; DeepSeek's own code (and every released V2 config,
        # where it is false) applies it, so it is honoured here
        return _deepseek_config(hf, "DeepseekV2ForCausalLM", router, hf_bool(hf, "norm_topk_prob", False),
                                first_k_dense=0, rope_interleave=True)


class DeepseekV3ForCausalLM(_DeepseekForCausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        method = hf_field(hf, "topk_method", "noaux_tc")
        if method != "noaux_tc" or hf_field(hf, "scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"config.json: DeepSeek-V3 routes with topk_method noaux_tc and sigmoid scores, got "
                             f"{method!r} / {hf.get('scoring_func')!r}")
        n_group = hf_int(hf, "n_group", 8, minimum=1)
        router = RouterConfig(scoring="sigmoid", n_group=n_group,
                              topk_group=hf_int(hf, "topk_group", 4, minimum=1, maximum=n_group),
                              group_score="top2_sum", correction_bias=True,
                              routed_scaling_factor=hf_float(hf, "routed_scaling_factor", 2.5))
        return _deepseek_config(hf, "DeepseekV3ForCausalLM", router, hf_bool(hf, "norm_topk_prob", True),
                                first_k_dense=3, rope_interleave=hf_bool(hf, "rope_interleave", True))
