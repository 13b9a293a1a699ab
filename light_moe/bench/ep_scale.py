"""`light-moe bench ep-scale`: expert parallelism at several sizes against one GPU, in one run.

    light-moe bench ep-scale --shape mixtral --layers 32 --ep 8 4 --baseline-quant w4a16 \
        --batch-size 16 --output benchmarks/results/ep_scale_mixtral8x7b_<card>.json

The configuration of the EP=8 issue: the whole Mixtral-8x7B shape (random weights made on the machine,
load_format='dummy'), bf16, EP=8 and EP=4 compared with one GPU holding every expert; bf16 Mixtral-8x7B
(~93 GB) does not fit one 80 GB card, hence `--baseline-quant w4a16` for the one-GPU row. Per configuration:

  - prefill and decode tokens/s, total and per GPU, at --batch-size sequences per GPU (EP=N runs N x that);
  - per-GPU memory: allocated after the run, of which KV cache, the rest (weights, graphs, workspace), and
    the peak, for every rank (`--kv-cache-gib` fixes the KV cache; otherwise it fills the card);
  - EP=N with two-batch overlap off and on (`overlap_saving`);
  - one MoE layer's fixed-capacity exchange alone (dispatch + combine, graph replays on GPU) at 1, batch and
    4 x batch tokens per rank (bench/ep.py fixed_exchange_us);
  - load balance under skewed routing before and after a rebalance with --redundant copies per rank
    (bench/ep.py); --no-balance skips it.

`light-moe bench ep` is the two-configuration version with more exchange detail (per-call timings, the p2p
exchange). On CPU this runs with gloo and a small model (the CI smoke test).
"""
from __future__ import annotations

import shutil

import torch
import torch.distributed as dist

from light_moe.bench.e2e import bench_model, run_e2e
from light_moe.bench.env import environment, write_result
from light_moe.bench.ep import (
    STACKED_LAYERS,
    add_balance_args,
    add_workload_args,
    balance_run,
    fixed_exchange_tables,
    overlap_off_and_on,
    overlap_saving,
    per_gpu,
)
from light_moe.cli_args import async_kwargs


def add_ep_scale_args(p) -> None:
    # --kv-cache-gib instead of the byte count; --quant-group-size / --quant-asymmetric: the baseline's W4A16
    add_workload_args(p, layers=32, exclude=("kv_cache_memory_bytes", "quant_attention"))
    p.add_argument("--ep", type=int, nargs="+", default=[8, 4], help="expert_parallel_size values to run")
    p.add_argument("--baseline-quant", choices=["none", "w4a16"], default="w4a16",
                   help="quantization of the one-GPU baseline (w4a16: bf16 Mixtral-8x7B does not fit one card)")
    p.add_argument("--fixed-capacity", type=int, default=256, help="fixed_capacity_tokens of the EP engines")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache per GPU in GiB (default: what gpu_memory_utilization leaves)")
    p.add_argument("--no-balance", action="store_true", help="skip the skewed-routing rebalance measurement")
    add_balance_args(p)


def memory_report(runner, device: torch.device) -> dict:
    """One GPU's memory in GiB: allocated now, of which KV cache and the rest, and the peak (None on CPU)."""
    kv = sum(t.numel() * t.element_size() for layer in runner.kv_caches for t in layer) / 2**30  # (k, v) per layer
    if device.type != "cuda":
        return dict(allocated_gib=None, kv_cache_gib=kv, other_gib=None, peak_gib=None)
    allocated = torch.cuda.memory_allocated(device) / 2**30
    return dict(allocated_gib=allocated, kv_cache_gib=kv, other_gib=allocated - kv,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)


def rank_memory(rank_executor) -> list[dict]:
    """On every rank (RankCall): memory_report of this rank; rank 0 gets every rank's, in rank order."""
    mine = memory_report(rank_executor.runner, rank_executor.group.device)
    every = [None] * rank_executor.group.world_size
    dist.all_gather_object(every, mine, group=rank_executor.group.cpu_group)
    return every


