"""Benchmark of the routing-side kernels: router, routing metadata, combine (python -m light_moe.bench.router_bench).

Shape legend: T tokens, E experts, K top-k, H hidden, M = T * K routed rows.

Every kernel time is GPU time per call from a CUDA graph holding 20 back-to-back calls (median of
the replays; host launch cost excluded, inter-kernel gaps included), because that is how the
engine runs decode. Torch baselines: the reference op eager (its bincount syncs the host, so it
cannot be captured) and, for the router, a capturable torch version (linear, softmax, topk,
scatter_add counts) replayed from a graph. Inputs of T <= 256 stay in L2 between replays, as the
previous layer's output would. "read_x_us" is bytes(x) over the card's measured copy bandwidth
(read + write of a 1 GiB buffer): the floor of any router at large T.
Writes JSON with GPU name, torch and CuTe DSL versions (light_moe.bench.env).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from light_moe.bench.env import environment
from light_moe.bench.timing import graph_replay, time_us
from light_moe.kernels import combine, router, routing
from light_moe.ops import reference

REPS = 20


def graph_us(fn, replays: int = 15) -> float:
    """GPU microseconds per fn() call, from a CUDA graph of REPS calls."""
    fn()  # compile outside the graph
    return time_us(graph_replay(lambda: [fn() for _ in range(REPS)]), replays) / REPS


def eager_us(fn, iters: int = 30) -> float:
    """Wall-clock-inclusive time per call on the stream (launch overhead and host syncs included)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src), replays=5)
    return 2 * src.numel() * 2 / us / 1e3


def torch_router_graphable(x, w, top_k, renorm, counts):
    probs = torch.softmax(F.linear(x, w).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renorm:
        weights = weights / weights.sum(-1, keepdim=True)
    counts.zero_().scatter_add_(0, ids.flatten(), torch.ones_like(ids.flatten()))
    return weights, ids


def _tile_label(t: router.RouterTile) -> str:
    return f"mw{t.mw}ng{t.ng}ks{t.ks}mt{t.mt}ntw{t.ntw}u{t.unroll}eg{t.eg}hs{t.hs}"


def bench_router(rows, copy_gbs, experts, hidden, top_k, tokens_list, tiles=None):
    w = (torch.randn(experts, hidden, device="cuda") / hidden ** 0.5).bfloat16()
    for tokens in tokens_list:
        rows.append(_router_row(copy_gbs, w, top_k, tokens, tiles))


def _router_row(copy_gbs, w, top_k, tokens, tiles):
    experts, hidden = w.shape
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights = torch.empty(tokens, top_k, device="cuda")
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device="cuda")
    counts = torch.empty(experts, dtype=torch.int32, device="cuda")
    counts64 = torch.empty(experts, dtype=torch.int64, device="cuda")
    auto = router.choose_tile(experts, tokens, hidden * 2)
    candidates = [("auto", auto)] + [(_tile_label(t), t) for t in (tiles or []) if t != auto]
    row = {"op": "router", "E": experts, "H": hidden, "K": top_k, "T": tokens, "dtype": "bf16",
           "tile_auto": _tile_label(auto), "read_x_us": tokens * hidden * 2 / copy_gbs / 1e3}
    for label, tile in candidates:
        t0 = time.perf_counter()
        router.compiled_router(x.dtype, hidden, experts, top_k, True, tile)
        compile_s = time.perf_counter() - t0
        ws = torch.empty(max(1, router.workspace_size(tokens, experts, tile)), device="cuda")
        us = graph_us(lambda tile=tile, ws=ws: router.router_into(x, w, top_k, True, weights, ids, counts, tile=tile,
                                                                  workspace=ws))
        row[f"ours_us[{label}]"] = us
        if label == "auto":
            row["ours_us"] = us
            row["compile_s"] = compile_s
    row["torch_graph_us"] = graph_us(lambda: torch_router_graphable(x, w, top_k, True, counts64))
    row["torch_eager_us"] = eager_us(lambda: reference.router(x, w, top_k, True))
    row["ours_GBs"] = (x.numel() + w.numel()) * 2 / row["ours_us"] / 1e3
    others = " ".join(f"{k[8:-1]}={v:.1f}" for k, v in row.items() if k.startswith("ours_us[") and k != "ours_us[auto]")
    print(f"router  E={experts:3d} H={hidden} K={top_k} T={tokens:5d}: ours {row['ours_us']:8.1f} us "
          f"({row['ours_GBs']:6.0f} GB/s, read-x floor {row['read_x_us']:6.1f})  torch graph "
          f"{row['torch_graph_us']:8.1f}  eager {row['torch_eager_us']:8.1f}  "
          + others, flush=True)
    return row


def bench_metadata(rows, experts, top_k, tokens_list):
    for tokens in tokens_list:
        rows.append(_metadata_row(experts, top_k, tokens))


