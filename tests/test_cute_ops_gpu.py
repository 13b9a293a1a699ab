"""Every op of a decoder layer on the CuTe backend against the reference backend, op by op, at the small token
counts of decode and at the tiny model sizes the engine GPU tests use (H 128 and 256, 4 heads / 2 KV heads,
head_dim 64): when an engine-level comparison diverges, this names the op. Fresh random inputs, NaN-poisoned
caches beyond the written slots, relative L2 error < 1e-2 (bf16)."""
import pytest
import torch

from light_moe.ops.attention import AttentionMetadata
from light_moe.ops.backend import ReferenceOps

pytestmark = pytest.mark.gpu


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def cute():
    from light_moe.ops.cute_backend import CuteOps

    return CuteOps()


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
@pytest.mark.parametrize("hidden", [128, 256, 4096])
@pytest.mark.parametrize("tokens", [1, 3, 4, 17])
def test_norm_and_moe_ops(cute, hidden, tokens):
    gen = torch.Generator(device="cuda").manual_seed(hidden + tokens)
    ref = ReferenceOps()
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=gen)
    residual = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=gen)
    weight = 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt, generator=gen)
    assert rel_l2(cute.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5)) < 1e-2, "rms_norm"
    want_out, want_res = ref.rms_norm(x, weight, 1e-5, residual.clone())
    got_out, got_res = cute.rms_norm(x, weight, 1e-5, residual.clone())
    assert rel_l2(got_res, want_res) < 1e-2 and rel_l2(got_out, want_out) < 1e-2, "rms_norm with residual"

    experts, inter, top_k = 8, 128, 2
    gate = torch.randn(experts, hidden, device=dev, dtype=dt, generator=gen) * 0.1
    w13 = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dt, generator=gen) * 0.05
    w2 = torch.randn(experts, hidden, inter, device=dev, dtype=dt, generator=gen) * 0.05
    want_w, want_ids, _, _ = ref.route(x, gate, top_k, True)
    got_w, got_ids, _, meta = cute.route(x, gate, top_k, True)
    assert torch.equal(got_ids.long().sort(-1).values, want_ids.long().sort(-1).values), "router ids"
    want = ref.experts(x, want_w, want_ids, w13, w2)
    w13p, w2p = cute.prepare_expert_weights(w13, w2)
    got = cute.experts(x, got_w, got_ids, w13p, w2p, metadata=meta)
    assert rel_l2(got, want) < 1e-2, "routed experts (route + up + down + combine)"


@pytest.mark.skipif(not _sm90(), reason="CuTe kernels need sm_90")
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (32, 8, 128)])
@pytest.mark.parametrize("ctx", [[1, 40, 80], [17], [75, 3, 130, 64]])
def test_rope_and_attention_ops(cute, heads, kv_heads, head_dim, ctx):
    """A decode step (one new token per sequence) and a prefill step (each sequence's last 5 tokens new) with
    q, k, v as column slices of one fused qkv output."""
    from light_moe.layers.rotary import RotaryEmbedding

    gen = torch.Generator(device="cuda").manual_seed(sum(ctx) + heads)
    ref = ReferenceOps()
    dev, dt, bs = "cuda", torch.bfloat16, 16
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, device=dev)
    num_blocks = 64
    cache_shape = (num_blocks, bs, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, device=dev, dtype=dt, generator=gen)
    v_cache = torch.randn(cache_shape, device=dev, dtype=dt, generator=gen)
    perm = torch.randperm(num_blocks, device=dev, generator=gen).tolist()
    tables, width = [], max(-(-c // bs) for c in ctx)
    for c in ctx:
        tables.append([perm.pop() for _ in range(-(-c // bs))])
    for new in (1, 5):
        new_per_seq = [min(new, c) for c in ctx]
        n = sum(new_per_seq)
        qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device=dev, dtype=dt, generator=gen)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        positions, slots = [], []
        for b, (c, m) in enumerate(zip(ctx, new_per_seq)):
            positions += range(c - m, c)
            slots += [tables[b][p // bs] * bs + p % bs for p in range(c - m, c)]

        def t(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=dev)

        meta = AttentionMetadata.for_lengths(ctx, new_per_seq, t([tb + [0] * (width - len(tb)) for tb in tables],
                                                                 torch.int32), t(slots))
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        q_ref = ref.rope_write_kv(q, k, v, t(positions), rotary.cos, rotary.sin, k_ref, v_ref, meta.slot_mapping)
        q_got = cute.rope_write_kv(q, k, v, t(positions), rotary.cos, rotary.sin, k_cache, v_cache,
                                   meta.slot_mapping)
        assert rel_l2(q_got, q_ref) < 1e-2, f"rotary q ({new} new)"
        assert torch.equal(k_cache, k_ref) or rel_l2(k_cache, k_ref) < 1e-3, f"rotary k / cache write ({new} new)"
        assert torch.equal(v_cache, v_ref), f"v cache write ({new} new)"
        scale = head_dim ** -0.5
        want = ref.attention(q_ref, k_ref, v_ref, meta, scale)
        got = cute.attention(q_ref, k_ref, v_ref, meta, scale)
        assert rel_l2(got, want) < 1e-2, f"{'decode' if new == 1 else 'prefill'} attention"
