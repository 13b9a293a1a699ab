"""Launch the expert GEMM kernels once per case, for Nsight Compute (no timing here).

    ncu --clock-control none --kernel-name regex:GroupedGemm --section SpeedOfLight ... \
        python scripts/profile_expert_gemms.py --cases bf16:4096 w4a16:1
        python scripts/profile_expert_gemms.py --cases w4a16:1 w4a16:1:64x8g8e w4a16:1:64x8g8ek

Each case (kind:T[:tile spec], the spec as in light_moe.bench.w4a16_experts --configs, W4A16 only; without one the
tile table's) builds Mixtral-8x7B-shaped experts (E=8, H=4096, I=14336, top-2; random bf16 or
random int4 g128), routes T random tokens, compiles (host only, nothing launched), then launches the
up- and the down-projection once each. ncu's kernel filter keeps only our GEMM kernels, so the report
holds exactly 2 kernels per case, in the order of --cases.
"""
from __future__ import annotations

import argparse

import torch

from light_moe.ops import reference

E, H, INTER, K, GROUP = 8, 4096, 14336, 2, 128


def _int4(num_experts: int, n_out: int, k_dim: int, gen: torch.Generator):
    q = torch.randint(0, 16, (num_experts, n_out, k_dim // 8, 8), device="cuda", dtype=torch.int32, generator=gen)
    shifts = torch.arange(0, 32, 4, device="cuda", dtype=torch.int32)
    qweight = (q << shifts).sum(-1, dtype=torch.int32)  # disjoint nibbles: the sum is their OR
    scales = ((torch.rand(num_experts, n_out, k_dim // GROUP, device="cuda", generator=gen) + 0.5)
              / (4 * k_dim**0.5)).bfloat16()
    return qweight, scales, None


def main() -> None:
    from light_moe.bench.w4a16_experts import _parse_config
    from light_moe.kernels import grouped_gemm as gg
    from light_moe.kernels import w4a16_gemm as w4

    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["bf16:1", "w4a16:1", "bf16:4096", "w4a16:1024"])
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for case in args.cases:
        kind, tokens, *spec = case.split(":")
        tokens = int(tokens)
        config = None
        if spec:
            if kind != "w4a16":
                raise SystemExit(f"{case}: a tile spec is for w4a16 cases only")
            config = _parse_config(spec[0], w4.W4A16_TILE_TABLE)
        if kind not in weights:
            if kind == "bf16":
                w13 = (torch.randn(E, 2 * INTER, H, device="cuda", generator=gen) * H**-0.5).bfloat16()
                w2 = (torch.randn(E, H, INTER, device="cuda", generator=gen) * INTER**-0.5).bfloat16()
                weights[kind] = (gg.expert_up, gg.expert_down, *gg.prepare_expert_weights(w13, w2))
            elif kind == "w4a16":
                q13 = w4.prepare_w4a16_weights(*_int4(E, 2 * INTER, H, gen), GROUP, gated=True)
                q2 = w4.prepare_w4a16_weights(*_int4(E, H, INTER, gen), GROUP, gated=False)
                weights[kind] = (w4.w4a16_expert_up, w4.w4a16_expert_down, q13, q2)
            else:
                raise SystemExit(f"unknown kind {kind!r} (bf16 or w4a16)")
        up, down, w_up, w_down = weights[kind]
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids = torch.rand(tokens, E, device="cuda", generator=gen).topk(K, dim=-1).indices.to(torch.int32)
        offsets, gather_index, _ = reference.routing_metadata(ids, E)
        tile = {} if config is None else {"config": config}
        act = up(x, gather_index, offsets, w_up, **tile)
        down(act, offsets, w_down, **tile)
        torch.cuda.synchronize()
        print(f"{case}: launched up {tuple(act.shape)} and down", flush=True)


if __name__ == "__main__":
    main()
