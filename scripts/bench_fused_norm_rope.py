"""Time the fused decoder-layer kernels against the PyTorch reference path they replace, Mixtral-8x7B shapes.

    python scripts/bench_fused_norm_rope.py [--tokens 1 64 2048] [--out results.json]

Per N: "add + norm" (residual := x + residual, out = RMSNorm(residual); kernels/rms_norm.py vs layers/norm.py
in torch ops), "norm" (no residual) and "rope + kv write" (kernels/rope_kv.py vs layers/rotary.py + index_copy
into the paged cache; q/k/v as slices of one fused qkv buffer). Each is timed two ways, in microseconds per call:
  eager: CUDA events around CALLS back-to-back calls / CALLS (includes launch overhead, what an eager step pays);
  graph: one CUDA graph holding CALLS calls, replayed; events around the replay / CALLS (GPU time, decode path).
Medians over rounds that alternate the order of the variants (light_moe.bench.timing.round_robin).
"""
from __future__ import annotations

import argparse
import json

import torch

from light_moe.bench.timing import graph_replay, round_robin, time_us
from light_moe.kernels import rms_norm, rope_kv
from light_moe.layers.rotary import RotaryEmbedding
from tests.kernels.test_fused_norm_rope_gpu import rms_norm_reference, rope_write_kv_reference

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, THETA, EPS = 4096, 32, 8, 128, 16, 1e6, 1e-5
POSITIONS = 32768
CALLS = 20  # calls per timed sample: a single small call is shorter than the event resolution


def cases(tokens: int) -> dict[str, dict]:
    """{op: {variant: fn}} on fresh inputs for N = tokens."""
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, generator=gen, device=dev).to(dtype)
    residual = torch.randn(tokens, HIDDEN, generator=gen, device=dev).to(dtype)
    weight = torch.randn(HIDDEN, generator=gen, device=dev).to(dtype)
    out = torch.empty_like(x)

    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen, device=dev).to(dtype)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=1)
    rotary = RotaryEmbedding(HEAD_DIM, POSITIONS, THETA, device=dev)
    positions = torch.randint(0, POSITIONS, (tokens,), generator=gen, device=dev)
    num_blocks = -(-4 * tokens // BLOCK_SIZE) + 1
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device=dev)[:tokens]
    q_out = torch.empty(tokens, HEADS, HEAD_DIM, dtype=dtype, device=dev)
    rope_args = (q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    return {
        "add + norm": {
            "torch": lambda: rms_norm_reference(x, weight, EPS, residual),
            "kernel": lambda: rms_norm.rms_norm(x, weight, EPS, residual=residual, out=out),
        },
        "norm": {
            "torch": lambda: rms_norm_reference(x, weight, EPS)[0],
            "kernel": lambda: rms_norm.rms_norm(x, weight, EPS, out=out),
        },
        "rope + kv write": {
            "torch": lambda: rope_write_kv_reference(*rope_args),
            "kernel": lambda: rope_kv.rope_write_kv(*rope_args, q_out=q_out),
        },
    }


def repeated(fn):
    def run():
        for _ in range(CALLS):
            fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 2048])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    for tokens in args.tokens:
        for op, variants in cases(tokens).items():
            timed = {}
            for name, fn in variants.items():
                fn()  # compile outside the timing
                timed[f"{name} eager"] = repeated(fn)
                timed[f"{name} graph"] = graph_replay(repeated(fn))
            result = round_robin(timed, args.rounds, lambda f: time_us(f, iters=10) / CALLS)
            row = {"tokens": tokens, "op": op}
            row.update({name: stats["median"] for name, stats in result.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)

    device = torch.cuda.get_device_name()
    print(f"\n{device}, bf16, Mixtral shapes (H={HIDDEN}, h={HEADS}, g={KV_HEADS}, D={HEAD_DIM}), us per call")
    print("| N | op | torch eager | kernel eager | torch graph | kernel graph | speed-up (graph) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['op']} | {r['torch eager']:.2f} | {r['kernel eager']:.2f} | "
              f"{r['torch graph']:.2f} | {r['kernel graph']:.2f} | {r['torch graph'] / r['kernel graph']:.1f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "dtype": "bf16", "calls_per_sample": CALLS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
