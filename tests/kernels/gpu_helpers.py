"""Helpers shared by the grouped-GEMM GPU tests (bf16 and W4A16)."""
import torch

from light_moe.ops import reference


def routing(num_tokens: int, num_experts: int, top_k: int, device, generator):
    """Random distinct top-k experts per token; expert 1 never chosen (an empty expert) when E > K.
    Returns reference.routing_metadata: (expert_offsets, gather_index, reverse_index)."""
    scores = torch.rand(num_tokens, num_experts, device=device, generator=generator)
    if num_experts > top_k:
        scores[:, 1] = -1.0
    topk_ids = scores.topk(top_k, dim=-1).indices.to(torch.int32)  # [T, K]
    return reference.routing_metadata(topk_ids, num_experts)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def replay_up_down_on_new_routing(up, down, x, gather_index, offsets, act, y, top_k: int, generator) -> None:
    """Capture up(x, gather_index, offsets, out=act) + down(act, offsets, out=y) in a CUDA graph (warmed up on a
    side stream first), then give the captured inputs new routing and new x, poison act and y with NaN and
    replay: the graph must read the device-side routing of the replay, not the capture's."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        up(x, gather_index, offsets, out=act)  # compile + warm up outside the capture
        down(act, offsets, out=y)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        up(x, gather_index, offsets, out=act)
        down(act, offsets, out=y)

    num_experts = offsets.numel() - 1
    new_offsets, new_gather, _ = routing(x.shape[0], num_experts, top_k, x.device, generator)
    offsets.copy_(new_offsets)
    gather_index.copy_(new_gather)
    x.copy_(torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator))
    act.fill_(float("nan"))
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()


def w4a16_reference_up(x, gather_index, expert_offsets, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """The W4A16 kernels' fp32 oracle: dequantise the canonical w13 then reference.expert_up -> act [M, I] fp32."""
    from light_moe.kernels.w4a16_layout import dequantize_reference

    w13 = dequantize_reference(qweight, scales, zeros, group_size)
    return reference.expert_up(x.float(), gather_index, expert_offsets, w13)


def w4a16_reference_down(act, expert_offsets, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """Dequantise the canonical w2 then reference.expert_down in fp32 -> y [M, H] fp32."""
    from light_moe.kernels.w4a16_layout import dequantize_reference

    w2 = dequantize_reference(qweight, scales, zeros, group_size)
    return reference.expert_down(act.float(), expert_offsets, w2)
