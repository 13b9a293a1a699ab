"""Self-attention of the supported families: one fused q/k/v projection (optional bias; the loader
stacks the checkpoints' q_proj / k_proj / v_proj rows into qkv_proj), optional q/k RMSNorm (per head
for Qwen3-MoE, over all heads for OLMoE), optional clipping (OLMoE clip_qkv), RoPE fused with the
paged KV-cache write, attention over the paged cache, output projection (optional bias). gpt-oss adds a learned
per-head sink logit to every softmax denominator (sinks) and, on some layers, a sliding window. The rotary,
cache write and attention run on the ops backend (ops/backend.py: the reference, or the CuTe kernels on sm_90a).

Shape legend: N tokens in the step, h heads, g KV heads, D head_dim, H hidden.
"""
from __future__ import annotations

import torch
from torch import nn

from light_moe.config import ModelConfig
from light_moe.layers.linear import DenseLinear, QuantizedLinear
from light_moe.layers.norm import RMSNorm
from light_moe.layers.rotary import RotaryEmbedding
from light_moe.ops.attention import AttentionMetadata, causal_attention
from light_moe.ops.reference import causal_attention_sinks


class Attention(nn.Module):
    # checkpoint tensors whose rows stack into qkv_proj, in this order (models/base.py stacked_params)
    qkv_parts = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, ops, dtype=None, device=None,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = sliding_window  # this layer's window (cfg.attention_window), None: the whole context
        self.scale = cfg.head_dim ** -0.5
        self.clip_qkv = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        self.ops = ops
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_sizes = (q_dim, kv_dim, kv_dim)  # rows of q_proj, k_proj, v_proj inside qkv_proj
        kw = dict(dtype=dtype, device=device)
        # one GEMM instead of three: at decode each is a weight-streaming GEMV with its own split-K reduction
        # on the ops backend (DenseLinear): the CuTe backend runs decode rows on its skinny weight-streaming GEMM
        self.qkv_proj = DenseLinear(cfg.hidden_size, q_dim + 2 * kv_dim, cfg.qkv_bias, ops, **kw)
        self.o_proj = DenseLinear(q_dim, cfg.hidden_size, cfg.o_proj_bias, ops, **kw)
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads, **kw), requires_grad=False) if cfg.attention_sinks \
            else None
        if cfg.qk_norm == "per_head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops=ops, **kw)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops=ops, **kw)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, ops=ops, **kw)
            self.k_norm = RMSNorm(kv_dim, cfg.rms_norm_eps, ops=ops, **kw)
        self.rotary = rotary

    def use_quantized_projections(self, scheme) -> None:
        """Hold qkv_proj and o_proj as W4A16 QuantizedLinear (scheme: quant.scheme.W4A16Config), run on the ops
        backend; called on the meta device, before weights are allocated (the loader quantizes them)."""
        self.qkv_proj = QuantizedLinear.like(self.qkv_proj, scheme, self.ops)
        self.o_proj = QuantizedLinear.like(self.o_proj, scheme, self.ops)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
                meta: AttentionMetadata | None) -> torch.Tensor:
        n, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)  # [N, h*D], [N, g*D], [N, g*D] (views)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if self.qk_norm == "per_head":
            q = self.q_norm(q.reshape(n * heads, dim)).view(n, heads * dim)
            k = self.k_norm(k.reshape(n * kv_heads, dim)).view(n, kv_heads * dim)
        variant = self._attention_variant()
        if kv_cache is None:  # memory profiling: one sequence, no cache
            q, k = self.rotary(positions, q.reshape(n, heads, dim), k.reshape(n, kv_heads, dim))
            if variant:
                out = causal_attention_sinks(q, k, v.reshape(n, kv_heads, dim), self.scale, **variant)
            else:
                out = causal_attention(q, k, v.reshape(n, kv_heads, dim), self.scale)
        else:
            q = self.ops.rope_write_kv(q, k, v, positions, self.rotary.cos, self.rotary.sin, kv_cache[0],
                                       kv_cache[1], meta.slot_mapping)  # [N, h, D]
            out = self.ops.attention(q, kv_cache[0], kv_cache[1], meta, self.scale, **variant)  # [N, h, D]
        return self.o_proj(out.reshape(n, heads * dim))

    def _attention_variant(self) -> dict:
        """The ops' attention-variant arguments (gpt-oss's sinks and window; none for plain causal attention)."""
        variant = {}
        if self.sinks is not None:
            variant["sinks"] = self.sinks
        if self.sliding_window is not None:
            variant["sliding_window"] = self.sliding_window
        return variant
