"""Config helpers shared by the family files."""
from light_moe.config import hf_field, rope_theta_of


def decoder_fields(hf: dict, architecture: str, rms_norm_eps: float, rope_theta: float = 10000.0,
                   head_dim_field: bool = True) -> dict:
    """The ModelConfig fields every family reads the same way: sizes, norms, RoPE, special tokens.
    A family passes its own defaults (they differ between the reference implementations) and
    adds its MoE and attention specifics."""
    heads = hf_field(hf, "num_attention_heads")
    hidden = hf_field(hf, "hidden_size")
    head_dim = hf_field(hf, "head_dim", hidden // heads) if head_dim_field else hidden // heads
    return dict(
        architecture=architecture,
        vocab_size=hf_field(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=hf_field(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf_field(hf, "num_key_value_heads", heads),
        head_dim=head_dim,
        max_position_embeddings=hf_field(hf, "max_position_embeddings"),
        rms_norm_eps=hf_field(hf, "rms_norm_eps", rms_norm_eps),
        rope_theta=rope_theta_of(hf, rope_theta),
        tie_word_embeddings=hf_field(hf, "tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids_of(hf),
        torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32",
    )


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
