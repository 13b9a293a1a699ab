"""Frozen, validated configuration, one dataclass per concern, passed explicitly.

ModelConfig is what the model code needs from a checkpoint's config.json (each model family
parses its own dialect in light_moe/models/<family>.py); the others configure the engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from light_moe.parallel.placement import PLACEMENT_STRATEGIES
from light_moe.quant.scheme import W4A16Config

EP_EXCHANGES = ("nccl", "p2p")  # ParallelConfig.ep_exchange
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only MoE transformer, in the engine's own terms."""

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
    moe_layers: tuple[int, ...] = ()  # indices of MoE layers; others use the dense MLP
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "per_head" (Qwen3-MoE) | "full" (OLMoE: over all heads' dims)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "top_k", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.top_k} exceeds the number of experts {self.num_experts}")
        if self.qk_norm not in ("none", "per_head", "full"):
            raise ValueError(f"qk_norm must be none|per_head|full, got {self.qk_norm!r}")
        dense_layers = [i for i in range(self.num_layers) if i not in self.moe_layers]
        if dense_layers and self.intermediate_size <= 0:
            raise ValueError(f"layers {dense_layers} are dense but intermediate_size is {self.intermediate_size}")

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


def read_hf_config(model_path: str | Path) -> dict:
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: a Hugging Face model directory needs config.json")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_file} is not readable JSON: {exc}") from exc


def hf_field(hf: dict, name: str, default=..., source: str = "config.json"):
    """Read a config.json field; a missing required field names itself."""
    if name in hf and hf[name] is not None:
        return hf[name]
    if default is ...:
        raise ValueError(f"{source}: required field {name!r} is missing")
    return default


def rope_theta_of(hf: dict, default: float = 10000.0) -> float:
    """rope_theta lives at the top level (transformers 4.x) or in rope_parameters (5.x)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. The block count comes from, in order: num_blocks; kv_cache_memory_bytes;
    on CUDA gpu_memory_utilization of the card minus weights and a profiled activation peak;
    on CPU a default 1 GiB budget."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_blocks: int | None = None

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
class EngineConfig:
    model_path: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe_backend: str = "auto"
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
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
