"""Maps config.json `architectures` names to model classes."""
from __future__ import annotations

from light_moe.models.base import MoECausalLM
from light_moe.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from light_moe.models.gpt_oss import GptOssForCausalLM
from light_moe.models.mixtral import MixtralForCausalLM
from light_moe.models.olmoe import OlmoeForCausalLM
from light_moe.models.qwen2_moe import Qwen2MoeForCausalLM
from light_moe.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[MoECausalLM]] = {
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
}


def resolve_architecture(hf: dict) -> type[MoECausalLM]:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"config.json: architectures {archs} not supported; supported: {sorted(MODEL_REGISTRY)}")
