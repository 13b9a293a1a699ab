"""Self-attention of the supported families: q/k/v projections (optional bias), optional q/k
RMSNorm (per head for Qwen3-MoE, over all heads for OLMoE), optional clipping (OLMoE clip_qkv),
RoPE, paged KV cache, output projection. Parameter names follow the HF checkpoints.

Shape legend: N tokens in the step, h heads, g KV heads, D head_dim, H hidden.
"""
from __future__ import annotations

import torch
from torch import nn

from light_moe.config import ModelConfig
from light_moe.layers.norm import RMSNorm
from light_moe.layers.rotary import RotaryEmbedding
from light_moe.ops.attention import AttentionMetadata, causal_attention, paged_attention, write_kv


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype=None, device=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.clip_qkv = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias, **kw)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias, **kw)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False, **kw)
        if cfg.qk_norm == "per_head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, **kw)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(kv_dim, cfg.rms_norm_eps, **kw)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
                meta: AttentionMetadata | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [N, h*D], [N, g*D], [N, g*D]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        if kv_cache is None:  # memory profiling: one sequence, no cache
            out = causal_attention(q, k, v, self.scale)
        else:
            write_kv(kv_cache[0], kv_cache[1], k, v, meta.slot_mapping)
            out = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))
