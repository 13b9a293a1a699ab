"""Argument helpers shared by the CLI (cli.py), `light-moe serve` (server/serve.py) and the benchmarks
(bench/*): each flag group's add_*_args(parser) and the *_kwargs(args) that turn it into LightMoEEngine
keyword arguments. Below all three of them (docs/architecture.md, import rules), so none imports another."""
from __future__ import annotations

import argparse


def add_async_args(p: argparse.ArgumentParser) -> None:
    """The host/GPU overlap flags; async_kwargs turns them into engine arguments."""
    p.add_argument("--async-output-processing", action="store_true",
                   help="detokenize and build each step's outputs while the GPUs run the next step (outputs come "
                        "one step later; the same tokens and text)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule and launch each step before reading the previous step's tokens back (outputs "
                        "come one step later; the same tokens and text); on by default, --no-async-scheduling "
                        "reads each step back before the next")


def async_kwargs(args) -> dict:
    return dict(async_output_processing=args.async_output_processing, async_scheduling=args.async_scheduling)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """The expert-parallel flags (generate, bench e2e, serve); parallel_kwargs turns them into engine arguments."""
    p.add_argument("--expert-parallel-size", type=int, default=1,
                   help="N processes with the experts partitioned: spawned by this process, or, under torchrun, "
                        "the job's N ranks (WORLD_SIZE must be N; only rank 0 prints; docs/expert_parallel.md)")
    p.add_argument("--fixed-capacity-tokens", type=int, default=256,
                   help="expert parallelism: decode steps exchange this many padded rows per rank pair with no "
                        "host sync, which also lets them run as CUDA graphs (0: always variable splits)")
    p.add_argument("--ep-exchange", default="nccl", choices=["nccl", "p2p"],
                   help="how that fixed-capacity exchange moves: NCCL all-to-all, or p2p: writes into the peer GPUs' "
                        "memory over NVLink (symmetric memory; one host; experimental)")


def parallel_kwargs(args) -> dict:
    """LightMoEEngine keyword arguments of the expert-parallel flags."""
    return dict(expert_parallel_size=args.expert_parallel_size, fixed_capacity_tokens=args.fixed_capacity_tokens,
                ep_exchange=args.ep_exchange)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant-group-size", "--group-size", dest="quant_group_size", type=int, default=128,
                   choices=[32, 64, 128], help="W4A16 group size along the input dimension")
    p.add_argument("--quant-asymmetric", "--asymmetric", dest="quant_asymmetric", action="store_true",
                   help="W4A16 with per-group zero points (default: symmetric, zero point 8)")
    p.add_argument("--quant-attention", dest="quant_attention", action="store_true",
                   help="with --quantization w4a16: quantize the attention projections (qkv, o) as well "
                        "(docs/quantization.md)")


def quant_kwargs(args) -> dict:
    """LightMoEEngine keyword arguments of the quantization flags."""
    return dict(quantization=args.quantization, quant_group_size=args.quant_group_size,
                quant_symmetric=not args.quant_asymmetric, quant_attention=args.quant_attention)
