"""Dense projections at decode: torch's F.linear (cuBLAS) against the bf16 grouped GEMM's down projection run
as a one-expert GEMM (light_moe.kernels.grouped_gemm.expert_down, E = 1). Both inside CUDA graphs, as the
decode step runs them; us per call, median of several replays of 50 calls. Shapes: Mixtral's fused qkv
(6144 x 4096), o_proj (4096 x 4096) and lm_head (32000 x 4096).

    python scripts/bench_dense_linear.py [--tokens 1 4 16 64] [--output FILE.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def graph_time_us(fn, calls: int = 50, replays: int = 7) -> float:
    """us per call of fn, from replays of one CUDA graph of `calls` calls (median over `replays`)."""
    from light_moe.bench.timing import graph_replay, time_us

    return time_us(graph_replay(lambda: [fn() for _ in range(calls)]), iters=replays, warmup=1) / calls


def main() -> None:
    from light_moe.kernels import grouped_gemm

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, n_out, k in (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("lm_head", 32000, 4096)):
        weight = torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) * 0.02
        stacked = weight.unsqueeze(0).contiguous()  # [1, N, K]
        for tokens in args.tokens:
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            offsets = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
            out = torch.empty(tokens, n_out, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, weight)
            grouped_gemm.expert_down(x, offsets, stacked, out=out)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_cublas = graph_time_us(lambda x=x, weight=weight: F.linear(x, weight))
            t_grouped = graph_time_us(lambda x=x, offsets=offsets, stacked=stacked, out=out:
                                      grouped_gemm.expert_down(x, offsets, stacked, out=out))
            gbytes = n_out * k * 2 / 1e9
            row = dict(shape=name, n=n_out, k=k, tokens=tokens, cublas_us=round(t_cublas, 2),
                       grouped_e1_us=round(t_grouped, 2), cublas_tbps=round(gbytes / t_cublas * 1e3, 3),
                       grouped_tbps=round(gbytes / t_grouped * 1e3, 3), rel_l2=err)
            rows.append(row)
            print(f"{name:8s} T={tokens:3d}  cuBLAS {t_cublas:8.2f} us ({row['cublas_tbps']:.2f} TB/s)  "
                  f"grouped E=1 {t_grouped:8.2f} us ({row['grouped_tbps']:.2f} TB/s)  rel L2 {err:.1e}", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
