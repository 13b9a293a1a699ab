"""GPU timing shared by the benchmarks: CUDA-event medians, and CUDA-graph replays of a callable."""
from __future__ import annotations

import statistics

import torch


def time_us(fn, iters: int, warmup: int = 3) -> float:
    """Median GPU microseconds of fn(), each call between two CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_replay(fn):
    """Capture fn (after a warm-up on a side stream: compilation and allocations stay out of the capture) and
    return the replay of its graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay
