"""Reference attention over the paged KV cache: SDPA over gathered blocks.

Shape legend: N tokens in the step, B sequences, h query heads, g KV heads, D head_dim,
Q longest query chunk in the step, C longest context (cached + new) in the step.
Each sequence b contributes q_lens[b] new tokens whose positions are ctx_lens[b] - q_lens[b] ...
ctx_lens[b] - 1; its keys are the first ctx_lens[b] slots of its block table. This one function
serves prefill, chunked prefill and decode alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

# query rows of paged_attention_sinks go in chunks whose logits stay within this many bytes (a 2048-token prompt of
# gpt-oss-20b's 64 heads would otherwise hold 64 * 2048 * 2048 logits at once per layer and sequence: 0.5 GB in bf16,
# 1 GB in fp32; softmax and its inputs hold about three such tensors at a time)
SINK_LOGITS_BUDGET_BYTES = 256 << 20


@dataclass
class AttentionMetadata:
    """What every attention implementation of a step needs. The kernels (kernels/decode_attention.py,
    kernels/prefill_attention.py) read block_tables, ctx_lens and query_start (int32, contiguous); the
    reference below also uses query_pos, padded_index and the mask derived from them."""
    slot_mapping: torch.Tensor  # [N] int64: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    ctx_lens: torch.Tensor  # [B] int32: keys per sequence after this step
    query_pos: torch.Tensor  # [B, Q] int64: position of each padded query row (-1 for padding)
    padded_index: torch.Tensor  # [N] int64: row of each token in the flattened [B * Q] padding
    max_query_len: int
    max_ctx_len: int
    query_start: torch.Tensor | None = None  # [B + 1] int32: first token of each sequence in the N rows

    @classmethod
    def for_lengths(cls, ctx_lens: list[int], query_lens: list[int], block_tables: torch.Tensor,
                    slot_mapping: torch.Tensor | None = None) -> AttentionMetadata:
        """The metadata of sequences with these context and query lengths (each sequence's queries are its last
        query_lens[b] positions) over `block_tables` [B, max_blocks] int32: for tests and warm-up steps; the
        runner builds a step's metadata itself (executor/model_runner.py prepare)."""
        device = block_tables.device
        batch, max_q = len(ctx_lens), max(query_lens)
        query_pos, padded, starts = [], [], [0]
        for b, (c, n) in enumerate(zip(ctx_lens, query_lens)):
            query_pos += list(range(c - n, c)) + [-1] * (max_q - n)
            padded += range(b * max_q, b * max_q + n)
            starts.append(starts[-1] + n)
        if slot_mapping is None:
            slot_mapping = torch.zeros(0, dtype=torch.long, device=device)
        return cls(slot_mapping=slot_mapping, block_tables=block_tables,
                   ctx_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                   query_pos=torch.tensor(query_pos, device=device).view(batch, max_q),
                   padded_index=torch.tensor(padded, dtype=torch.long, device=device), max_query_len=max_q,
                   max_ctx_len=max(ctx_lens), query_start=torch.tensor(starts, dtype=torch.int32, device=device))

    @cached_property
    def attn_mask(self) -> torch.Tensor:
        """[B, 1, Q, C] bool, derived once per step (on first use) rather than in every layer's attention;
        the attention kernels never build it."""
        batch = self.block_tables.shape[0]
        key_pos = torch.arange(self.max_ctx_len, device=self.query_pos.device)
        qpos = self.query_pos.unsqueeze(-1)  # [B, Q, 1]
        mask = (key_pos <= qpos) & (key_pos < self.ctx_lens.view(batch, 1, 1))  # [B, Q, C]
        # padded query rows (qpos = -1) would mask every key and turn softmax into NaN: let them see key 0
        mask[..., 0] |= qpos[..., 0] < 0
        return mask.unsqueeze(1)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values [N, g, D] into the paged cache [blocks, block_size, g, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Causal attention of q [N, h, D] over the cached keys; returns [N, h, D]."""
    num_tokens, num_heads, head_dim = q.shape
    batch = meta.block_tables.shape[0]
    max_q, max_c = meta.max_query_len, meta.max_ctx_len
    block_size = k_cache.shape[1]
    num_kv_heads = k_cache.shape[2]

    group = num_heads // num_kv_heads  # r query heads share each KV head (GQA; 1 for MHA)

    q_pad = q.new_zeros(batch * max_q, num_heads, head_dim)
    q_pad.index_copy_(0, meta.padded_index, q)
    # [B, h, Q, D] -> [B, g, r * Q, D]: query head j * r + i (the heads of KV head j, as repeat_interleave
    # pairs them) becomes rows i * Q ... i * Q + Q - 1 of group j. The keys are then read once per KV head
    # instead of being copied r times (two [B, h, C, D] copies per layer were ~10% of a decode step)
    q_pad = q_pad.view(batch, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q_pad = q_pad.reshape(batch, num_kv_heads, group * max_q, head_dim)
    mask = meta.attn_mask  # [B, 1, Q, C]; with Q = 1 (decode) it broadcasts over the r rows as it is
    if group > 1 and max_q > 1:
        mask = mask.repeat(1, 1, group, 1)  # row i * Q + t is query t

    blocks_needed = (max_c + block_size - 1) // block_size
    tables = meta.block_tables[:, :blocks_needed]
    k = k_cache[tables].reshape(batch, blocks_needed * block_size, num_kv_heads, head_dim)[:, :max_c]
    v = v_cache[tables].reshape(batch, blocks_needed * block_size, num_kv_heads, head_dim)[:, :max_c]
    k = k.transpose(1, 2)  # [B, g, C, D]
    v = v.transpose(1, 2)

    out = F.scaled_dot_product_attention(q_pad, k, v, attn_mask=mask, scale=scale)  # [B, g, r * Q, D]
    out = out.view(batch, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)  # [B, Q, g, r, D]
    out = out.reshape(batch * max_q, num_heads, head_dim)
    return out.index_select(0, meta.padded_index)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention of one sequence without a cache (memory profiling): [N, h, D]."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads != num_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


# ---- multi-head latent attention (DeepSeek MLA) over a paged latent cache ----------------------------------
# Shape legend here: L kv_lora_rank, R rotary dims, Dn / Dv per-head no-rope key / value dims.


def paged_mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, kv_b_weight: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal MLA of q [N, h, Dn + R] (rotary part rotated) over each sequence's cached latents
    [blocks, block_size, L + R] (normalised latent, rotated shared key); kv_b_weight [h * (Dn + Dv), L] turns a
    latent into the heads' no-rope keys and values. Returns [N, h, Dv].

    Decode steps (one query per sequence) take the absorbed path: W_UK folded into the query (q_nope W_UK ->
    [N, h, L]), attention directly over the latents, W_UV applied to the attended latent, so the per-head keys
    and values of the context are never formed. Other steps decompress the context's latents into per-head
    keys and values (cheaper when many queries share them). Both compute the same attention."""
    num_tokens, num_heads, qk_dim = q.shape
    lora = kv_b_weight.shape[1]
    rope_dim = latent_cache.shape[-1] - lora
    nope = qk_dim - rope_dim
    v_dim = kv_b_weight.shape[0] // num_heads - nope
    batch, max_q, max_c = meta.block_tables.shape[0], meta.max_query_len, meta.max_ctx_len
    block_size = latent_cache.shape[1]

    blocks_needed = (max_c + block_size - 1) // block_size
    tables = meta.block_tables[:, :blocks_needed]
    ctx = latent_cache[tables].reshape(batch, blocks_needed * block_size, lora + rope_dim)[:, :max_c]  # [B, C, L+R]

    q_pad = q.new_zeros(batch * max_q, num_heads, qk_dim)
    q_pad.index_copy_(0, meta.padded_index, q)
    q_pad = q_pad.view(batch, max_q, num_heads, qk_dim).transpose(1, 2)  # [B, h, Q, Dn + R]
    w = kv_b_weight.view(num_heads, nope + v_dim, lora)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # [h, Dn, L], [h, Dv, L]
    if max_q == 1:
        q_lat = torch.einsum("bhqd,hdl->bhql", q_pad[..., :nope], w_uk)  # [B, h, 1, L]
        q_abs = torch.cat((q_lat, q_pad[..., nope:]), dim=-1)  # [B, h, 1, L + R]
        keys = ctx.unsqueeze(1)  # [B, 1, C, L + R], shared by the heads
        out_lat = F.scaled_dot_product_attention(q_abs, keys, keys[..., :lora], attn_mask=meta.attn_mask,
                                                 scale=scale, enable_gqa=True)  # [B, h, 1, L]
        out = torch.einsum("bhql,hvl->bhqv", out_lat, w_uv)  # [B, h, 1, Dv]
    else:
        kv = F.linear(ctx[..., :lora], kv_b_weight).view(batch, max_c, num_heads, nope + v_dim)  # [B, C, h, Dn+Dv]
        k_nope, v = kv.split([nope, v_dim], dim=-1)
        k_pe = ctx[..., lora:].unsqueeze(2).expand(batch, max_c, num_heads, rope_dim)
        k = torch.cat((k_nope, k_pe), dim=-1).transpose(1, 2)  # [B, h, C, Dn + R]
        out = F.scaled_dot_product_attention(q_pad, k, v.transpose(1, 2), attn_mask=meta.attn_mask,
                                             scale=scale)  # [B, h, Q, Dv]
    out = out.transpose(1, 2).reshape(batch * max_q, num_heads, v_dim)
    return out.index_select(0, meta.padded_index)


def paged_attention_sinks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float, sinks: torch.Tensor | None = None, sliding_window: int | None = None,
                          logits_budget_bytes: int = SINK_LOGITS_BUDGET_BYTES) -> torch.Tensor:
    """paged_attention with gpt-oss's two additions (transformers' gpt_oss eager attention): sinks [h], a learned
    per-head logit that joins every row's softmax denominator and attends to nothing; sliding_window W, a query
    at position p sees keys at positions p - W + 1 ... p only (key_pos > p - W). Returns [N, h, D].

    Query rows go in chunks of as many as keep the [B, g, r, rows, C] logits within logits_budget_bytes (at least
    one row per chunk); every row's softmax is its own, so the result does not depend on the chunking."""
    num_tokens, num_heads, head_dim = q.shape
    batch, max_q, max_c = meta.block_tables.shape[0], meta.max_query_len, meta.max_ctx_len
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    blocks_needed = (max_c + block_size - 1) // block_size
    tables = meta.block_tables[:, :blocks_needed]
    k, v = (cache[tables].reshape(batch, blocks_needed * block_size, num_kv_heads, head_dim)[:, :max_c]
            .transpose(1, 2) for cache in (k_cache, v_cache))  # [B, g, C, D]
    q_pad = q.new_zeros(batch * max_q, num_heads, head_dim)
    q_pad.index_copy_(0, meta.padded_index, q)
    q_pad = q_pad.view(batch, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # [B, g, r, Q, D]
    mask = meta.attn_mask.unsqueeze(1)  # [B, 1, 1, Q, C]
    if sliding_window is not None:
        key_pos = torch.arange(max_c, device=q.device)
        in_window = key_pos > meta.query_pos.unsqueeze(-1) - sliding_window  # [B, Q, C]
        mask = mask & in_window.view(batch, 1, 1, max_q, max_c)
    sink_logits = None if sinks is None else sinks.view(1, num_kv_heads, group, 1, 1)
    row_bytes = batch * num_heads * (max_c + 1) * q.element_size()  # one query row's logits, sink included
    rows = max(1, min(max_q, logits_budget_bytes // row_bytes))
    out = q.new_empty(batch, num_kv_heads, group, max_q, head_dim)
    for start in range(0, max_q, rows):
        end = min(start + rows, max_q)
        # the r query heads of KV head j (j * r ... j * r + r - 1, as repeat_interleave pairs them) as r * n rows
        # of one product with its keys, so K and V are never copied per query head
        q_rows = q_pad[:, :, :, start:end].reshape(batch, num_kv_heads, group * (end - start), head_dim)
        logits = (q_rows @ k.transpose(-1, -2)).view(batch, num_kv_heads, group, end - start, max_c) * scale
        logits.masked_fill_(~mask[..., start:end, :], float("-inf"))
        if sink_logits is not None:
            sink = sink_logits.to(logits.dtype).expand(batch, -1, -1, end - start, 1)
            logits = torch.cat((logits, sink), dim=-1)
        logits -= logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :max_c]  # the sink's share is dropped
        probs = probs.to(v.dtype).reshape(batch, num_kv_heads, group * (end - start), max_c)
        out[:, :, :, start:end] = (probs @ v).view(batch, num_kv_heads, group, end - start, head_dim)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch * max_q, num_heads, head_dim)  # [B * Q, h, D]
    return out.index_select(0, meta.padded_index)
