"""Decode-time dense projections: the skinny GEMM (light_moe/kernels/skinny_gemm.py) against torch's F.linear
(cuBLAS) at the same shapes, M = 1, 4, 16 token rows by default.

    python scripts/bench_skinny_gemm.py [--tokens 1 4 16] [--shapes qkv o_proj lm_head] [--sweep] [--out FILE.json]

Shape legend: M token rows, N out features, K in features. Shapes (N, K): Mixtral-8x7B's fused q/k/v (6144, 4096),
o_proj (4096, 4096) and lm_head (32000, 4096); gpt-oss-20b's q/k/v (5120, 2880) and o_proj (2880, 4096) on request.

Method: for each shape, as many weight copies as exceed 256 MB in all (at least 2), so every call streams its
weight from HBM, never from the 50 MB L2. One CUDA graph holds one call per copy, in order (the decode step runs
its projections inside graphs); the time per call is the median CUDA-event time of a replay / copies, the variants
timed in alternating rounds. Consecutive skinny calls overlap under programmatic dependent launch (the next call
streams its weight while the previous one reduces), as they do after the norm and attention kernels in a model
step; cuBLAS kernels do not. TB/s = N * K * 2 bytes / time per call. rel_l2: the kernel's output against F.linear
in fp32 on the first copy. --sweep adds forced tiles (BN = 64, 128) x K-splits (1, 2, 4, 8): tuning data for
skinny_gemm.choose_plan. The result JSON carries the card, torch / CuTe DSL versions and the commit
(LIGHT_MOE_GIT_COMMIT where the tree has no .git).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from light_moe.bench.env import environment, write_result
from light_moe.bench.timing import graph_replay, round_robin, time_us, timing_entry
from light_moe.kernels import skinny_gemm as sk
from light_moe.kernels.launch import sm_count

SHAPES = {
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "lm_head": (32000, 4096),
    "gpt_oss_qkv": (5120, 2880),
    "gpt_oss_o_proj": (2880, 4096),
}
L2_BEATING_BYTES = 256 << 20


def _variants(x, weights, out, sweep: bool) -> dict:
    """name -> graph replay of one call per weight copy; the skinny variants' plans as a second dict."""
    n_out, k_dim = weights[0].shape
    variants = {"cublas": graph_replay(lambda: [F.linear(x, w) for w in weights])}
    configs = {"skinny": (None, None)}
    if sweep:
        for block_n in sk.BLOCK_N_CHOICES:
            if n_out % block_n == 0:
                for splits in (1, 2, 4, 8):
                    configs[f"skinny_bn{block_n}_s{splits}"] = (block_n, splits)
    plans = {}
    for name, (block_n, splits) in configs.items():
        plan = sk.choose_plan(n_out, k_dim, sm_count(x.device), sk.token_tile(x.shape[0]), block_n, splits)
        if name != "skinny" and plan in plans.values():
            continue  # an override the plan clamps to one already timed
        plans[name] = plan
        variants[name] = graph_replay(lambda block_n=block_n, splits=splits: [
            sk.skinny_linear(x, w, out=out, block_n=block_n, splits=splits) for w in weights])
    return variants, plans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--shapes", nargs="+", default=["qkv", "o_proj", "lm_head"], choices=sorted(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also time forced tiles x K-splits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="timed replays per round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes:
        n_out, k_dim = SHAPES[shape]
        weight_bytes = n_out * k_dim * 2
        copies = max(2, -(-L2_BEATING_BYTES // weight_bytes))
        weights = [(torch.randn(n_out, k_dim, device="cuda") * k_dim ** -0.5).to(torch.bfloat16)
                   for _ in range(copies)]
        for m in args.tokens:
            x = torch.randn(m, k_dim, device="cuda").to(torch.bfloat16)
            out = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float())
            got = sk.skinny_linear(x, weights[0])
            err = ((got.float() - ref).norm() / ref.norm()).item()
            variants, plans = _variants(x, weights, out, args.sweep)
            stats = round_robin(variants, args.rounds,
                                lambda replay, copies=copies: time_us(replay, args.iters) / copies)
            row = dict(shape=shape, n=n_out, k=k_dim, m=m, weight_bytes=weight_bytes, copies=copies, rel_l2=err,
                       plan=plans["skinny"]._asdict())
            for name, s in stats.items():
                row[name] = timing_entry(s, weight_bytes)
                if name in plans and name != "skinny":
                    row[name]["plan"] = plans[name]._asdict()
            rows.append(row)
            best = min((n for n in stats if n.startswith("skinny")), key=lambda n: stats[n]["median"])
            print(f"{shape:15s} M={m:2d} plan={tuple(plans['skinny'])}  skinny {row['skinny']['us']:7.2f} us "
                  f"({row['skinny']['tbps']:.2f} TB/s)  cuBLAS {row['cublas']['us']:7.2f} us "
                  f"({row['cublas']['tbps']:.2f} TB/s)  best {best} {row[best]['us']:.2f} us  rel L2 {err:.1e}",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    write_result(dict(environment(), benchmark="skinny_gemm", sms=sm_count(torch.device("cuda")), rows=rows),
                 args.out, echo=False)


if __name__ == "__main__":
    main()
