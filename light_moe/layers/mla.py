"""Multi-head latent attention (DeepSeek-V2 / V3) over a paged cache of the compressed latent, and the
YaRN rotary tables it uses.

Shape legend: N tokens in the step, H hidden, h heads, L kv_lora_rank, R qk_rope_head_dim (rotary dims),
Dn qk_nope_head_dim, Dv v_head_dim, P positions of the rotary tables.

Per token the cache holds only [latent (L), rotated shared key (R)]: L + R values per layer instead of the
2 * h * D of a K/V cache (576 against 2 * 128 * 192 for DeepSeek-V3), which is what MLA is for. The model
declares that shape (MoECausalLM.kv_cache_shapes); the runner sizes and allocates the cache from it.

    q        = q_b_proj(rms(q_a_proj(x)))  or  q_proj(x)            [N, h, Dn + R]
    latent   = rms(kv_a_proj_with_mqa(x)[:, :L]),  k_pe = ...[:, L:]  [N, L], [N, R]
    ops.mla_rope_write: rotate q's R dims and k_pe; cache [latent, k_pe]
    ops.mla_attention: prefill decompresses the context's latents with kv_b_proj into per-head keys and
        values; decode absorbs kv_b_proj's key half into the query and its value half into the output
        (ops/attention.py paged_mla_attention)
    o_proj                                                          [N, H]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from light_moe.config import ModelConfig, YarnScaling
from light_moe.layers.linear import DenseLinear
from light_moe.layers.norm import RMSNorm
from light_moe.layers.rotary import RotaryEmbedding
from light_moe.ops.reference import apply_rope, apply_rope_interleaved

# DeepSeek's q_a_layernorm / kv_a_layernorm are built without the config's rms_norm_eps (the reference code
# and transformers both leave them at the RMSNorm default)
LATENT_NORM_EPS = 1e-6


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, scaling: YarnScaling, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2], cos / sin multiplier) of YaRN, step for step as transformers computes
    them (modeling_rope_utils._compute_yarn_parameters), so the float32 tables are identical."""
    factor = scaling.factor
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1
    original = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class YarnRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose tables follow YaRN (scaling None: default RoPE), cos and sin multiplied by its
    attention factor as transformers does. The loader rebuilds it after materialising the model (build)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: YarnScaling | None, device=None):
        self.scaling = scaling
        super().__init__(head_dim, max_positions, theta, device)

    def build(self, device) -> None:
        if self.scaling is None:
            return super().build(device)
        inv_freq, attention_factor = yarn_inv_freq(self.head_dim, self.theta, self.scaling, device)
        freqs = torch.outer(torch.arange(self.max_positions, device=device).float(), inv_freq)  # [P, R / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, R]
        self.register_buffer("cos", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_factor, persistent=False)


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1 / sqrt(Dn + R), times YaRN's mscale(factor, mscale_all_dim) squared: DeepSeek scales every dim of
    q.k, not only the rotary ones (transformers' yarn_apply_mscale)."""
    scale = (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim) ** -0.5
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    """Checkpoint names as DeepSeek's: q_proj or q_a_proj / q_a_layernorm / q_b_proj, kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, ops, dtype=None, device=None):
        super().__init__()
        mla = cfg.mla
        self.num_heads = cfg.num_heads
        # head_dim: the width of each head's attention output, as Attention's (prefill graphs size buffers by it)
        self.head_dim = mla.v_head_dim
        self.nope_dim, self.rope_dim, self.kv_lora_rank = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
        self.qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        self.interleave = mla.rope_interleave
        self.scale = mla_softmax_scale(cfg)
        self.rotary = rotary
        self.ops = ops
        kw = dict(dtype=dtype, device=device)
        h, hidden, bias = cfg.num_heads, cfg.hidden_size, mla.attention_bias
        # the projections a step runs as matmuls are DenseLinear (the ops backend's dense_linear: decode rows on
        # the CuTe skinny GEMM); kv_b_proj's weight is read by the absorbed decode path (ops.mla_attention)
        if mla.q_lora_rank is None:
            self.q_proj = DenseLinear(hidden, h * self.qk_dim, False, ops, **kw)
        else:
            self.q_a_proj = DenseLinear(hidden, mla.q_lora_rank, bias, ops, **kw)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, ops=ops, **kw)
            self.q_b_proj = DenseLinear(mla.q_lora_rank, h * self.qk_dim, False, ops, **kw)
        self.kv_a_proj_with_mqa = DenseLinear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias, ops, **kw)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, ops=ops, **kw)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, h * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False, **kw)
        self.o_proj = DenseLinear(h * mla.v_head_dim, hidden, bias, ops, **kw)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: tuple[torch.Tensor] | None,
                meta) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, self.num_heads, self.qk_dim)  # [N, h, Dn + R]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [N, L], [N, R]
        latent = self.kv_a_layernorm(latent)
        if kv_cache is None:  # memory profiling: one sequence, no cache
            out = self._uncached(q, latent, k_pe, positions)
        else:
            q = self.ops.mla_rope_write(q, latent, k_pe, positions, self.rotary.cos, self.rotary.sin, kv_cache[0],
                                        meta.slot_mapping, self.interleave)  # [N, h, Dn + R]
            out = self.ops.mla_attention(q, kv_cache[0], self.kv_b_proj.weight, meta, self.scale)  # [N, h, Dv]
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))

    def _uncached(self, q, latent, k_pe, positions) -> torch.Tensor:
        """Causal attention of one sequence from its own latents (the runner's activation profile)."""
        n, h = q.shape[0], self.num_heads
        cos, sin = self.rotary.cos[positions].to(q.dtype), self.rotary.sin[positions].to(q.dtype)
        rotate = apply_rope_interleaved if self.interleave else apply_rope
        q = torch.cat((q[..., :self.nope_dim], rotate(q[..., self.nope_dim:], cos, sin)), dim=-1)
        k_pe = rotate(k_pe.unsqueeze(1), cos, sin).expand(n, h, self.rope_dim)
        k_nope, v = self.kv_b_proj(latent).view(n, h, -1).split([self.nope_dim, self.head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                             scale=self.scale)
        return out.transpose(0, 1)  # [N, h, Dv]
