"""GPU timing shared by the benchmarks: CUDA-event medians, CUDA-graph replays of a callable, alternating rounds."""
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


def round_robin(variants: dict, rounds: int, timer) -> dict[str, dict[str, float]]:
    """Time each variant once per round, in forward order on even rounds and reverse order on odd ones, so
    that a clock drift over the run (power, heat) falls on all of them alike: median, min, max per name."""
    samples = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            samples[name].append(timer(variants[name]))
    return {name: dict(median=statistics.median(v), min=min(v), max=max(v)) for name, v in samples.items()}


def timing_entry(stats: dict[str, float], nbytes: int) -> dict:
    """One variant's round_robin stats as a result entry: us (median), min_us, max_us and the rate at which the
    median time moves `nbytes`, in GB/s and TB/s."""
    us = stats["median"]
    return dict(us=round(us, 3), min_us=round(stats["min"], 3), max_us=round(stats["max"], 3),
                gbps=round(nbytes / us / 1e3, 1), tbps=round(nbytes / us / 1e6, 3))
