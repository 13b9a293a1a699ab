"""gpt-oss groundwork (issue 22 item 2; the model family itself is not supported yet, docs/models.md): the
reference attention with sinks and a sliding window over the paged cache, against transformers' gpt-oss
eager attention on the same queries, keys and values (float32, CPU), for chunked queries with a cached past."""
import types

import pytest
import torch

from light_moe.ops.attention import AttentionMetadata
from light_moe.ops.backend import ReferenceOps


@pytest.mark.parametrize("window", [None, 4])
def test_sinks_and_sliding_window_match_transformers(window):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, scale = 4, 2, 8, 4, 0.35
    ctx_lens, q_lens = [7, 10, 3], [2, 10, 1]  # a prefill chunk over a cached past, a whole prefill, a decode
    sinks = torch.randn(heads)
    k_cache, v_cache = torch.randn(12, block_size, kv_heads, dim), torch.randn(12, block_size, kv_heads, dim)
    tables = torch.tensor([[4, 9, 0], [1, 2, 7], [11, 0, 0]], dtype=torch.int32)
    meta = AttentionMetadata.for_lengths(ctx_lens, q_lens, tables)
    q = torch.randn(sum(q_lens), heads, dim)
    got = ReferenceOps().attention(q, k_cache, v_cache, meta, scale, sinks=sinks, sliding_window=window)

    module = types.SimpleNamespace(sinks=sinks, num_key_value_groups=heads // kv_heads, training=False)
    start = 0
    for b, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        k = k_cache[tables[b].long()].reshape(-1, kv_heads, dim)[:c].transpose(0, 1)[None]  # [1, g, C, D]
        v = v_cache[tables[b].long()].reshape(-1, kv_heads, dim)[:c].transpose(0, 1)[None]
        qpos, kpos = torch.arange(c - n, c)[:, None], torch.arange(c)[None]
        allowed = (kpos <= qpos) & ((kpos > qpos - window) if window is not None else True)
        mask = torch.zeros(n, c).masked_fill(~allowed, float("-inf"))[None, None]
        expected, _ = eager_attention_forward(module, q[start:start + n].transpose(0, 1)[None], k, v, mask, scale)
        torch.testing.assert_close(got[start:start + n], expected[0], rtol=1e-5, atol=1e-6)
        start += n
    # the sinks and the window really change the result
    plain = ReferenceOps().attention(q, k_cache, v_cache, meta, scale)
    assert (plain - got).abs().max() > 1e-3
