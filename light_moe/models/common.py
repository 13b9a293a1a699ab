"""Config helpers shared by the family files."""
from light_moe.config import hf_field


def eos_ids_of(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def sparse_layers(hf: dict, num_layers: int) -> tuple[int, ...]:
    """Qwen-MoE rule: layer i is MoE unless listed in mlp_only_layers, and only every
    decoder_sparse_step-th layer ((i + 1) % step == 0)."""
    step = hf_field(hf, "decoder_sparse_step", 1)
    mlp_only = set(hf_field(hf, "mlp_only_layers", []))
    num_experts = num_experts_of(hf)
    return tuple(i for i in range(num_layers) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)


def num_experts_of(hf: dict) -> int:
    """Qwen checkpoints say num_experts; transformers 5 writes num_local_experts for some families."""
    if hf.get("num_experts") is not None:
        return hf["num_experts"]
    return hf_field(hf, "num_local_experts")
