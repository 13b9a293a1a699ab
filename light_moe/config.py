"""Frozen, validated configuration, one dataclass per concern, passed explicitly.

ModelConfig is what the model code needs from a checkpoint's config.json (each model family
parses its own dialect in light_moe/models/<family>.py); the others configure the engine.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

EP_EXCHANGES = ("nccl", "p2p")  # ParallelConfig.ep_exchange
PLACEMENT_STRATEGIES = ("contiguous", "round_robin", "load_aware")  # ParallelConfig.expert_placement
QUANTIZATION_METHODS = ("w4a16",)  # EngineConfig.quantization (quant/scheme.parse_quantization)
LOAD_FORMATS = ("auto", "dummy")  # EngineConfig.load_format: safetensors, or random weights (benchmarks)
SUPPORTED_GROUP_SIZES = (32, 64, 128)  # W4A16Config.group_size
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# the most token rows kernels/skinny_gemm.py takes (its MAX_M: eight n8 tiles); here so that the engine's
# option checks need no CuTe import
SKINNY_GEMM_MAX_ROWS = 64
# the W4A16 experts' kernel for decode steps (kernels/tile_config.choose_w4a16_tile, EngineConfig.w4a16_decode_kernel)
W4A16_DECODE_KERNELS = ("wgmma", "direct")

@dataclass(frozen=True)
class W4A16Config:
    """int4 weights, 16-bit activations, one scale (and, asymmetric, one zero point) per group of
    `group_size` consecutive input channels. Symmetric uses the fixed zero point 8.

    The routed experts are always quantized; attention=True quantizes the attention projections
    (qkv_proj, o_proj) as well, run as one-expert W4A16 GEMMs (layers/linear.py)."""

    group_size: int = 128
    symmetric: bool = True
    bits: int = 4
    attention: bool = False

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"W4A16 supports bits=4 only, got bits={self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"W4A16 group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"w4a16-g{self.group_size}-{'sym' if self.symmetric else 'asym'}{'-attn' if self.attention else ''}"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name}")
        return name
    key = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
        name, name
    )
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {name!r}")
    return _DTYPES[key]


# Sane maxima for the sizes a config.json declares (docs/model_loading.md lists them with the largest
# released checkpoint of each kind). Every one is several times above any supported model and far
# below the sizes that would try to allocate terabytes; within them, the tensor shapes of the
# checkpoint itself are checked before anything is allocated (models/validation.py).
MODEL_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "num_layers": 1024,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "head_dim": 512,
    "num_experts": 4096,
    "top_k": 4096,
    "moe_intermediate_size": 1 << 18,
    "intermediate_size": 1 << 18,
    "shared_expert_intermediate_size": 1 << 18,
    # the RoPE tables hold max_position_embeddings x head_dim float32 cos and sin
    "max_position_embeddings": 1 << 20,
}
# the sizes together: a dummy-weight build (no checkpoint shapes to compare with) of a config under
# every per-field maximum could still ask for petabytes
MAX_PARAMETERS = 1 << 41
_MAY_BE_ZERO = ("intermediate_size", "shared_expert_intermediate_size")
# ModelConfig fields whose config.json name differs (the same in every supported family)
_CONFIG_JSON_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                      "num_kv_heads": "num_key_value_heads", "top_k": "num_experts_per_tok"}


def checked_int(value, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [minimum, maximum]; else ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} must be at most {maximum}, got {value}")
    return value


def checked_float(value, what: str, positive: bool = False) -> float:
    """`value` as a float if it is a finite real number (int or float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
    return float(value)


def checked_bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class RouterConfig:
    """Routing beyond the default softmax -> top-k (-> renormalise) of the first families (ModelConfig.router
    None). DeepSeek-V2: softmax, optionally group-limited (n_group groups scored by their best expert, the
    tokens' experts taken from the topk_group best groups), weights times routed_scaling_factor. DeepSeek-V3
    (noaux_tc): sigmoid scores, e_score_correction_bias added for the choice only, groups scored by the sum
    of their two best, weights the unbiased scores. gpt-oss: a gate bias, softmax over the top-k logits.
    Renormalisation stays ModelConfig.norm_topk_prob."""

    scoring: str = "softmax"  # "softmax" | "sigmoid" | "softmax_topk" (softmax over the chosen logits only)
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2 group_limited_greedy) | "top2_sum" (DeepSeek-V3 noaux_tc)
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # a learned per-expert bias for the choice (gate.e_score_correction_bias)
    gate_bias: bool = False  # the gate linear has a bias (gpt-oss)

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid", "softmax_topk"):
            raise ValueError(f"router scoring must be softmax|sigmoid|softmax_topk, got {self.scoring!r}")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"router group_score must be max|top2_sum, got {self.group_score!r}")
        checked_int(self.n_group, "n_group", 1)
        checked_int(self.topk_group, "topk_group", 1, self.n_group)
        checked_float(self.routed_scaling_factor, "routed_scaling_factor", positive=True)
        for name in ("correction_bias", "gate_bias"):
            checked_bool(getattr(self, name), name)


