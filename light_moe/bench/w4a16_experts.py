"""W4A16 vs bf16 expert GEMMs (up + down, CUDA-graph replays) on the Mixtral-8x7B layer shape.

    python -m light_moe.bench.w4a16_experts --output result.json
    python -m light_moe.bench.w4a16_experts --tokens 1 4 16 --configs 64x8x2 64x8x4 128x16x1

--configs also times each explicit W4A16 tile config (tile_w x tile_t x k_split [x k-tiles per stage, 1 or 2],
optional fence suffix p = producer / c = consumer / n = none (racy: only to measure the fence), else the
fence of the W4A16_TILE_TABLE row with that tile, else consumer; then sN for N pipeline stages and lN for
the producer fence's cp.async lag, b for the k-block pipelined wgmma, w for int4 weights by cp.async.bulk,
t for token rows by TMA (up: x gathered first), d for the deferred group scale, e.g. 64x8x4s40, 64x8x4x2, 64x8x4d,
128x256x1pl3, 256x128x1cbw, 256x128x1cbwt)
for up and down, beside the table's choice (w4a16_us), in the same run: row["configs"][name] = us and
int4 TB/s; "unsupported" where the kernel refuses the config for the shape. --rounds N times every variant
(bf16, the table's W4A16, each config) N times in alternating order and reports medians (spread_us: min, max).
--decode-kernel picks the table's decode kernel as the engine's w4a16_decode_kernel does (default: wgmma);
--prefetch-down F ... times the table's tiles again with the up projection's L2 prefetch of the down weights
(w4a16_expert_up's next_weights, fraction F of each stream head; the direct up kernel only), checked first to
give the very outputs of the table's tiles without it: row["prefetch"]["F"] = us. --fused times the fused up + down
kernel (kernels/w4a16_fused.py, one launch) where it has a tile, checked first to give the bits of the direct
kernel's two launches on that tile, which are timed beside it: row["fused"] = {us, two_launches_us, tile}.

Routing: each token picks K distinct random experts. Weights: random int4 (group 128, symmetric)
and random bf16 of the same shape. Time = median of CUDA-event-timed graph replays of
expert_up + expert_down (router, metadata and combine excluded: they are shared by both paths).
Weight GB/s = bytes of the experts that received a token (int4 + bf16 scales for W4A16).
"""
from __future__ import annotations

import argparse
import functools
import json
import re

import torch

from light_moe.bench.env import environment
from light_moe.bench.timing import graph_replay, round_robin, time_us
from light_moe.ops import reference


