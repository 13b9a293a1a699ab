"""Paged attention (ops/attention.py) against plain per-sequence causal attention over the unpaged keys:
MHA and GQA, decode rows, prefill chunks after cached tokens and padded query rows in one batch, blocks
of the cache scattered in random order."""
import pytest
import torch

from light_moe.ops.attention import AttentionMetadata, paged_attention, write_kv


def naive(q, k, v, start: int, scale: float) -> torch.Tensor:
    """q [n, h, D] at positions start..start+n-1; k, v [C, g, D] (C = start + n): [n, h, D], float64."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(heads // kv_heads, dim=1)
    v = v.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    qpos = torch.arange(start, start + q.shape[0]).view(1, -1, 1)
    scores = scores.masked_fill(torch.arange(k.shape[0]).view(1, 1, -1) > qpos, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("chunks", [[(0, 7), (12, 1), (30, 5)], [(9, 1), (3, 1), (40, 1)]])
def test_paged_attention_equals_per_sequence_attention(heads, kv_heads, chunks):
    """chunks: (cached tokens, new tokens) per sequence; the second case is a pure decode batch (Q = 1)."""
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads + len(chunks))
    dim, block_size, num_blocks = 16, 4, 64
    # unused slots poisoned with large finite values (the engine's cache starts zeroed and only ever holds
    # finite keys, so masked slots are finite too): a key attended by mistake changes the output a lot
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), 1e3)
    v_cache = torch.full_like(k_cache, -1e3)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_q = max(n for _, n in chunks)
    qs, keys, values, slots, tables, query_pos, padded_index, ctx_lens = [], [], [], [], [], [], [], []
    for b, (cached, new) in enumerate(chunks):
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        k = torch.randn(total, kv_heads, dim, generator=gen)
        v = torch.randn(total, kv_heads, dim, generator=gen)
        write_kv(k_cache, v_cache, k[:cached], v[:cached],
                 torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(cached)],
                              dtype=torch.long))
        qs.append(torch.randn(new, heads, dim, generator=gen))
        keys.append(k)
        values.append(v)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, total)]
        tables.append(table)
        query_pos.append(list(range(cached, total)) + [-1] * (max_q - new))
        padded_index += [b * max_q + i for i in range(new)]
        ctx_lens.append(total)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        ctx_lens=torch.tensor(ctx_lens), query_pos=torch.tensor(query_pos), padded_index=torch.tensor(padded_index),
        max_query_len=max_q, max_ctx_len=max(ctx_lens))
    # this step's keys are written first, as the attention layer does
    write_kv(k_cache, v_cache, torch.cat([k[c:] for k, (c, _) in zip(keys, chunks)]),
             torch.cat([v[c:] for v, (c, _) in zip(values, chunks)]), meta.slot_mapping)
    scale = dim ** -0.5
    got = paged_attention(torch.cat(qs), k_cache, v_cache, meta, scale)
    want = torch.cat([naive(q, k, v, c, scale) for q, k, v, (c, _) in zip(qs, keys, values, chunks)])
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    assert rel_l2(got, want) < 1e-5
