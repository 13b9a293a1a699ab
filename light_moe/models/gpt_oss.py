"""gpt-oss (OpenAI's gpt-oss-20b / 120b): every layer MoE; attention with q/k/v/o biases, a learned sink logit
per head in every softmax denominator, a sliding window on the layers layer_types calls sliding_attention (the
others see the whole context), YaRN rotary tables; a router with a bias, the softmax taken over the top-k logits
only (config.RouterConfig softmax_topk); experts with biases and a clamped SwiGLU (config.ExpertConfig:
gate <= limit, |up| <= limit, gate * sigmoid(alpha * gate) * (up + 1)). The math is transformers' GptOss.

Checkpoints: transformers' layout, stacked experts only: experts.gate_up_proj [E, H, 2I] whose columns
interleave gate and up (gate 0, up 0, gate 1, ...), gate_up_proj_bias [E, 2I] likewise, down_proj [E, I, H],
down_proj_bias [E, H], mlp.router.weight / bias, self_attn.sinks [h]. from_checkpoint turns them into the
canonical w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], so every backend and W4A16 see the same
layout as for the other families. OpenAI's release stores the experts as MXFP4 (<name>_blocks / _scales),
dequantised at load (quant/mxfp4.py, models/loader.py).
"""
from __future__ import annotations

import torch

from light_moe.config import MODEL_LIMITS, ExpertConfig, ModelConfig, RouterConfig, hf_bool, hf_field, hf_float, hf_int
from light_moe.models.base import MoECausalLM
from light_moe.models.common import decoder_fields, intermediate_size_of, num_experts_of, top_k_of, yarn_scaling_of

# transformers' GptOssConfig when config.json names no rotary scaling
DEFAULT_ROPE_SCALING = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                            original_max_position_embeddings=4096)
LAYER_TYPES = ("sliding_attention", "full_attention")
# parameter name pieces -> the checkpoint's
_CHECKPOINT_NAMES = ((".mlp.gate.", ".mlp.router."),
                     (".mlp.expert_biases.b13", ".mlp.experts.gate_up_proj_bias"),
                     (".mlp.expert_biases.b2", ".mlp.experts.down_proj_bias"))


def _layer_types(hf: dict, num_layers: int) -> list[str]:
    """config.json's layer_types, or transformers' default: sliding on even layers, full on odd ones."""
    types = hf_field(hf, "layer_types", None)
    if types is None:
        return [LAYER_TYPES[i % 2] for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"config.json: layer_types must list {num_layers} entries of {' | '.join(LAYER_TYPES)}, "
                         f"got {types!r:.200}")
    return types


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """gpt-oss's interleaved gate/up (gate 0, up 0, gate 1, ...) along `dim` -> all gates, then all ups."""
    lead = (slice(None),) * dim
    return torch.cat((t[(*lead, slice(0, None, 2))], t[(*lead, slice(1, None, 2))]), dim=dim)


class GptOssForCausalLM(MoECausalLM):
    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        if hf.get("rope_parameters") is None and hf.get("rope_scaling") is None:
            hf = {**hf, "rope_scaling": DEFAULT_ROPE_SCALING}
        base = decoder_fields(hf, "GptOssForCausalLM", rms_norm_eps=1e-5, rope_theta=150000.0,
                              rope_types=("default", "yarn"))
        num_layers = base["num_layers"]
        sliding = tuple(i for i, t in enumerate(_layer_types(hf, num_layers)) if t == "sliding_attention")
        bias = hf_bool(hf, "attention_bias", True)
        return ModelConfig(
            **base,
            num_experts=num_experts_of(hf),
            top_k=top_k_of(hf),
            moe_intermediate_size=intermediate_size_of(hf, "intermediate_size"),
            norm_topk_prob=False,  # the softmax over the top-k logits already sums to one
            moe_layers=tuple(range(num_layers)),
            qkv_bias=bias,
            o_proj_bias=bias,
            attention_sinks=True,
            sliding_window_layers=sliding,
            layer_window=hf_int(hf, "sliding_window", 128, minimum=1, maximum=MODEL_LIMITS["max_position_embeddings"])
            if sliding else None,
            router=RouterConfig(scoring="softmax_topk", gate_bias=True),
            experts=ExpertConfig(activation="clamped_swiglu", alpha=hf_float(hf, "swiglu_alpha", 1.702),
                                 limit=hf_float(hf, "swiglu_limit", 7.0), bias=True),
            rope_scaling=yarn_scaling_of(hf),
        )

    def checkpoint_name(self, param_name: str) -> str:
        for ours, theirs in _CHECKPOINT_NAMES:
            param_name = param_name.replace(ours, theirs)
        return param_name

    def checkpoint_shape(self, param_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if param_name.endswith(("experts.w13", "experts.w2")):  # [E, N, K] stored as [E, K, N]
            return (shape[0], shape[2], shape[1])
        return tuple(shape)

    def from_checkpoint(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if param_name.endswith("experts.w13"):  # [E, H, 2I] interleaved -> [E, 2I, H] gate rows, then up rows
            return deinterleave(tensor.transpose(1, 2), dim=1)
        if param_name.endswith("experts.w2"):  # [E, I, H] -> [E, H, I]
            return tensor.transpose(1, 2).contiguous()
        if param_name.endswith("expert_biases.b13"):  # [E, 2I] interleaved
            return deinterleave(tensor, dim=1)
        return tensor
