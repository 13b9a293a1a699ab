"""Where the eager MoE layer loses time against its CUDA-graph replay (prefill sizes), on one GPU.

    python scripts/profile_moe_layer_eager.py --tokens 1024 4096 [--trace-dir DIR]

Per T: the whole CuTe layer (router, metadata, up, down, combine) on the Mixtral-8x7B shape, timed
eagerly and from a CUDA graph (CUDA events, median of 20), then one eager call under torch.profiler:
the GPU time of each kernel, the host time of each launch wrapper, and the idle GPU time between
kernels (the part of the eager-vs-graph gap that launch overhead explains), and the host time of each
op's call measured without the profiler (GPU idle at the call). With --trace-dir a Chrome trace per T
is written there.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

E, H, INTER, K = 8, 4096, 14336, 2


def host_costs(ops, x, gate, w13p, w2p, iters: int = 20) -> dict[str, float]:
    """Host (Python + launch) time of each op of the layer, the GPU idle before each call: the time the
    eager layer can expose when the kernels before a launch finish sooner than its host work. Without
    the profiler, whose own overhead inflates host time."""
    import statistics
    import time

    def host_us(fn) -> float:
        times = []
        for _ in range(iters):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        return statistics.median(times)

    weights, ids, _ = ops.router(x, gate, K, True)
    offsets, gather_index, reverse_index = ops.routing_metadata(ids, E)
    act = ops.expert_up(x, gather_index, offsets, w13p)
    y = ops.expert_down(act, offsets, w2p)
    return {
        "router": host_us(lambda: ops.router(x, gate, K, True)),
        "metadata": host_us(lambda: ops.routing_metadata(ids, E)),
        "up": host_us(lambda: ops.expert_up(x, gather_index, offsets, w13p)),
        "down": host_us(lambda: ops.expert_down(act, offsets, w2p)),
        "combine": host_us(lambda: ops.combine(y, reverse_index, weights)),
        "layer": host_us(lambda: ops.moe_forward(x, gate, w13p, w2p, K, True)),
    }


def main() -> None:
    from light_moe.bench.timing import graph_replay, time_us
    from light_moe.ops.cute_backend import CuteOps

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--trace-dir", default=None)
    args = parser.parse_args()
    ops = CuteOps()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * INTER, H, device="cuda", generator=gen) * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, INTER, device="cuda", generator=gen) * INTER**-0.5).bfloat16()
    gate = (torch.randn(E, H, device="cuda", generator=gen) * H**-0.5).bfloat16()
    w13p, w2p = ops.prepare_expert_weights(w13, w2)
    del w13, w2
    for tokens in args.tokens:
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)

        def layer(x=x):
            return ops.moe_forward(x, gate, w13p, w2p, K, True)

        eager_us, graph_us = time_us(layer, 20), time_us(graph_replay(layer), 20)
        host = host_costs(ops, x, gate, w13p, w2p)
        print(f"T={tokens}: host time per call (GPU idle before each call, median of 20): "
              + ", ".join(f"{name} {us:.0f} us" for name, us in host.items()))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            layer()
            torch.cuda.synchronize()
        kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda e: e.time_range.start)
        busy = sum(e.time_range.elapsed_us() for e in kernels)
        span = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0
        print(f"T={tokens}: eager {eager_us:.0f} us, graph {graph_us:.0f} us; profiled eager call: "
              f"{len(kernels)} kernels, GPU busy {busy:.0f} us of a {span:.0f} us span (idle {span - busy:.0f} us)")
        for e in kernels:
            print(f"    {e.time_range.elapsed_us():9.1f} us  {e.name[:100]}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        if args.trace_dir:
            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.trace_dir) / f"moe_layer_eager_T{tokens}.json"))


if __name__ == "__main__":
    main()
