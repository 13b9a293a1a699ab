"""Bytes a step must move through HBM, and the weight-streaming bound they set (bench e2e).

Shape legend: B sequences in a decode step, c tokens of context per sequence (its KV cache),
T prompt tokens, E experts, k top-k, L layers, g KV heads, D head_dim.

A decode step of B sequences reads, at the least:
  - every non-expert weight once (attention projections, norms, router gates, shared experts, dense
    MLP layers, lm_head): `dense`;
  - one row per token of the tables indexed by token or position (embedding, rotary cos / sin): `rows`;
  - the routed experts that receive at least one token, each expert's w13 + w2 whole (and its biases):
    `experts`. Under uniform random routing (each token picks k distinct experts of E, independently of the
    other tokens) the expected number of distinct experts hit per MoE layer is E * (1 - (1 - k / E) ** B);
    measured counts can replace it;
  - the KV cache of the batch: B * c * 2 * L * g * D * element bytes read, B * 2 * L * g * D written; per token
    the cache holds what the model declares (MoECausalLM.kv_cache_shapes): MLA (DeepSeek) one latent of
    kv_lora_rank + rope dims per layer, not K and V (kv_token_bytes against kv_token_bytes_full_kv, the K/V cache
    the same attention would need); a sliding-window layer (gpt-oss) reads at most its window's tokens per
    sequence (kv_token_bytes_windowed of each token's bytes, window sliding_window).
Activations, logits and routing metadata are left out (small against weights at decode sizes).
The weight bytes come from the loaded tensors themselves (parameters, buffers, and the backend's
prepared expert layout), so any quantization (int4 weights, group scales, zero points, kernel-layout
metadata) is counted exactly as stored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_BANDWIDTH_TBPS = 3.0  # the device-to-device copy rate measured on an H100 SXM (DESIGN.md section 5)


@dataclass(frozen=True)
class ModelBytes:
    """A loaded model's tensors, split by how a step reads them."""

    dense: int  # read whole by every step
    row_bytes: int  # per token: one row of each token- or position-indexed table
    expert_bytes: tuple[int, ...]  # per MoE layer: one routed expert's w13 + w2, every tensor it is stored as
    num_experts: int
    top_k: int
    kv_token_bytes: int  # the cache of one token over all layers: 2 * L * g * D * element bytes (MLA: L * (L_kv + R))
    # a K and a V per KV head of one token over all layers: kv_token_bytes, except under MLA, where it is the
    # per-head keys (Dn + R) and values (Dv) the latent expands to: the K/V cache MLA's latent cache replaces
    kv_token_bytes_full_kv: int = 0
    kv_token_bytes_windowed: int = 0  # the part of kv_token_bytes in sliding-window layers
    sliding_window: int | None = None  # their window (gpt-oss)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepBytes:
    """Bytes of one step by kind (see the module docstring); experts_hit is per MoE layer."""

    dense: int
    rows: int
    experts: float
    kv_read: int
    kv_write: int
    experts_hit: tuple[float, ...]

    @property
    def total(self) -> float:
        return self.dense + self.rows + self.experts + self.kv_read + self.kv_write

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts receiving at least one of `tokens` tokens, each routed to top_k distinct
    experts chosen uniformly at random and independently of the other tokens: an expert is missed by
    one token with probability 1 - k / E."""
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor in `obj`: a tensor, a dataclass of tensors (QuantizedWeight, the kernels' weight
    layouts), or a tuple / list of those; None and other values hold none."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors_of(getattr(obj, f.name))]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_of(o)]
    return []


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in `obj` (tensors_of)."""
    return sum(t.numel() * t.element_size() for t in tensors_of(obj))


def _key(t: torch.Tensor):
    """One key per memory: a backend layout that aliases a parameter counts once (meta tensors have no
    address, so there the tensor object)."""
    if t.device.type == "meta" or t.numel() == 0:
        return id(t)
    return t.device, t.data_ptr(), t.numel() * t.element_size()


def _row_table_bytes(module: nn.Module) -> int | None:
    """Bytes one token reads from `module` if it is a table indexed by token id or position, else None."""
    from light_moe.layers.rotary import RotaryEmbedding

    if isinstance(module, nn.Embedding):
        return module.weight.shape[1] * module.weight.element_size()
    if isinstance(module, RotaryEmbedding):
        return sum(b.shape[-1] * b.element_size() for b in module.buffers(recurse=False) if b.dim() == 2)
    return None


