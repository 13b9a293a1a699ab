"""Pure-PyTorch reference of every MoE op, and at the end of the decoder layer's norm and rotary ops.
Correct on any device and dtype; the yardstick for kernels.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows.
A routed row is one (token, slot) assignment; "sorted" order groups the M rows by expert, stably
(rows of expert 0 first, within an expert by token then slot), which every backend must reproduce
so that results are comparable row by row.

Expert weights (w13, w2) are either stacked float tensors or W4A16 QuantizedWeight objects
(light_moe/quant/w4a16.py); `expert_weight` is the one place that tells them apart: the reference
dequantises one expert at a time, so W4A16 runs (slowly) on any device.

Op chain of the MoE layer:
    router -> routing_metadata -> expert_up (gather + gate/up GEMM + SiLU*up) -> expert_down -> combine
A config.ExpertConfig spec (gpt-oss) adds per-expert biases b13 [E, 2I] / b2 [E, H] to the two GEMMs and
swaps SiLU*up for its clamped SwiGLU (expert_activation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def router(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate logits -> softmax (fp32) -> top-k -> optional renormalisation.

    Returns topk_weights [T, K] float32, topk_ids [T, K] int32, tokens_per_expert [E] int32.
    Ties in the top-k go to the lower expert index (torch.topk on CPU and CUDA does this for
    sorted=True on distinct values; exact ties are vanishingly rare with real logits).
    """
    num_experts = gate_weight.shape[0]
    logits = F.linear(x, gate_weight).float()  # [T, E]
    probs = torch.softmax(logits, dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    tokens_per_expert = torch.bincount(topk_ids.flatten(), minlength=num_experts).to(torch.int32)
    return topk_weights, topk_ids.to(torch.int32), tokens_per_expert


def spec_router(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    top_k: int,
    renormalize: bool,
    spec,  # config.RouterConfig
    correction_bias: torch.Tensor | None = None,  # [E] (spec.correction_bias)
    gate_bias: torch.Tensor | None = None,  # [E] (spec.gate_bias)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing variants of config.RouterConfig, in float32 from the logits on (DeepSeek keeps its gate in
    float32): scores (softmax or sigmoid of the logits) -> choice scores (+ correction bias) -> optional group
    limit (the topk_group best of n_group groups; the others' experts are never chosen) -> top-k of the
    choice scores -> weights are the unbiased scores of the chosen experts (softmax_topk: the softmax of their
    logits), optionally renormalised, times routed_scaling_factor. Same outputs as router()."""
    num_experts = gate_weight.shape[0]
    logits = F.linear(x.float(), gate_weight.float(), None if gate_bias is None else gate_bias.float())  # [T, E]
    if spec.scoring == "softmax_topk":  # gpt-oss: top-k of the logits, softmax over those k
        top_logits, topk_ids = torch.topk(logits, top_k, dim=-1)  # [T, K]
        topk_weights = torch.softmax(top_logits, dim=-1)
    else:
        scores = torch.sigmoid(logits) if spec.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if spec.n_group > 1:
            groups = choice.view(-1, spec.n_group, num_experts // spec.n_group)  # [T, G, E / G]
            group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1) if spec.group_score == "top2_sum" \
                else groups.max(dim=-1).values  # [T, G]
            group_ids = torch.topk(group_scores, spec.topk_group, dim=-1)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
            # V3 fills with -inf; V2 with 0.0, which is below every softmax probability: the same choice
            choice = choice.masked_fill(~keep.repeat_interleave(num_experts // spec.n_group, dim=1), float("-inf"))
        topk_ids = torch.topk(choice, top_k, dim=-1)[1]  # [T, K]
        topk_weights = scores.gather(1, topk_ids)
        if renormalize:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * spec.routed_scaling_factor
    tokens_per_expert = torch.bincount(topk_ids.flatten(), minlength=num_experts).to(torch.int32)
    return topk_weights, topk_ids.to(torch.int32), tokens_per_expert


def routing_metadata(
    topk_ids: torch.Tensor,  # [T, K] int32
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group routed rows by expert without leaving the device.

    Returns
      expert_offsets [E + 1] int32: rows of expert e are sorted rows expert_offsets[e]:expert_offsets[e+1]
      gather_index   [M] int32: token row of each sorted row
      reverse_index  [M] int32: sorted position of assignment t * K + k
    """
    flat = topk_ids.flatten().long()  # [M]
    top_k = topk_ids.shape[1] if topk_ids.dim() == 2 else 1
    counts = torch.bincount(flat, minlength=num_experts)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids.device)
    expert_offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    order = torch.sort(flat, stable=True).indices  # [M] assignment ids in sorted order
    gather_index = (order // top_k).to(torch.int32)
    reverse_index = torch.empty_like(order)
    reverse_index[order] = torch.arange(order.numel(), device=order.device)
    return expert_offsets, gather_index, reverse_index.to(torch.int32)


def _expert_ranges(expert_offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each non-empty expert. Host sync: reference only."""
    offsets = expert_offsets.tolist()
    return [(e, offsets[e], offsets[e + 1]) for e in range(len(offsets) - 1) if offsets[e + 1] > offsets[e]]


def expert_weight(w, expert: int) -> torch.Tensor:
    """Float weight [N, K] of one expert: a slice of a stacked tensor, or a QuantizedWeight
    dequantised (in input-channel order, act-order permutation undone) in the scale dtype."""
    return w[expert] if isinstance(w, torch.Tensor) else w.dequantize_expert(expert)


def expert_activation(gate: torch.Tensor, up: torch.Tensor, spec=None) -> torch.Tensor:
    """SiLU(gate) * up, or spec's (a config.ExpertConfig) clamped SwiGLU as gpt-oss computes it: gate clamped
    above at limit, up to [-limit, limit], gate * sigmoid(alpha * gate) * (up + 1). [m, I]"""
    if spec is None or spec.activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=spec.limit)
    up = up.clamp(min=-spec.limit, max=spec.limit)
    return gate * torch.sigmoid(gate * spec.alpha) * (up + 1)


def expert_up(
    x: torch.Tensor,  # [T, H]
    gather_index: torch.Tensor,  # [M]
    expert_offsets: torch.Tensor,  # [E + 1]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows 0:I, up rows I:2I (or a QuantizedWeight)
    spec=None,  # config.ExpertConfig: the activation (None: SiLU * up)
    bias: torch.Tensor | None = None,  # [E, 2I] b13, in w13's row order
) -> torch.Tensor:
    """act = SiLU(x_g @ W1^T) * (x_g @ W3^T) per expert over its gathered rows (spec's activation, the bias
    added to the GEMM) -> [M, I]."""
    inter = w13.shape[1] // 2
    rows = x.index_select(0, gather_index.long())  # [M, H]
    act = x.new_empty(rows.shape[0], inter)
    for e, start, end in _expert_ranges(expert_offsets):
        gate_up = rows[start:end] @ expert_weight(w13, e).t()  # [m, 2I]
        if bias is not None:
            gate_up = gate_up + bias[e]
        act[start:end] = expert_activation(gate_up[:, :inter], gate_up[:, inter:], spec)
    return act


def expert_down(
    act: torch.Tensor,  # [M, I]
    expert_offsets: torch.Tensor,  # [E + 1]
    w2: torch.Tensor,  # [E, H, I]
    bias: torch.Tensor | None = None,  # [E, H] b2
) -> torch.Tensor:
    """y = act @ W2^T (+ b2) per expert -> [M, H] in sorted order."""
    out = act.new_empty(act.shape[0], w2.shape[1])
    for e, start, end in _expert_ranges(expert_offsets):
        y = act[start:end] @ expert_weight(w2, e).t()
        out[start:end] = y if bias is None else y + bias[e]
    return out


def combine(
    y: torch.Tensor,  # [M, H] sorted rows
    reverse_index: torch.Tensor,  # [M]
    topk_weights: torch.Tensor,  # [T, K] float32
) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * y[reverse_index[t * K + k]], summed in fp32 in slot order -> [T, H]."""
    num_tokens, top_k = topk_weights.shape
    rows = y.index_select(0, reverse_index.long()).view(num_tokens, top_k, -1).float()  # [T, K, H]
    out = (rows * topk_weights.float().unsqueeze(-1)).sum(dim=1)
    return out.to(y.dtype)


def moe_forward(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    top_k: int,
    renormalize: bool,
) -> torch.Tensor:
    """The whole routed-expert block in one call: the reference the fused kernels are checked against."""
    topk_weights, topk_ids, _ = router(x, gate_weight, top_k, renormalize)
    offsets, gather_index, reverse_index = routing_metadata(topk_ids, gate_weight.shape[0])
    act = expert_up(x, gather_index, offsets, w13)
    y = expert_down(act, offsets, w2)
    return combine(y, reverse_index, topk_weights)


# ---- the non-MoE ops of a decoder layer ------------------------------------------------------------------------
# Shape legend here: N tokens, h query heads, g KV heads, D head_dim, P positions of the rotary tables.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim as the HF checkpoints compute it: normalise in fp32, round to x's dtype, then
    multiply by weight (one more rounding). With residual: s = x + residual first (rounded to the dtype) and
    the result is (norm(s), s), s being the new residual stream."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (out, x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; cos, sin [N, D] already in x's dtype (rotate-half convention of the HF checkpoints)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def rope_write_kv(
    q: torch.Tensor,  # [N, h * D], rows may be strided (a column slice of the fused qkv output)
    k: torch.Tensor,  # [N, g * D]
    v: torch.Tensor,  # [N, g * D]
    positions: torch.Tensor,  # [N] int64
    cos: torch.Tensor,  # [P, D] float32
    sin: torch.Tensor,  # [P, D] float32
    k_cache: torch.Tensor,  # [blocks, block_size, g, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [N] int64
) -> torch.Tensor:
    """Rotate q and k, write k and v into the paged cache at slot_mapping; returns rotated q [N, h, D]."""
    n, head_dim = q.shape[0], k_cache.shape[-1]
    c, s = cos[positions].to(q.dtype), sin[positions].to(q.dtype)  # [N, D]
    q = apply_rope(q.reshape(n, -1, head_dim), c, s)
    k = apply_rope(k.reshape(n, -1, head_dim), c, s)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.reshape(n, -1, head_dim))
    return q


def causal_attention_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           sinks: torch.Tensor | None = None, sliding_window: int | None = None,
                           chunk: int = 1024) -> torch.Tensor:
    """Causal attention of one sequence without a cache (the runner's memory profile) with gpt-oss's sinks [h]
    and sliding window, as ops/attention.py paged_attention_sinks computes it: q [N, h, D], k, v [N, g, D] ->
    [N, h, D]. Query rows go `chunk` at a time, so the logits are [h, chunk, N] whatever the profiled N."""
    n, heads, dim = q.shape
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [h, N, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    out = q.new_empty(n, heads, dim)
    positions = torch.arange(n, device=q.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        qpos, kpos = positions[start:end, None], positions[None, :end]  # later keys are masked for every row
        allowed = kpos <= qpos  # [c, C]
        if sliding_window is not None:
            allowed = allowed & (kpos > qpos - sliding_window)
        logits = (q[start:end].transpose(0, 1) @ k[:, :end].transpose(1, 2)) * scale  # [h, c, C]
        logits = logits.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            logits = torch.cat((logits, sinks.to(logits.dtype).view(-1, 1, 1).expand(-1, end - start, 1)), dim=-1)
        probs = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)[..., :end]
        out[start:end] = (probs.to(v.dtype) @ v[:, :end]).transpose(0, 1)
    return out


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, R] whose rotary pairs are interleaved ((x0, x1), (x2, x3), ...: DeepSeek's layout); cos,
    sin [N, R] as the tables hold them (the R/2 angles twice). Returns the rotated pairs de-interleaved (all
    first members, then all second members), as transformers' DeepSeek-V3 does: queries and keys get the
    same permutation, so their dot products are those of the interleaved layout."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def mla_rope_write(
    q: torch.Tensor,  # [N, h, Dn + R]: the no-rope part, then the rotary part
    latent: torch.Tensor,  # [N, L] normalised KV latent (may be a strided column slice)
    k_pe: torch.Tensor,  # [N, R] the shared rotary key, not yet rotated
    positions: torch.Tensor,  # [N] int64
    cos: torch.Tensor,  # [P, R] float32
    sin: torch.Tensor,
    latent_cache: torch.Tensor,  # [blocks, block_size, L + R]
    slot_mapping: torch.Tensor,  # [N] int64
    interleave: bool,
) -> torch.Tensor:
    """Multi-head latent attention's rotary + cache write: rotate q's last R dims and k_pe, write
    [latent, rotated k_pe] into the latent cache at slot_mapping; returns q with its rotary part rotated."""
    rope_dim = k_pe.shape[-1]
    c, s = cos[positions].to(q.dtype), sin[positions].to(q.dtype)  # [N, R]
    rotate = apply_rope_interleaved if interleave else apply_rope
    q_nope, q_pe = q.split([q.shape[-1] - rope_dim, rope_dim], dim=-1)
    k_rot = rotate(k_pe.unsqueeze(1), c, s).squeeze(1)  # [N, R]
    latent_cache.view(-1, latent_cache.shape[-1]).index_copy_(0, slot_mapping, torch.cat((latent, k_rot), dim=-1))
    return torch.cat((q_nope, rotate(q_pe, c, s)), dim=-1)
