"""bf16 grouped GEMM tiles side by side: the data behind kernels/tile_config.TILE_TABLE and its flags.

    python -m light_moe.bench.expert_tiles --tokens 1024 4096 16384 --configs table 256x64 256x64@2 256x128p@2
    python -m light_moe.bench.expert_tiles --tokens 1024 --configs 256x64 256x64@2 --rounds 5 --output r.json

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows.

A config spec is tile_w x tile_t, then the fence (p = producer, c = consumer; default: the TILE_TABLE row with
that tile, else consumer), lN for the producer fence's cp.async lag, @2 for two-CTA clusters (TileConfig.cluster_t:
the weight tile multicast to both CTAs). "table" is the tile choose_tile_config picks for the projection.

Every config is first checked against the fp32 reference (relative L2 of act and y; a config that fails is
reported and not timed), then expert_up and expert_down are timed alone, each as CUDA-graph replays, all configs in
alternating order for --rounds rounds (medians; spread = min, max). Routing: each token picks K distinct random
experts (uniform, as bench w4a16_experts). Weights: random bf16, the Mixtral-8x7B layer by default.
TFLOP/s = 2 M N K / time per projection (routed rows only: the padding of each expert's last tile is not counted).
"""
from __future__ import annotations

import argparse
import functools
import json
import re

import torch

from light_moe.bench.env import environment
from light_moe.bench.timing import graph_replay, round_robin, time_us
from light_moe.bench.w4a16_experts import routed_batch
from light_moe.ops import reference


def parse_config(spec: str):
    """'256x64' / '256x128p' / '256x128pl2' / '256x64@2' -> TileConfig ('table' is handled by the caller)."""
    from light_moe.kernels.tile_config import TILE_TABLE, TileConfig

    m = re.fullmatch(r"(\d+)x(\d+)([pc])?(?:l(\d+))?(?:@(\d+))?", spec)
    if m is None:
        raise ValueError(f"tile spec {spec!r}: tile_w x tile_t [p|c] [lN] [@cluster]")
    tile_w, tile_t, fence, lag, cluster = m.groups()
    tile_w, tile_t = int(tile_w), int(tile_t)
    fence = {"p": "producer", "c": "consumer", None: None}[fence]
    if fence is None:
        fence = next((row.fence_mode for row in TILE_TABLE if (row.tile_w, row.tile_t) == (tile_w, tile_t)),
                     "consumer")
    return TileConfig(tile_w, tile_t, fence, cp_async_lag=int(lag or 1), cluster_t=int(cluster or 1))


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def _projection_configs(spec: str, num_rows: int, num_experts: int, hidden: int, inter: int):
    """(up config, down config) of a spec: 'table' picks per projection as the engine does."""
    from light_moe.kernels.tile_config import choose_tile_config

    if spec == "table":
        return choose_tile_config(num_rows, num_experts, 2 * inter), choose_tile_config(num_rows, num_experts, hidden)
    config = parse_config(spec)
    return config, config


def run(tokens, specs, num_experts=8, hidden=4096, inter=14336, top_k=2, rounds=3, seed=0) -> list[dict]:
    from light_moe.kernels import grouped_gemm as gg
    from light_moe.kernels.grouped_gemm import GroupedGemmSm90

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5).bfloat16()
    w13p, w2p = gg.prepare_expert_weights(w13, w2)
    rows = []
    for num_tokens in tokens:
        x, offsets, gather_index, act, y = routed_batch(num_tokens, num_experts, hidden, inter, top_k, gen)
        num_rows = gather_index.shape[0]
        ref_act = reference.expert_up(x.float(), gather_index, offsets, w13.float())
        ref_y = reference.expert_down(ref_act.bfloat16().float(), offsets, w2.float())
        act_in = ref_act.bfloat16()  # every down variant reads the same act
        variants, checks, unsupported = {}, {}, []
        for spec in specs:
            up_cfg, down_cfg = _projection_configs(spec, num_rows, num_experts, hidden, inter)
            if not all(GroupedGemmSm90.supports(gated=g, n_out=n, k_dim=k, num_experts=num_experts, config=c)[0]
                       for g, n, k, c in ((True, 2 * inter, hidden, up_cfg), (False, hidden, inter, down_cfg))):
                unsupported.append(spec)
                continue
            up = functools.partial(gg.expert_up, x, gather_index, offsets, w13p, out=act, config=up_cfg)
            down = functools.partial(gg.expert_down, act_in, offsets, w2p, out=y, config=down_cfg)
            act.fill_(float("nan"))
            y.fill_(float("nan"))
            up()
            down()
            err = dict(up=_rel_l2(act, ref_act), down=_rel_l2(y, ref_y))
            checks[spec] = dict(rel_l2=err, tiles=[str(up_cfg), str(down_cfg)])
            if not all(e < 1e-2 for e in err.values()):  # NaN fails too
                print(f"T={num_tokens} {spec}: WRONG, rel L2 {err}", flush=True)
                continue
            variants[f"{spec}|up"] = graph_replay(up)
            variants[f"{spec}|down"] = graph_replay(down)
        times = round_robin(variants, rounds, lambda fn: time_us(fn, 20))
        flops_up, flops_down = 2 * num_rows * 2 * inter * hidden, 2 * num_rows * hidden * inter
        row = dict(tokens=num_tokens, routed_rows=num_rows,
                   active_experts=int((offsets[1:] > offsets[:-1]).sum()), configs={}, unsupported=unsupported)
        for spec in specs:
            if f"{spec}|up" not in times:
                if spec in checks:
                    row["configs"][spec] = dict(checks[spec], wrong=True)
                continue
            up_t, down_t = times[f"{spec}|up"], times[f"{spec}|down"]
            row["configs"][spec] = dict(
                checks[spec], up_us=round(up_t["median"], 1), down_us=round(down_t["median"], 1),
                total_us=round(up_t["median"] + down_t["median"], 1),
                spread_us=dict(up=(round(up_t["min"], 1), round(up_t["max"], 1)),
                               down=(round(down_t["min"], 1), round(down_t["max"], 1))),
                up_TFLOPs=round(flops_up / up_t["median"] / 1e6, 1),
                down_TFLOPs=round(flops_down / down_t["median"] / 1e6, 1))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    parts = [f"T={row['tokens']}"]
    for spec, c in row["configs"].items():
        if c.get("wrong"):
            parts.append(f"{spec}: WRONG")
        else:
            parts.append(f"{spec}: {c['up_us']:.1f} + {c['down_us']:.1f} = {c['total_us']:.1f} us "
                         f"({c['up_TFLOPs']:.0f} / {c['down_TFLOPs']:.0f} TF)")
    if row["unsupported"]:
        parts.append("unsupported: " + " ".join(row["unsupported"]))
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--configs", nargs="+", default=["table", "256x64", "256x128p", "256x64@2", "256x128p@2"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    for spec in args.configs:  # bad specs fail before any GPU work
        if spec != "table":
            parse_config(spec)
    rows = run(args.tokens, args.configs, args.experts, args.hidden, args.intermediate, args.top_k, args.rounds)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(benchmark="expert_tiles", env=environment(),
                           shape=dict(E=args.experts, H=args.hidden, I=args.intermediate, K=args.top_k),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