def model_bytes(model, kv_element_size: int) -> ModelBytes:
    """ModelBytes of a loaded MoECausalLM (after its MoE blocks prepared their expert layouts).

    Expert weights are those a block computes with: the backend's prepared layout if it has one, else
    the canonical stack. Their bytes per expert are the stack's bytes over its experts (the local ones
    under expert parallelism). Everything else is dense: every parameter and buffer, and the `prepared`
    weight layout a module may hold outside them (QuantizedLinear's), each memory once (a tied lm_head
    counts whole, its embedding rows once more per token)."""
    cfg = model.config
    blocks = model.moe_blocks()
    expert_keys = set()
    expert_bytes = []
    for block in blocks:
        weights = block.prepared if block.prepared is not None else block.experts.weights()
        held = list(block.experts.parameters()) + list(block.experts.buffers()) + tensors_of(weights)
        # gpt-oss's expert biases: every rank holds all experts' (layers/moe.py ExpertBiases); a hit expert reads its
        # own rows
        biases = [] if block.expert_biases is None else list(block.expert_biases.parameters())
        expert_keys.update(_key(t) for t in held + biases)
        experts_held = weights[0].shape[0]
        unique = {_key(t): t for t in tensors_of(weights)}
        expert_bytes.append(tensor_bytes(list(unique.values())) // experts_held
                            + tensor_bytes(biases) // block.num_experts)
    dense, rows = 0, 0
    counted = set(expert_keys)
    for module in model.modules():
        row = _row_table_bytes(module)
        if row is not None:
            rows += row
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if module not in blocks:
            own += tensors_of(getattr(module, "prepared", None))
        for t in own:
            if _key(t) not in counted:
                counted.add(_key(t))
                dense += tensor_bytes(t)
    per_layer = [sum(math.prod(shape[2:]) for shape in layer) * kv_element_size
                 for layer in model.kv_cache_shapes(1, 1)]  # one token's cache per layer
    windowed = sum(b for i, b in enumerate(per_layer) if cfg.attention_window(i) is not None)
    if cfg.mla is not None:
        full_kv = cfg.num_layers * cfg.num_heads * (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
                                                    + cfg.mla.v_head_dim) * kv_element_size
    else:
        full_kv = sum(per_layer)
    return ModelBytes(dense=dense, row_bytes=rows, expert_bytes=tuple(expert_bytes), num_experts=cfg.num_experts,
                      top_k=cfg.top_k, kv_token_bytes=sum(per_layer), kv_token_bytes_full_kv=full_kv,
                      kv_token_bytes_windowed=windowed, sliding_window=cfg.layer_window if windowed else None)


def kv_read_bytes(mb: ModelBytes, batch: int, context: float) -> int:
    """KV bytes a decode step of `batch` sequences with `context` cached tokens each reads: every token of the
    full-attention layers, at most sliding_window tokens of the windowed ones."""
    windowed = mb.kv_token_bytes_windowed
    seen = context if mb.sliding_window is None else min(context, mb.sliding_window)
    return round(batch * (context * (mb.kv_token_bytes - windowed) + seen * windowed))


def _hits(mb: ModelBytes, tokens: int, experts_hit) -> tuple[float, ...]:
    layers = len(mb.expert_bytes)
    if experts_hit is None:
        return (expected_experts_hit(mb.num_experts, mb.top_k, tokens),) * layers
    if isinstance(experts_hit, (int, float)):
        return (float(experts_hit),) * layers
    if len(experts_hit) != layers:
        raise ValueError(f"experts_hit has {len(experts_hit)} values for {layers} MoE layers")
    return tuple(float(h) for h in experts_hit)


def decode_step_bytes(mb: ModelBytes, batch: int, context: float, experts_hit=None) -> StepBytes:
    """One decode step of `batch` sequences with `context` cached tokens each. experts_hit: distinct
    experts per MoE layer (one number for all, or one per layer); default: uniform random routing."""
    hits = _hits(mb, batch, experts_hit)
    return StepBytes(dense=mb.dense, rows=batch * mb.row_bytes,
                     experts=sum(h * b for h, b in zip(hits, mb.expert_bytes)),
                     kv_read=kv_read_bytes(mb, batch, context), kv_write=batch * mb.kv_token_bytes,
                     experts_hit=hits)


def prefill_bytes(mb: ModelBytes, prompt_len: int, experts_hit=None) -> StepBytes:
    """One prompt of `prompt_len` tokens alone: every weight it touches once, its KV written once (its own
    keys and values come from the projections, so none are read from the cache)."""
    hits = _hits(mb, prompt_len, experts_hit)
    return StepBytes(dense=mb.dense, rows=prompt_len * mb.row_bytes,
                     experts=sum(h * b for h, b in zip(hits, mb.expert_bytes)),
                     kv_read=0, kv_write=prompt_len * mb.kv_token_bytes, experts_hit=hits)


def bound_tok_s(batch: int, step: StepBytes, bandwidth_bytes_s: float) -> float:
    """Decode tokens/s if every step only streamed its bytes at `bandwidth_bytes_s`."""
    return batch * bandwidth_bytes_s / step.total
