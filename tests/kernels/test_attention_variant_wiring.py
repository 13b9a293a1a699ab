"""CPU checks of gpt-oss's attention variants on the CuTe backend (kernels/attention_variant.py): what the decode and
prefill kernels say they take (sinks [h] in fp32 / bf16 / fp16, a window >= 1), that CuteOps hands sinks and the
window to the kernels for gpt-oss's shapes, and that what they cannot take runs on the reference with the reason
logged. The kernels themselves are checked on the GPU in test_decode_attention_gpu.py / test_prefill_attention_gpu.py.

Shape legend: N tokens, h query heads, g KV heads, D head_dim, bs block size.
"""
import logging

import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.kernels import decode_attention as da  # noqa: E402
from light_moe.kernels import prefill_attention as pa  # noqa: E402
from light_moe.ops.attention import AttentionMetadata  # noqa: E402
from light_moe.ops.backend import ReferenceOps  # noqa: E402
from light_moe.ops.cute_backend import CuteOps  # noqa: E402

GPT_OSS = (64, 8, 64, 16)  # h, g, D, bs


@pytest.mark.parametrize("kernel", [da, pa])
def test_supports_sinks_and_window(kernel):
    h, g, d, bs = GPT_OSS
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kernel.supports(torch.bfloat16, h, g, d, bs, torch.zeros(h, dtype=dtype), 128) == (True, "ok")
    assert kernel.supports(torch.bfloat16, h, g, d, bs, None, 1) == (True, "ok")
    assert "fp32 / bf16 / fp16" in kernel.supports(torch.bfloat16, h, g, d, bs, torch.zeros(h, dtype=torch.float64))[1]
    assert f"[{h}]" in kernel.supports(torch.bfloat16, h, g, d, bs, torch.zeros(h // 2))[1]
    assert "contiguous" in kernel.supports(torch.bfloat16, h, g, d, bs, torch.zeros(2 * h)[::2])[1]
    for window in (0, -3, 2.5, True):
        assert not kernel.supports(torch.bfloat16, h, g, d, bs, None, window)[0]
    assert not kernel.supports(torch.bfloat16, h, g, d, 24, torch.zeros(h), 128)[0]  # the shape check still first


def _decode_problem(dtype=torch.bfloat16):
    h, g, d, bs = GPT_OSS
    ctx = [40, 7]
    tables = torch.tensor([[1, 2, 3], [4, 0, 0]], dtype=torch.int32)
    meta = AttentionMetadata.for_lengths(ctx, [1, 1], tables)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, h, d, generator=gen).to(dtype)
    k_cache = torch.randn(5, bs, g, d, generator=gen).to(dtype)
    v_cache = torch.randn(5, bs, g, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, meta


def test_gpt_oss_attention_goes_to_the_kernels(monkeypatch):
    """Decode and prefill steps of gpt-oss's shapes reach the kernels with the layer's sinks and window."""
    q, k_cache, v_cache, meta = _decode_problem()
    sinks = torch.randn(GPT_OSS[0])
    calls = []

    def fake(name):
        def run(*args, **kwargs):
            calls.append((name, kwargs["sinks"], kwargs["sliding_window"]))
            return args[0]
        return run

    monkeypatch.setattr(da, "decode_attention", fake("decode"))
    monkeypatch.setattr(pa, "prefill_attention", fake("prefill"))
    ops = CuteOps()
    ops.attention(q, k_cache, v_cache, meta, 0.125, sinks=sinks, sliding_window=16)
    prefill_meta = AttentionMetadata.for_lengths([40, 7], [5, 7], meta.block_tables)
    ops.attention(q.repeat(6, 1, 1)[:12], k_cache, v_cache, prefill_meta, 0.125, sinks=sinks)
    assert calls == [("decode", sinks, 16), ("prefill", sinks, None)]


def test_what_the_kernels_cannot_take_runs_on_the_reference(caplog):
    q, k_cache, v_cache, meta = _decode_problem(torch.float32)  # fp32 activations: neither kernel takes them
    sinks = torch.randn(GPT_OSS[0])
    with caplog.at_level(logging.WARNING):
        got = CuteOps().attention(q, k_cache, v_cache, meta, 0.125, sinks=sinks, sliding_window=9)
    want = ReferenceOps().attention(q, k_cache, v_cache, meta, 0.125, sinks=sinks, sliding_window=9)
    assert torch.equal(got, want)
    assert "decode attention with sinks / sliding window unavailable" in caplog.text
    q, k_cache, v_cache, meta = _decode_problem()
    with caplog.at_level(logging.WARNING):
        got = CuteOps().attention(q, k_cache, v_cache, meta, 0.125, sinks=sinks.double(), sliding_window=9)
    assert torch.equal(got, ReferenceOps().attention(q, k_cache, v_cache, meta, 0.125, sinks=sinks.double(),
                                                     sliding_window=9))
    assert "fp32 / bf16 / fp16 sinks" in caplog.text


def test_decode_attention_gets_merge_counters_that_outlive_their_graphs(monkeypatch, caplog):
    """fuse_attention_merge: decode steps pass one zeroed counter buffer per device (>= B * g, reused); a buffer
    outgrown by a larger batch stays alive (graphs captured with it keep writing there); a first need inside a
    graph capture keeps the combine kernel for that graph (logged once); the option off passes none."""
    q, k_cache, v_cache, meta = _decode_problem()
    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs["merge_counters"])
        return args[0]

    monkeypatch.setattr(da, "decode_attention", fake)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    ops = CuteOps(fuse_attention_merge=True)
    for _ in range(2):
        ops.attention(q, k_cache, v_cache, meta, 0.125)
    first = seen[0]
    assert seen[1] is first and first.dtype == torch.int32 and first.numel() >= 2 * GPT_OSS[1] and not first.any()
    bigger = ops._attention_merge_counters(q.device, first.numel() + 1)
    assert bigger.numel() > first.numel() and ops._outgrown_counters == [first]
    capturing[0] = True
    with caplog.at_level(logging.WARNING):
        assert ops._attention_merge_counters(q.device, 4 * bigger.numel()) is None
        assert ops._attention_merge_counters(q.device, 4 * bigger.numel()) is None
    assert sum("inside CUDA graph capture" in r.getMessage() for r in caplog.records) == 1
    assert ops._attention_merge_counters(q.device, 8) is bigger  # within the buffer: fine while capturing
    CuteOps().attention(q, k_cache, v_cache, meta, 0.125)
    assert seen[-1] is None
