"""kernels/l2_prefetch.py on the GPU (H100/H200): it writes nothing (poisoned neighbours and the prefetched tensors
keep every bit), it orders like any kernel of the stream (a copy launched before it is visible to the torch op
after it), it runs inside a CUDA graph, and the largest ranges (a 512 MB weight, uneven tails) launch cleanly."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="CuTe kernels need sm_90")]


def test_prefetch_writes_nothing_and_keeps_stream_order():
    from light_moe.kernels import l2_prefetch

    gen = torch.Generator(device="cuda").manual_seed(5)
    arena = torch.randn(3 << 20, device="cuda", generator=gen).bfloat16()  # 6 MB
    snapshot = arena.clone()
    ranges = [arena[16: 16 + (1 << 20)], arena[(2 << 20): (2 << 20) + 4104], arena[-8:]]  # 2 MB, uneven, 16 bytes
    src = torch.randn(1 << 20, device="cuda", generator=gen)
    dst = torch.zeros_like(src)
    dst.copy_(src)  # the prefetch's predecessor in the stream
    l2_prefetch.l2_prefetch(ranges)
    total = dst.sum()  # after it: sees the copy
    torch.cuda.synchronize()
    assert torch.equal(arena, snapshot)
    assert torch.equal(total, src.sum())


def test_prefetch_in_a_cuda_graph_and_large_ranges():
    from light_moe.kernels import l2_prefetch

    big = torch.empty(256 << 20, dtype=torch.bfloat16, device="cuda")  # 512 MB: every CTA issues many chunks
    scales = torch.ones(4096 * 32 + 8, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4096, device="cuda")
    y = torch.empty_like(x)
    l2_prefetch.l2_prefetch([big, scales])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        l2_prefetch.l2_prefetch([big, scales])
        y.copy_(x * 2)
    for _ in range(3):
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, x * 2)
    assert torch.equal(scales, torch.ones_like(scales))
