"""The reference attention with gpt-oss's sinks and sliding window (ops/attention.py paged_attention_sinks) on the CPU:
query rows in memory-bounded chunks give exactly the unchunked result, and both match a direct per-row fp64
softmax (sink in the denominator, keys p - W + 1 ... p) on random inputs over a shuffled paged cache.

Shape legend: B sequences, h query heads, g KV heads, D head_dim, bs block size.
"""
import pytest
import torch

from light_moe.ops.attention import AttentionMetadata, paged_attention_sinks

H, G, D, BS = 8, 2, 16, 4
# (ctx_len, q_len): a fresh prompt, a chunk on a cached prefix, a decode row, a prompt shorter than the window
SEQS = [(37, 37), (50, 13), (29, 1), (3, 3)]


def _problem(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-ctx // BS) for ctx, _ in SEQS]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, BS, G, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BS, G, D, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(SEQS), max(blocks) + 2, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    meta = AttentionMetadata.for_lengths([c for c, _ in SEQS], [n for _, n in SEQS], tables)
    q = torch.randn(sum(n for _, n in SEQS), H, D, generator=gen).to(dtype) * 2
    sinks = torch.randn(H, generator=gen) * 2
    return q, k_cache, v_cache, meta, sinks


def _direct(q, k_cache, v_cache, meta, scale, sinks, window) -> torch.Tensor:
    """Row by row in fp64: softmax over [visible logits, sink] with the sink's share dropped."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    row = 0
    for b, (ctx, q_len) in enumerate(SEQS):
        slots = torch.arange(ctx)
        blk = meta.block_tables[b, slots // BS].long()
        k = k_cache[blk, slots % BS].double().repeat_interleave(H // G, dim=1)  # [ctx, h, D]
        v = v_cache[blk, slots % BS].double().repeat_interleave(H // G, dim=1)
        for i in range(q_len):
            pos = ctx - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            for head in range(H):
                logits = k[lo:pos + 1, head] @ q[row, head].double() * scale
                if sinks is not None:
                    logits = torch.cat((logits, sinks[head].double().view(1)))
                probs = torch.softmax(logits, dim=0)[:pos + 1 - lo]
                out[row, head] = probs @ v[lo:pos + 1, head]
            row += 1
    return out


@pytest.mark.parametrize("window", [None, 1, 5, 8, 40])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_chunked_rows_equal_unchunked(window, with_sinks):
    if window is None and not with_sinks:
        pytest.skip("plain causal attention runs paged_attention")
    q, k_cache, v_cache, meta, sinks = _problem(seed=3 * (window or 0) + with_sinks)
    sinks = sinks if with_sinks else None
    whole = paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, sinks, window)
    row_bytes = len(SEQS) * H * (meta.max_ctx_len + 1) * q.element_size()
    for rows in (1, 2, 5, meta.max_query_len - 1):
        chunked = paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, sinks, window,
                                        logits_budget_bytes=rows * row_bytes)
        assert torch.equal(chunked, whole), f"{rows} rows per chunk"
    tiny = paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, sinks, window, logits_budget_bytes=1)
    assert torch.equal(tiny, whole)
    ref = _direct(q, k_cache, v_cache, meta, 0.25, sinks, window)
    assert torch.allclose(whole.double(), ref, rtol=1e-5, atol=1e-5), (whole.double() - ref).abs().max()


def test_window_and_sink_change_the_result():
    """The direct reference is not blind to either addition: each one moves the output."""
    q, k_cache, v_cache, meta, sinks = _problem(seed=1)
    plain = paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, None, 10 ** 6)
    assert not torch.allclose(plain, paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, sinks, None))
    assert not torch.allclose(plain, paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, None, 5))


def test_bf16_chunked_equal_unchunked():
    q, k_cache, v_cache, meta, sinks = _problem(seed=9, dtype=torch.bfloat16)
    whole = paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, sinks.bfloat16(), 7)
    chunked = paged_attention_sinks(q, k_cache, v_cache, meta, 0.25, sinks.bfloat16(), 7, logits_budget_bytes=1)
    assert torch.equal(chunked, whole)
    ref = _direct(q, k_cache, v_cache, meta, 0.25, sinks.bfloat16(), 7)
    err = ((whole.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