def _free(device: torch.device) -> None:
    """The previous engine's memory back to the device; peak memory counts from here."""
    from light_moe.executor.rank_executor import free_device_memory

    free_device_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _run_ep(common, n: int, device: torch.device, args) -> dict:
    """EP=n: overlap off and on, the fixed exchange per layer, memory per rank and the balance run."""
    from light_moe import LightMoEEngine
    from light_moe.executor.workers import ExpertParallelExecutor

    executor = ExpertParallelExecutor(n, device, timeout_s=300.0)
    engine_args = common.replace(expert_parallel_size=n, max_num_seqs=n * args.batch_size)
    try:
        rows, (memory, fixed) = overlap_off_and_on(
            engine_args.replace(fixed_capacity_tokens=args.fixed_capacity), executor, args,
            measure=lambda engine: (engine.workers.call(rank_memory), fixed_exchange_tables(engine, args.batch_size)))
        out = dict(ep=n, rows=rows, memory_per_rank=memory, fixed_exchange_us_per_layer=fixed["1"],
                   fixed_exchange_us_per_layer_stacked={"layers": STACKED_LAYERS, "us": fixed[str(STACKED_LAYERS)]},
                   overlap_saving=overlap_saving(*rows))
        if not args.no_balance:
            engine = LightMoEEngine.from_engine_args(engine_args.replace(num_redundant_experts=args.redundant),
                                                     expert_parallel_executor=executor)
            out["balance"] = balance_run(engine, args)
            engine.shutdown()
            del engine
    finally:
        executor.shutdown()
        _free(device)
    return out


def main(args) -> dict:
    from light_moe import LightMoEEngine
    from light_moe.engine.args import EngineArgs
    from light_moe.engine.devices import resolve_device

    if not args.ep or any(n < 2 for n in args.ep):
        raise ValueError(f"--ep takes expert_parallel_size values of at least 2, got {args.ep}")
    device = resolve_device(args.device)
    model_path, load_format, tmp = bench_model(args)
    quant = None if args.baseline_quant == "none" else args.baseline_quant
    try:
        common = EngineArgs.from_cli_args(
            args, model=model_path, device=str(device), load_format=load_format,
            max_model_len=args.max_model_len or args.input_len + max(args.output_len, 24) + 16,
            kv_cache_memory_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30))
        _free(device)
        one = LightMoEEngine.from_engine_args(common.replace(quantization=quant, max_num_seqs=args.batch_size))
        baseline = dict(per_gpu(run_e2e(one, [args.batch_size], args.input_len, args.output_len,
                                        repeats=args.repeats)[0], 1), ep=1,
                        quantization=quant, cuda_graphs=one.runner.decode_graphs is not None,
                        memory=memory_report(one.runner, device))
        dtype = str(one.config.dtype)
        print(f"one GPU ({quant or 'no quantization'}): {baseline['decode_tok_s_per_gpu']:.1f} decode tok/s",
              flush=True)
        one.shutdown()
        del one
        _free(device)
        by_ep = [_run_ep(common, n, device, args) for n in args.ep]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = dict(benchmark="ep_scale", env=environment(), dtype=dtype, per_gpu_batch=args.batch_size,
                  fixed_capacity_tokens=args.fixed_capacity, input_len=args.input_len, output_len=args.output_len,
                  model=str(model_path) if tmp is None else f"mixtral-8x7b-shape-{args.layers}-layers (random weights)",
                  baseline=baseline, by_ep=by_ep, **async_kwargs(args))
    print(f"{'config':>18} {'prefill tok/s':>14} {'/GPU':>10} {'decode tok/s':>13} {'/GPU':>9} {'GiB/GPU (KV)':>16}")
    _line(f"1 GPU {quant or 'bf16'}", baseline, baseline["memory"])
    for ep in by_ep:
        worst = max(ep["memory_per_rank"], key=lambda m: m["allocated_gib"] or 0.0)
        for r in ep["rows"]:
            _line(f"EP={ep['ep']} overlap {'on' if r['overlap'] else 'off'}", r, worst)
        print(f"  EP={ep['ep']} fixed exchange per layer: " + ", ".join(
            f"{t} tokens/rank {us:.0f} us" for t, us in ep["fixed_exchange_us_per_layer"].items() if us is not None)
            + f" ({STACKED_LAYERS} layers per replay: " + ", ".join(
                f"{us:.0f}" for us in ep["fixed_exchange_us_per_layer_stacked"]["us"].values() if us is not None)
            + " us)")
        if "balance" in ep:
            b = ep["balance"]
            print(f"  EP={ep['ep']} max/mean rows per rank: {b['measured_before']:.2f} -> {b['measured_after']:.2f}")
    write_result(result, args.output)
    return result


def _line(name: str, row: dict, memory: dict) -> None:
    gib = (f"- ({memory['kv_cache_gib']:.2f})" if memory["allocated_gib"] is None
           else f"{memory['allocated_gib']:.1f} ({memory['kv_cache_gib']:.1f})")
    print(f"{name:>18} {row['prefill_tok_s']:>14.0f} {row['prefill_tok_s_per_gpu']:>10.0f} "
          f"{row['decode_tok_s']:>13.1f} {row['decode_tok_s_per_gpu']:>9.1f} {gib:>16}")
