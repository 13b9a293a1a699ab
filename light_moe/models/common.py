"""Config helpers shared by the family files.

Every field is read through a typed reader (light_moe/config.py: hf_int, hf_float, hf_bool), so a
wrong type or an absurd size names its config.json field before anything is computed from it; the
sizes are bounded by config.MODEL_LIMITS (docs/model_loading.md).
"""
from light_moe.config import (
    MODEL_LIMITS,
    YarnScaling,
    checked_int,
    hf_bool,
    hf_field,
    hf_float,
    hf_int,
    hf_token_ids,
    rope_theta_of,
)


def decoder_fields(hf: dict, architecture: str, rms_norm_eps: float, rope_theta: float = 10000.0,
                   head_dim_field: bool = True, rope_types: tuple[str, ...] = ("default",)) -> dict:
    """The ModelConfig fields every family reads the same way: sizes, norms, RoPE, special tokens.
    A family passes its own defaults (they differ between the reference implementations) and
    adds its MoE and attention specifics."""
    heads = hf_int(hf, "num_attention_heads", minimum=1, maximum=MODEL_LIMITS["num_heads"])
    hidden = hf_int(hf, "hidden_size", minimum=1, maximum=MODEL_LIMITS["hidden_size"])
    head_dim = hidden // heads
    if head_dim_field:
        head_dim = hf_int(hf, "head_dim", head_dim, minimum=1, maximum=MODEL_LIMITS["head_dim"])
    dtype = hf_field(hf, "torch_dtype", None) or hf_field(hf, "dtype", "float32")
    if not isinstance(dtype, str):
        raise ValueError(f"config.json: torch_dtype must be a string such as 'bfloat16', got {dtype!r}")
    return dict(
        architecture=architecture,
        vocab_size=hf_int(hf, "vocab_size", minimum=1, maximum=MODEL_LIMITS["vocab_size"]),
        hidden_size=hidden,
        num_layers=hf_int(hf, "num_hidden_layers", minimum=1, maximum=MODEL_LIMITS["num_layers"]),
        num_heads=heads,
        num_kv_heads=hf_int(hf, "num_key_value_heads", heads, minimum=1, maximum=MODEL_LIMITS["num_kv_heads"]),
        head_dim=head_dim,
        max_position_embeddings=hf_int(hf, "max_position_embeddings", minimum=1,
                                       maximum=MODEL_LIMITS["max_position_embeddings"]),
        rms_norm_eps=hf_float(hf, "rms_norm_eps", rms_norm_eps),
        rope_theta=rope_theta_of(hf, rope_theta, rope_types),
        tie_word_embeddings=hf_bool(hf, "tie_word_embeddings", False),
        bos_token_id=hf_int(hf, "bos_token_id", None),
        eos_token_ids=hf_token_ids(hf, "eos_token_id"),
        torch_dtype=dtype,
    )


def intermediate_size_of(hf: dict, name: str, default=...) -> int:
    """An MLP / expert width field (intermediate_size, moe_intermediate_size, ...), bounded."""
    return hf_int(hf, name, default, maximum=MODEL_LIMITS["intermediate_size"])


def top_k_of(hf: dict) -> int:
    return hf_int(hf, "num_experts_per_tok", minimum=1, maximum=MODEL_LIMITS["top_k"])


def sparse_layers(hf: dict, num_layers: int) -> tuple[int, ...]:
    """Qwen-MoE rule: layer i is MoE unless listed in mlp_only_layers, and only every
    decoder_sparse_step-th layer ((i + 1) % step == 0)."""
    step = hf_int(hf, "decoder_sparse_step", 1, minimum=1)
    listed = hf_field(hf, "mlp_only_layers", [])
    if not isinstance(listed, list):
        raise ValueError(f"config.json: mlp_only_layers must be a list of layer indices, got {listed!r}")
    mlp_only = {checked_int(i, "config.json: mlp_only_layers entry", 0, num_layers - 1) for i in listed}
    return tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)


def num_experts_of(hf: dict) -> int:
    """Qwen checkpoints say num_experts; transformers 5 writes num_local_experts for some families."""
    name = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    return hf_int(hf, name, minimum=1, maximum=MODEL_LIMITS["num_experts"])


def yarn_scaling_of(hf: dict) -> YarnScaling | None:
    """config.YarnScaling of rope_parameters / rope_scaling with type yarn (transformers 5 / 4 names), else None.
    A missing factor is max_position_embeddings / original_max_position_embeddings, as transformers does."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "yarn":
        return None
    where = "config.json: rope_scaling"
    original = hf_int(params, "original_max_position_embeddings", minimum=1, source=where)
    factor = hf_float(params, "factor", None, source=where)
    if factor is None:
        factor = hf_int(hf, "max_position_embeddings", minimum=1) / original
    return YarnScaling(
        factor=factor, original_max_position_embeddings=original,
        beta_fast=hf_float(params, "beta_fast", 32.0, source=where),
        beta_slow=hf_float(params, "beta_slow", 1.0, source=where),
        mscale=hf_float(params, "mscale", None, source=where),
        mscale_all_dim=hf_float(params, "mscale_all_dim", None, source=where),
        attention_factor=hf_float(params, "attention_factor", None, source=where),
        truncate=hf_bool(params, "truncate", True, source=where))