def _metadata_row(experts, top_k, tokens):
    active = max(top_k, experts // 2)
    ids = torch.rand(tokens, active, device="cuda").topk(top_k, dim=-1).indices.to(torch.int32)
    rows_m = tokens * top_k
    outs = (torch.empty(experts + 1, dtype=torch.int32, device="cuda"),
            torch.empty(rows_m, dtype=torch.int32, device="cuda"),
            torch.empty(rows_m, dtype=torch.int32, device="cuda"))
    ws = torch.empty(max(1, routing.workspace_size(rows_m, experts)), dtype=torch.int32, device="cuda")
    t0 = time.perf_counter()
    routing.compiled_routing(experts, top_k, rows_m <= routing.SINGLE_CTA_MAX_ROWS)
    compile_s = time.perf_counter() - t0
    row = {"op": "routing_metadata", "E": experts, "K": top_k, "T": tokens, "compile_s": compile_s,
           "ours_us": graph_us(lambda: routing.routing_metadata_into(ids, experts, *outs, workspace=ws)),
           "torch_eager_us": eager_us(lambda: reference.routing_metadata(ids, experts))}
    print(f"metadata E={experts:3d} K={top_k} T={tokens:5d}: ours {row['ours_us']:7.1f} us  "
          f"torch eager {row['torch_eager_us']:7.1f}", flush=True)
    return row


def bench_combine(rows, copy_gbs, hidden, top_k, tokens_list):
    for tokens in tokens_list:
        rows.append(_combine_row(copy_gbs, hidden, top_k, tokens))


def _combine_row(copy_gbs, hidden, top_k, tokens):
    y = torch.randn(tokens * top_k, hidden, device="cuda").bfloat16()
    rev = torch.randperm(tokens * top_k, device="cuda").to(torch.int32)
    weights = torch.rand(tokens, top_k, device="cuda")
    out = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    combine.compiled_combine(y.dtype, hidden, top_k)
    compile_s = time.perf_counter() - t0
    moved = (y.numel() + out.numel()) * 2
    row = {"op": "combine", "H": hidden, "K": top_k, "T": tokens, "dtype": "bf16", "compile_s": compile_s,
           "ours_us": graph_us(lambda: combine.combine_into(y, rev, weights, out)),
           "torch_eager_us": eager_us(lambda: reference.combine(y, rev, weights)),
           "floor_us": moved / copy_gbs / 1e3}
    row["ours_GBs"] = moved / row["ours_us"] / 1e3
    print(f"combine H={hidden} K={top_k} T={tokens:5d}: ours {row['ours_us']:7.1f} us "
          f"({row['ours_GBs']:6.0f} GB/s, floor {row['floor_us']:6.1f})  torch eager {row['torch_eager_us']:7.1f}",
          flush=True)
    return row


def host_overhead_us(iters: int = 300) -> dict:
    """Host cost of one eager call of each op (what decode pays without CUDA graphs)."""
    x = torch.randn(64, 4096, device="cuda").bfloat16()
    w = torch.randn(8, 4096, device="cuda").bfloat16()
    weights, ids, counts = router.router(x, w, 2, True)
    offsets, gather, reverse = routing.routing_metadata(ids, 8)
    y = torch.randn(128, 4096, device="cuda").bfloat16()
    out = torch.empty(64, 4096, device="cuda").bfloat16()
    res = {}
    for name, fn in (("router_into", lambda: router.router_into(x, w, 2, True, weights, ids, counts)),
                     ("routing_metadata_into", lambda: routing.routing_metadata_into(ids, 8, offsets, gather, reverse)),
                     ("combine_into", lambda: combine.combine_into(y, reverse, weights, out))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        res[name] = (time.perf_counter() - t0) / iters * 1e6
        torch.cuda.synchronize()
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/router_kernels_<date>_<card>.json)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env = environment()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{env['device']}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows: list[dict] = []
    RT = router.RouterTile
    tokens_e8 = [1, 16, 64, 256, 1024, 4096, 16384]
    bench_router(rows, copy_gbs, 8, 4096, 2, tokens_e8, tiles=[RT(1, 1, 8, 1, 1, 4), RT(1, 1, 16, 1, 1, 4)])
    if not args.quick:
        # alternatives: fused one-CTA-per-16-tokens tiles, and the split grid without H slices
        bench_router(rows, copy_gbs, 128, 2048, 8, [1, 64, 256, 1024, 4096, 16384],
                     tiles=[RT(1, 2, 4, 1, 8, 2), RT(4, 2, 1, 1, 8, 2), RT(1, 1, 8, 1, 4, 2, 4, 1)])
        bench_router(rows, copy_gbs, 64, 2048, 8, [1, 256, 4096], tiles=[RT(1, 1, 8, 1, 8, 2)])
        bench_router(rows, copy_gbs, 256, 7168, 8, [1, 256, 4096],
                     tiles=[RT(1, 4, 2, 1, 8, 2), RT(1, 1, 8, 1, 4, 2, 8, 1)])
    for experts, top_k in ((8, 2), (128, 8)):
        bench_metadata(rows, experts, top_k, [1, 64, 256, 4096, 16384])
    for hidden, top_k in ((4096, 2), (2048, 8)):
        bench_combine(rows, copy_gbs, hidden, top_k, [1, 64, 256, 4096, 16384])
    host = host_overhead_us()
    print("host us per eager call:", {k: round(v, 1) for k, v in host.items()}, flush=True)
    result = {"benchmark": "router_kernels", "env": env, "copy_bandwidth_GBs": copy_gbs,
              "timing": f"CUDA graph of {REPS} calls, median of replays, us per call",
              "host_us_per_eager_call": host, "rows": rows}
    card = "".join(c for c in env["device"].lower().split("nvidia")[-1] if c.isalnum())[:4] or "cpu"  # h100, h200
    out = Path(args.out or f"benchmarks/results/router_kernels_{env['date'][:10]}_{card}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
