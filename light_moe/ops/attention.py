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