@dataclass(frozen=True)
class ExpertConfig:
    """The routed experts' FFN beyond the default (ModelConfig.experts None: act = SiLU(gate) * up, no biases),
    passed explicitly to the ops (MoEOps.experts spec=). gpt-oss: biases on the gate/up and the down projection
    (bias), and a clamped SwiGLU (activation "clamped_swiglu"): gate clamped above at `limit`, up clamped to
    [-limit, limit], act = gate * sigmoid(alpha * gate) * (up + 1). w13 keeps the canonical [gate rows; up rows]
    order for every family (gpt-oss's interleaved gate/up columns are split at load)."""

    activation: str = "silu"  # "silu" | "clamped_swiglu"
    alpha: float = 1.0
    limit: float | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ("silu", "clamped_swiglu"):
            raise ValueError(f"expert activation must be silu|clamped_swiglu, got {self.activation!r}")
        checked_float(self.alpha, "swiglu_alpha", positive=True)
        if self.limit is not None:
            checked_float(self.limit, "swiglu_limit", positive=True)
        if self.activation == "clamped_swiglu" and self.limit is None:
            raise ValueError("the clamped SwiGLU needs swiglu_limit")
        checked_bool(self.bias, "expert bias")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling (rope_scaling / rope_parameters with type yarn), as transformers computes it:
    layers/mla.py YarnRotaryEmbedding. None fields take transformers' defaults."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        checked_float(self.factor, "rope_scaling.factor", positive=True)
        checked_int(self.original_max_position_embeddings, "rope_scaling.original_max_position_embeddings", 1)
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, name) is not None:
                checked_float(getattr(self, name), f"rope_scaling.{name}")
        checked_bool(self.truncate, "rope_scaling.truncate")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 / V3): queries through an optional low-rank q_lora_rank,
    keys and values from one kv_lora_rank latent per token plus a qk_rope_head_dim rotary key shared by the
    heads, which is all the paged cache holds (layers/mla.py)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True  # rotary pairs (x0, x1), (x2, x3) ... as DeepSeek's weights lay them out
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.q_lora_rank is not None:
            checked_int(self.q_lora_rank, "q_lora_rank", 1, MODEL_LIMITS["hidden_size"])
        checked_int(self.kv_lora_rank, "kv_lora_rank", 1, MODEL_LIMITS["hidden_size"])
        checked_int(self.qk_nope_head_dim, "qk_nope_head_dim", 0, MODEL_LIMITS["head_dim"])
        checked_int(self.qk_rope_head_dim, "qk_rope_head_dim", 2, MODEL_LIMITS["head_dim"])
        checked_int(self.v_head_dim, "v_head_dim", 1, MODEL_LIMITS["head_dim"])
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        checked_bool(self.rope_interleave, "rope_interleave")
        checked_bool(self.attention_bias, "attention_bias")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only MoE transformer, in the engine's own terms. Every field is
    checked once here (types, MODEL_LIMITS, MAX_PARAMETERS); the family parsers check config.json's
    own field names on the way in, so a bad file names its field before anything is computed."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    # dense MLP size, for layers that are not MoE (Qwen2-MoE mlp_only_layers / decoder_sparse_step)
    intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ g) scales the shared expert
    moe_layers: tuple[int, ...] = ()  # indices of MoE layers, ascending; others use the dense MLP
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "per_head" (Qwen3-MoE) | "full" (OLMoE: over all heads' dims)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # config.json's and generation_config.json's (models/loader.py)
    torch_dtype: str = "float32"
    router: RouterConfig | None = None  # None: softmax -> top-k (-> renormalise), no bias
    rope_scaling: YarnScaling | None = None  # None: default RoPE
    mla: MLAConfig | None = None  # multi-head latent attention instead of q/k/v heads (DeepSeek)
    experts: ExpertConfig | None = None  # None: SiLU(gate) * up experts without biases
    o_proj_bias: bool = False
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in every softmax denominator
    # gpt-oss: these layers attend over the last layer_window positions only; the others over the whole context
    # (unlike sliding_window above, which bounds the context of the whole model)
    sliding_window_layers: tuple[int, ...] = ()
    layer_window: int | None = None
    # moe_layers as a set, so that is_moe_layer and the checks below are O(1) per layer
    _moe_layer_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, maximum in MODEL_LIMITS.items():
            alias = _CONFIG_JSON_NAMES.get(name)
            what = f"{name} (config.json {alias})" if alias else name
            checked_int(getattr(self, name), what, 0 if name in _MAY_BE_ZERO else 1, maximum)
        checked_float(self.rms_norm_eps, "rms_norm_eps", positive=True)
        checked_float(self.rope_theta, "rope_theta", positive=True)
        if self.clip_qkv is not None:
            checked_float(self.clip_qkv, "clip_qkv", positive=True)
        for name in ("norm_topk_prob", "shared_expert_gate", "qkv_bias", "tie_word_embeddings", "o_proj_bias",
                     "attention_sinks"):
            checked_bool(getattr(self, name), name)
        if self.sliding_window is not None:
            checked_int(self.sliding_window, "sliding_window", minimum=1)
        if self.bos_token_id is not None:
            checked_int(self.bos_token_id, "bos_token_id")
        for eos in self.eos_token_ids:
            checked_int(eos, "eos_token_id")
        if not isinstance(self.torch_dtype, str):
            raise ValueError(f"torch_dtype must be a string such as 'bfloat16', got {self.torch_dtype!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.top_k} exceeds the number of experts {self.num_experts}")
        if self.qk_norm not in ("none", "per_head", "full"):
            raise ValueError(f"qk_norm must be none|per_head|full, got {self.qk_norm!r}")
        self._check_moe_layers()
        self._check_sliding_window_layers()
        params = self.parameter_count()
        if params > MAX_PARAMETERS:
            raise ValueError(f"config.json describes a model of about {params:.3g} parameters, above the supported "
                             f"maximum {MAX_PARAMETERS:.3g} (docs/model_loading.md): check hidden_size, "
                             "num_hidden_layers, the number of experts and the intermediate sizes")

    def _check_moe_layers(self) -> None:
        layers = self.moe_layers
        if not isinstance(layers, tuple):
            raise ValueError(f"moe_layers must be a tuple of layer indices, got {type(layers).__name__}")
        for i in layers:
            checked_int(i, "moe_layers entry", 0, self.num_layers - 1)
        if any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"moe_layers must be ascending without repeats, got {list(layers)}")
        object.__setattr__(self, "_moe_layer_set", frozenset(layers))
        if len(layers) < self.num_layers and self.intermediate_size <= 0:
            dense_layers = [i for i in range(self.num_layers) if i not in self._moe_layer_set]
            raise ValueError(f"layers {dense_layers} are dense but intermediate_size is {self.intermediate_size}")

    def _check_sliding_window_layers(self) -> None:
        layers = self.sliding_window_layers
        if not isinstance(layers, tuple):
            raise ValueError(f"sliding_window_layers must be a tuple of layer indices, got {type(layers).__name__}")
        for i in layers:
            checked_int(i, "sliding_window_layers entry", 0, self.num_layers - 1)
        if any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"sliding_window_layers must be ascending without repeats, got {list(layers)}")
        if layers and self.layer_window is None:
            raise ValueError(f"layers {list(layers)} use sliding-window attention but layer_window is not set")
        if self.layer_window is not None:
            checked_int(self.layer_window, "sliding_window (per-layer window)", minimum=1)

    def attention_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`'s attention, None for attention over the whole context."""
        return self.layer_window if layer in self.sliding_window_layers else None

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_layer_set

    def parameter_count(self) -> int:
        """Weights the model holds (norms and biases left out): what the checks above bound."""
        h = self.hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * (2 * q + 2 * kv)
        moe = self.num_experts * (3 * self.moe_intermediate_size * h + h) + 3 * self.shared_expert_intermediate_size * h
        dense = 3 * self.intermediate_size * h
        num_moe = len(self.moe_layers)
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * attention + num_moe * moe + (self.num_layers - num_moe) * dense + embeddings


def read_hf_config(model_path: str | Path) -> dict:
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: a Hugging Face model directory needs config.json")
    return read_json_object(cfg_file)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, generation_config.json, ...); errors name it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def hf_field(hf: dict, name: str, default=..., source: str = "config.json"):
    """Read a config.json field; a missing required field names itself."""
    if name in hf and hf[name] is not None:
        return hf[name]
    if default is ...:
        raise ValueError(f"{source}: required field {name!r} is missing")
    return default


def hf_int(hf: dict, name: str, default=..., minimum: int = 0, maximum: int | None = None,
           source: str = "config.json") -> int | None:
    """An integer field in [minimum, maximum]; a default of None makes it optional (None when absent)."""
    value = hf_field(hf, name, default, source)
    return None if value is None else checked_int(value, f"{source}: {name}", minimum, maximum)


def hf_float(hf: dict, name: str, default=..., source: str = "config.json") -> float | None:
    value = hf_field(hf, name, default, source)
    return None if value is None else checked_float(value, f"{source}: {name}")


def hf_bool(hf: dict, name: str, default=..., source: str = "config.json") -> bool:
    return checked_bool(hf_field(hf, name, default, source), f"{source}: {name}")


def hf_token_ids(hf: dict, name: str, source: str = "config.json") -> tuple[int, ...]:
    """A token id field that may hold one id or a list of them (eos_token_id); () when absent."""
    value = hf.get(name)
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(checked_int(v, f"{source}: {name}") for v in values)


def rope_theta_of(hf: dict, default: float = 10000.0, rope_types: tuple[str, ...] = ("default",)) -> float:
    """rope_theta lives at the top level (transformers 4.x) or in rope_parameters (5.x). rope_types: the
    rotary types the family supports (its parser reads any scaling parameters itself)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: rope_parameters / rope_scaling must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (*rope_types, None):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(rope_types)})")
    if params.get("rope_theta") is not None:
        return checked_float(params["rope_theta"], "config.json: rope_parameters.rope_theta")
    return hf_float(hf, "rope_theta", default)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. The block count comes from, in order: num_blocks; kv_cache_memory_bytes;
    on CUDA gpu_memory_utilization of the card minus weights and a profiled activation peak;
    on CPU a default 1 GiB budget. enable_prefix_caching: full blocks shared between requests with equal
    prefixes (engine/kv_cache.py); one process only."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")


@dataclass(frozen=True)
class ParallelConfig:
    """expert_parallel_size N > 1: N processes, attention data-parallel, experts partitioned
    (docs/expert_parallel.md). expert_placement: contiguous | round_robin | load_aware (the last
    needs expert_load_file, written by light_moe.parallel.balancer.ExpertLoadWindow.save).
    collective_timeout_s bounds every collective, so a dead rank is an error, not a hang.
    Load balancing (parallel/balancer.py): expert_load_window steps of global expert-load statistics;
    num_redundant_experts extra expert slots per rank for copies of hot experts (used by load_aware
    and by rebalancing); rebalance_interval > 0 rebalances every that many steps when the window's
    max/mean tokens per rank exceeds rebalance_threshold (0: only engine.rebalance()).
    enable_overlap: two micro-batches per MoE layer so one's exchange runs while the other computes
    (parallel/overlap.py); off by default until `light-moe bench ep` shows it pays on the target GPUs.
    fixed_capacity_tokens C > 0: steps whose largest per-rank routed-row count (tokens x top_k) is at
    most C exchange a fixed, padded number of rows per rank pair, with no host sync (parallel/dispatch.py),
    which also lets decode steps replay CUDA graphs; 0: always variable splits. Default 256: on 2 H100s,
    Mixtral shape, 16 sequences per GPU, EP=2 decode ran 2789 tok/s/GPU with it against 872 without
    (BENCHMARKS.md).
    ep_exchange: how that fixed-capacity exchange moves: "nccl" (default: all_to_all_single) or "p2p" (writes
    into the peers' memory over NVLink through PyTorch symmetric memory, parallel/p2p_exchange.py; experimental
    until measured; needs fixed_capacity_tokens > 0 and, checked by the engine, CUDA GPUs of one host with peer
    access). Steps above the capacity use NCCL's variable splits either way."""

    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    expert_placement: str = "contiguous"
    expert_load_file: str | None = None
    collective_timeout_s: float = 300.0
    enable_overlap: bool = False
    num_redundant_experts: int = 0
    expert_load_window: int = 1024
    rebalance_interval: int = 0
    rebalance_threshold: float = 1.2
    fixed_capacity_tokens: int = 256
    ep_exchange: str = "nccl"

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported: Light-MoE runs attention "
                "data-parallel; use expert_parallel_size to spread the experts over GPUs")
        if not isinstance(self.expert_parallel_size, int) or self.expert_parallel_size < 1:
            raise ValueError(f"expert_parallel_size must be a positive integer, got {self.expert_parallel_size!r}")
        if self.expert_placement not in PLACEMENT_STRATEGIES:
            raise ValueError(f"expert_placement must be one of {PLACEMENT_STRATEGIES}, got {self.expert_placement!r}")
        if self.expert_placement == "load_aware" and self.expert_load_file is None:
            raise ValueError("expert_placement='load_aware' needs expert_load_file (recorded per-layer expert load)")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be positive, got {self.collective_timeout_s}")
        for name in ("num_redundant_experts", "rebalance_interval", "fixed_capacity_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not isinstance(self.expert_load_window, int) or self.expert_load_window <= 0:
            raise ValueError(f"expert_load_window must be a positive number of steps, got {self.expert_load_window!r}")
        if not self.rebalance_threshold >= 1.0:
            raise ValueError(f"rebalance_threshold is a max/mean ratio (>= 1.0), got {self.rebalance_threshold}")
        if self.ep_exchange not in EP_EXCHANGES:
            raise ValueError(f"ep_exchange must be one of {EP_EXCHANGES}, got {self.ep_exchange!r}")
        if self.ep_exchange == "p2p" and self.expert_parallel_size == 1:
            raise ValueError("ep_exchange='p2p' is an expert-parallel exchange: it needs expert_parallel_size > 1")
        if self.ep_exchange == "p2p" and self.fixed_capacity_tokens == 0:
            raise ValueError("ep_exchange='p2p' replaces the fixed-capacity exchange only: it needs "
                             "fixed_capacity_tokens > 0 (e.g. 256)")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching (engine/scheduler.py): at most max_num_seqs requests per step, and a per-step token
    budget shared by prefill chunks and decodes; without chunked prefill a prompt must fit the budget whole."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """The whole engine's configuration, built by engine/args.EngineArgs (one field per option there, by name);
    the expert-parallel workers receive it whole (executor/rank_executor.WorkerSpec)."""

    model_path: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    moe_backend: str = "auto"
    # the CuTe backend runs decode rows of the dense projections on kernels/skinny_gemm.py (ops.select_backend)
    skinny_gemm: bool = True
    skinny_gemm_max_rows: int = 16  # up to SKINNY_GEMM_MAX_ROWS
    fuse_combine_norm: bool = True  # MoE layers' combine inside the next norm (ops.backend.PendingCombine)
    # decode attention's split-KV merge done by the last split CTA (kernels/decode_attention.py), no combine kernel
    fuse_attention_merge: bool = True
    # the W4A16 experts' kernel for decode steps: "direct" (kernels/w4a16_direct.py, where its units fill a wave;
    # faster in the whole model on the H100, BENCHMARKS.md) or "wgmma" (the grouped GEMM's split-K tiles);
    # W4A16_DECODE_KERNELS
    w4a16_decode_kernel: str = "direct"
    # the direct up kernel's CTAs that finish a unit early prefetch the down projection's weights into L2
    # (kernels/w4a16_direct.py; opt-in until measured on the H100: docs/kernels.md)
    w4a16_prefetch_down: bool = False
    # the W4A16 experts' up and down projections at decode in one launch (kernels/w4a16_fused.py; opt-in until
    # measured on the H100: docs/kernels.md)
    w4a16_fused_decode: bool = False
    # LightMoEEngine captures its CUDA graphs at start (ModelRunner.warm_up) instead of on first use
    warmup_graphs: bool = False
    load_format: str = "auto"  # "auto": safetensors; "dummy": random weights (benchmarks)
    seed: int = 0
    enable_cuda_graphs: bool = True
    quantization: W4A16Config | None = None  # W4A16 routed experts, quantized on load (docs/quantization.md)
    # step() detokenizes and builds the outputs of step n while the GPUs run step n + 1 (outputs come one
    # step later; the tokens, text and finish reasons are the same). Only matters without async_scheduling,
    # which already hands a step's outputs to the host while the next step runs.
    async_output_processing: bool = False
    # schedule and launch step n + 1 before reading step n's tokens back (engine.LightMoEEngine.step);
    # outputs come one step later, tokens and text are the same. On by default: +24% decode per GPU at EP=4
    # and +19% at EP=1 on H200s (BENCHMARKS.md, "Async scheduling").
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
