"""W4A16 attention projections: the one-expert W4A16 GEMM (kernels/w4a16_linear.py) against torch's bf16
F.linear (cuBLAS) at the Mixtral-8x7B qkv (N = 6144, K = 4096) and o (N = K = 4096) shapes, g = 128 symmetric.

Shape legend: T tokens, N out features, K in features.
Every case is one CUDA graph of `copies` calls, each on its own copy of the weights (together well past the
L2 cache, as a model's layers are), replayed; the time per call is the replay over `copies`. Every W4A16 tile
is first checked against the dequantised reference (NaN-poisoned output, relative L2 < 1e-2).
`python -m light_moe.bench.w4a16_linear --output FILE`; results in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from light_moe.bench.env import environment, write_result
from light_moe.bench.timing import graph_replay, round_robin, time_us
from light_moe.bench.w4a16_experts import _int4
from light_moe.kernels.tile_config import TileConfig
from light_moe.kernels.w4a16_layout import W4A16Weights, dequantize_reference

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096)}  # Mixtral-8x7B: 32 query + 2 x 8 KV heads of 128
GROUP = 128
# tiles timed beside choose_linear_tile's at each T: (tile_w, tile_t, k_split)
CANDIDATES = {1: ((128, 8, 4),), 16: ((64, 8, 4),), 64: ((64, 32, 4),)}


def _copies(prepared: W4A16Weights, count: int) -> list[W4A16Weights]:
    return [W4A16Weights(prepared.qweight.clone(), prepared.meta.clone(), prepared.group_size, False,
                         prepared.has_zeros) for _ in range(count)]


def _check(x, prepared, reference_w, config) -> float:
    from light_moe.kernels.w4a16_linear import w4a16_linear

    out = torch.full((x.shape[0], prepared.n_out), float("nan"), device=x.device, dtype=torch.bfloat16)
    w4a16_linear(x, prepared, out=out, config=config)
    ref = x.float() @ reference_w.t()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    if out.isnan().any() or not err < 1e-2:
        raise AssertionError(f"W4A16 linear {config}: rel L2 {err:.2e}, NaN rows {out.isnan().any(1).sum()}")
    return err


def run_shape(name: str, n_out: int, k_dim: int, tokens: list[int], copies: int, rounds: int, iters: int,
              gen: torch.Generator) -> list[dict]:
    from light_moe.kernels.w4a16_linear import choose_linear_tile, prepare_linear, w4a16_linear

    qweight, scales, zeros = _int4(1, n_out, k_dim, GROUP, gen)
    reference_w = dequantize_reference(qweight, scales, zeros, GROUP)[0]  # fp32 [N, K]
    int4 = _copies(prepare_linear(qweight, scales, zeros, GROUP), copies)
    dense = [reference_w.bfloat16().clone() for _ in range(copies)]  # the same weights in bf16
    rows = []
    for t in tokens:
        x = torch.randn(t, k_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        out = torch.empty(t, n_out, device="cuda", dtype=torch.bfloat16)
        chosen = choose_linear_tile(t, n_out, k_dim, GROUP)
        configs = {"w4a16": chosen}
        for tile_w, tile_t, k_split in CANDIDATES.get(t, ()):
            config = TileConfig(tile_w, tile_t, k_split=k_split)
            if config != chosen:
                configs[f"w4a16 {tile_w}x{tile_t}x{k_split}"] = config
        errors = {label: _check(x, int4[0], reference_w, config) for label, config in configs.items()}

        def w4a16_calls(config, x=x, out=out):
            return lambda: [w4a16_linear(x, w, out=out, config=config) for w in int4]

        variants = {"bf16 F.linear": graph_replay(lambda x=x: [F.linear(x, w) for w in dense])}
        variants.update({label: graph_replay(w4a16_calls(config)) for label, config in configs.items()})
        stats = round_robin(variants, rounds, lambda replay: time_us(replay, iters) / copies)
        bf16 = stats["bf16 F.linear"]["median"]
        for label, s in stats.items():
            config = configs.get(label)
            row = {"shape": name, "N": n_out, "K": k_dim, "T": t, "case": label, "us": round(s["median"], 2),
                   "min_us": round(s["min"], 2), "max_us": round(s["max"], 2),
                   "speedup_vs_bf16": round(bf16 / s["median"], 3)}
            if config is not None:
                row.update(tile=f"{config.tile_w}x{config.tile_t}x{config.k_split}", rel_l2=errors[label])
            rows.append(row)
            print(f"{name:>4} T={t:<5} {label:<22} {s['median']:8.2f} us  {bf16 / s['median']:5.2f}x bf16", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 256, 1024])
    parser.add_argument("--copies", type=int, default=16, help="weight copies per graph (past the L2 cache)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n_out, k_dim) in SHAPES.items():
        rows += run_shape(name, n_out, k_dim, args.tokens, args.copies, args.rounds, args.iters, gen)
    result = {"benchmark": "w4a16_linear", "env": environment(), "device": torch.cuda.get_device_name(),
              "group_size": GROUP, "copies": args.copies, "rounds": args.rounds, "rows": rows}
    write_result(result, args.output, echo=False)
    return result


if __name__ == "__main__":
    main()