def _int4(num_experts, n_out, k_dim, group, gen):
    q = torch.randint(0, 16, (num_experts, n_out, k_dim // 8, 8), device="cuda", dtype=torch.int32, generator=gen)
    shifts = torch.arange(0, 32, 4, device="cuda", dtype=torch.int32)
    qweight = (q << shifts).sum(-1, dtype=torch.int32)  # nibbles are disjoint: the sum is their OR
    del q
    scales = ((torch.rand(num_experts, n_out, k_dim // group, device="cuda", generator=gen) + 0.5)
              / (4 * k_dim**0.5)).bfloat16()
    return qweight, scales, None


def mixtral_experts(num_experts, hidden, inter, group, gen):
    """Random bf16 experts (prepared for the bf16 kernel) and random int4 experts (symmetric, `group`):
    (w13p, w2p, q13, q2)."""
    from light_moe.kernels import grouped_gemm as gg
    from light_moe.kernels import w4a16_gemm as w4

    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5).bfloat16()
    w13p, w2p = gg.prepare_expert_weights(w13, w2)
    q13 = w4.prepare_w4a16_weights(*_int4(num_experts, 2 * inter, hidden, group, gen), group, gated=True)
    q2 = w4.prepare_w4a16_weights(*_int4(num_experts, hidden, inter, group, gen), group, gated=False)
    return w13p, w2p, q13, q2


def routed_batch(num_tokens, num_experts, hidden, inter, top_k, gen):
    """T random tokens, each routed to top_k distinct random experts: (x, offsets, gather_index, act, y), act and
    y the up and down projections' outputs."""
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(num_tokens, num_experts, device="cuda", generator=gen).topk(top_k, dim=-1).indices.to(torch.int32)
    offsets, gather_index, _ = reference.routing_metadata(ids, num_experts)
    act = torch.empty(num_tokens * top_k, inter, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(num_tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
    return x, offsets, gather_index, act, y


def pair_replay(up, down, batch, w_up, w_down):
    """Graph replay of up then down on a routed_batch."""
    x, offsets, gather_index, act, y = batch

    def run():
        up(x, gather_index, offsets, w_up, out=act)
        down(act, offsets, w_down, out=y)
    return graph_replay(run)


def _add_variants(variants: dict, name: str, up, down, batch, w_up, w_down, split: bool) -> None:
    """variants[name] = up + down; with split also name_up and name_down alone (which projection a difference
    comes from)."""
    x, offsets, gather_index, act, y = batch
    variants[name] = pair_replay(up, down, batch, w_up, w_down)
    if split:
        variants[f"{name}_up"] = graph_replay(functools.partial(up, x, gather_index, offsets, w_up, out=act))
        variants[f"{name}_down"] = graph_replay(functools.partial(down, act, offsets, w_down, out=y))


def _check_same_outputs(pairs, batch, w_up, w_down, what: str) -> None:
    """Each (up, down) pair, run on the batch's NaN-poisoned act and y (as pair_replay calls them), must give the
    bits of the first: a hint (the prefetch) or a fused launch changes no value."""
    x, offsets, gather_index, act, y = batch
    results = []
    for up, down in pairs:
        act.fill_(float("nan"))
        y.fill_(float("nan"))
        up(x, gather_index, offsets, w_up, out=act)
        down(act, offsets, w_down, out=y)
        results.append((act.clone(), y.clone()))
    act0, y0 = results[0]
    if act0.isnan().any() or y0.isnan().any() or not all(torch.equal(a, act0) and torch.equal(b, y0)
                                                         for a, b in results[1:]):
        raise AssertionError(f"{what} changed the experts' outputs")


def _add_fused(variants: dict, batch, w_up, w_down):
    """variants["fused"] (the fused kernel, one launch) and variants["fused_two_launches"] (the direct kernel's up and
    down on the same tile), after checking that both give the same bits; None (nothing added) where the fused
    kernel has no tile for this step."""
    from light_moe.kernels import w4a16_fused
    from light_moe.kernels import w4a16_gemm as w4

    gather_index, y = batch[2], batch[4]
    tile = w4a16_fused.fused_config(gather_index.shape[0], w_up, w_down)
    if tile is None:
        return None
    up = functools.partial(w4.w4a16_expert_up, config=tile)
    down = functools.partial(w4.w4a16_expert_down, config=tile)

    def fused(x, gather_index, offsets, w_up, out):  # the pair's "up" writes act and y, its "down" nothing
        w4a16_fused.w4a16_fused_experts(x, gather_index, offsets, w_up, w_down, act=out, y=y, config=tile)

    def nothing(act, offsets, w_down, out):
        return None

    _check_same_outputs([(up, down), (fused, nothing)], batch, w_up, w_down,
                        "the fused kernel (against the direct kernel's two launches on its tile)")
    variants["fused"] = pair_replay(fused, nothing, batch, w_up, w_down)
    variants["fused_two_launches"] = pair_replay(up, down, batch, w_up, w_down)
    return tile


def _parse_config(spec: str, table):
    """'64x8x4' / '64x8x2p' / '64x8x4s40' / '64x8x4x2' / '128x256x1pl3' / '128x256x1pb' -> TileConfig: tile_w x
    tile_t [x k_split [x k-tiles per stage]], then the fence (p / c / n; else the table row of that tile, else
    consumer), sN: N pipeline stages, lN: cp.async lag N of the producer fence, b: k-block pipelined wgmma,
    w: int4 weights by cp.async.bulk, t: token rows by TMA (the up projection gathers x into [M, H] first, in the
    timed graph), d: deferred group scale, f: the down projection's L2 prefetch before its wait; gN: the direct
    decode kernel with N warps per CTA (64x8gN, sN its ring depth), e: its down projection's int4 before the wait,
    k: its stream-K schedule."""
    from light_moe.kernels.tile_config import TileConfig

    m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?(?:x(\d+))?([pcn])?(?:s(\d+))?(?:l(\d+))?(b)?(w)?(t)?(d)?(f)?"
                     r"(?:g(\d+))?(e)?(k)?", spec)
    if m is None:
        raise ValueError(f"tile spec {spec!r}: tile_w x tile_t [x k_split [x k-tiles per stage]] [p|c|n] [sN] [lN] [b] "
                         "[w] [t] [d] [f] [gN] [e] [k]")
    (tile_w, tile_t, k_split, per_stage, fence, stages, lag, kblock, bulk, tma, deferred, prefetch, direct,
     early, stream_k) = m.groups()
    tile_w, tile_t = int(tile_w), int(tile_t)
    fence = {"p": "producer", "c": "consumer", "n": "none", None: None}[fence]  # n: racy, to measure the fence
    if fence is None:
        fence = next((row[3] for row in table if row[1:3] == (tile_w, tile_t)), "consumer")
    return TileConfig(tile_w, tile_t, fence, int(k_split or 1), int(stages or 0), int(per_stage or 1), int(lag or 1),
                      kblock_pipeline=kblock is not None, bulk_weights=bulk is not None, tma_tokens=tma is not None,
                      deferred_scale=deferred is not None, l2_prefetch=prefetch is not None,
                      direct_warps=int(direct or 0), early_weights=early is not None,
                      stream_k=stream_k is not None)


def main() -> None:
    from light_moe.kernels import grouped_gemm as gg
    from light_moe.kernels import w4a16_gemm as w4

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--configs", nargs="*", default=[],
                        help="explicit W4A16 tiles to time as well: tile_w x tile_t x k_split [p|c], e.g. 64x8x4")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every variant this many times in alternating order and take medians (the H200's "
                             "clock moves with power at prefill: sequential timings of one kernel differ by ~5%%)")
    parser.add_argument("--split", action="store_true",
                        help="also time the up and the down projection alone (bf16, the table's W4A16 tile and each "
                             "--configs tile)")
    parser.add_argument("--decode-kernel", choices=("wgmma", "direct"), default="wgmma",
                        help="the table's W4A16 decode kernel (EngineConfig.w4a16_decode_kernel)")
    parser.add_argument("--prefetch-down", type=float, nargs="*", default=[],
                        help="also time the table's tiles with the up kernel's L2 prefetch of this fraction of the "
                             "down weights' stream heads (the direct up kernel only)")
    parser.add_argument("--fused", action="store_true",
                        help="also time the fused up + down decode kernel (one launch) against the direct kernel's "
                             "two launches on its tile")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    configs = {spec: _parse_config(spec, w4.W4A16_TILE_TABLE) for spec in args.configs}
    E, H, inter, K, G = args.experts, args.hidden, args.intermediate, args.top_k, args.group_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13p, w2p, q13, q2 = mixtral_experts(E, H, inter, G, gen)
    bf16_expert_bytes = 3 * H * inter * 2
    int4_expert_bytes = 3 * H * inter // 2 + 3 * H * inter // G * 2
    rows = []
    for T in args.tokens:
        batch = routed_batch(T, E, H, inter, K, gen)
        offsets = batch[1]
        active = int((offsets[1:] > offsets[:-1]).sum())
        variants = {}
        _add_variants(variants, "bf16", gg.expert_up, gg.expert_down, batch, w13p, w2p, args.split)
        up = functools.partial(w4.w4a16_expert_up, decode_kernel=args.decode_kernel)
        down = functools.partial(w4.w4a16_expert_down, decode_kernel=args.decode_kernel)
        _add_variants(variants, "w4a16", up, down, batch, q13, q2, args.split)
        for fraction in args.prefetch_down:
            up_pf = functools.partial(up, next_weights=q2, prefetch_fraction=fraction)
            _check_same_outputs([(up, down), (up_pf, down)], batch, q13, q2, "the down weights' prefetch")
            _add_variants(variants, f"prefetch_{fraction}", up_pf, down, batch, q13, q2, args.split)
        fused_tile = _add_fused(variants, batch, q13, q2) if args.fused else None
        unsupported = []
        for spec, config in configs.items():
            ok = all(w4.W4A16GroupedGemmSm90.supports(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=E,
                                                      group_size=G, config=config)[0]
                     for gated, n_out, k_dim in ((True, 2 * inter, H), (False, H, inter)))
            if not ok:
                unsupported.append(spec)
                continue
            _add_variants(variants, spec, functools.partial(w4.w4a16_expert_up, config=config),
                          functools.partial(w4.w4a16_expert_down, config=config), batch, q13, q2, args.split)
        times = round_robin(variants, args.rounds, lambda fn: time_us(fn, 50 if args.rounds == 1 else 20))
        bf16_us, w4_us = times["bf16"]["median"], times["w4a16"]["median"]
        row = dict(tokens=T, active_experts=active, bf16_us=round(bf16_us, 1), w4a16_us=round(w4_us, 1),
                   bf16_weight_TBps=round(active * bf16_expert_bytes / bf16_us / 1e6, 2),
                   w4a16_weight_TBps=round(active * int4_expert_bytes / w4_us / 1e6, 2),
                   w4a16_speedup=round(bf16_us / w4_us, 2))
        if args.split:
            row["split_us"] = {name: round(times[name]["median"], 1)
                               for name in ("bf16_up", "bf16_down", "w4a16_up", "w4a16_down")}
        if args.rounds > 1:
            row["spread_us"] = {k: (round(v["min"], 1), round(v["max"], 1)) for k, v in times.items()}
        if fused_tile is not None:
            row["fused"] = dict(us=round(times["fused"]["median"], 1),
                                two_launches_us=round(times["fused_two_launches"]["median"], 1), tile=str(fused_tile))
        if args.prefetch_down:
            row["prefetch"] = {str(f): round(times[f"prefetch_{f}"]["median"], 1) for f in args.prefetch_down}
        if configs:
            sms = torch.cuda.get_device_properties(offsets.device).multi_processor_count
            row["w4a16_tiles"] = [str(w4.choose_w4a16_tile(T * K, E, n, k, sms, G, gated))
                                  for gated, n, k in ((True, 2 * inter, H), (False, H, inter))]
            row["configs"] = {spec: "unsupported" for spec in unsupported}
        for spec in configs:
            if spec in variants:
                us = times[spec]["median"]
                row["configs"][spec] = dict(us=round(us, 1), int4_TBps=round(active * int4_expert_bytes / us / 1e6, 2))
                if args.split:
                    row["configs"][spec].update(up_us=round(times[f"{spec}_up"]["median"], 1),
                                                down_us=round(times[f"{spec}_down"]["median"], 1))
        rows.append(row)
        print(row, flush=True)
    result = dict(benchmark="w4a16_experts", env=environment(),
                  shape=dict(E=E, H=H, I=inter, K=K, group_size=G, symmetric=True), rows=rows)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
