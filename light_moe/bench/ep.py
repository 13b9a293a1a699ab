"""`light-moe bench ep`: expert parallelism against one GPU holding every expert.

Reports, as JSON (with bench.env.environment()):
  - decode and prefill tokens/s per GPU for EP=1 and EP=N at the same per-GPU batch (EP=N runs
    N x batch sequences; the engine spreads them one rank at a time, so each rank attends to batch);
  - the same with two-batch overlap on (parallel/overlap.py) and the saving against off;
  - with --time-exchange: the wall time of dispatch and combine per MoE layer call on rank 0
    (device synchronised around each exchange, so measured in a separate run);
  - fixed_exchange_us_per_layer: one layer's fixed-capacity dispatch + combine alone (no expert math) at
    1, batch and 4 x batch tokens per rank, replayed from a CUDA graph on GPU (fixed_exchange_us); with
    --exchange p2p both the NCCL and the NVLink peer-to-peer exchange (parallel/p2p_exchange.py), same engine;
  - load balance under skewed routing: the gate rows of --hot-experts experts are scaled by --skew
    on every rank (the dummy model's routing is otherwise near uniform), then the measured max/mean
    expert rows per rank (per layer, worst layer reported) before and after engine.rebalance() with
    --redundant copies per rank, and the planner's predictions.
--fixed-capacity C runs the EP=N engines with fixed_capacity_tokens=C (the host-sync-free exchange for
decode-sized steps, parallel/dispatch.py), which also lets EP=N decode replay CUDA graphs; compare a
run with 0 and one with 256. --exchange p2p builds those engines with ep_exchange="p2p". EP=1 replays
CUDA graphs unless --enforce-eager (which also keeps EP=N eager). The exchange times come from a
separate eager EP=N engine (graph replays cannot be timed per exchange).
With --shape mixtral the model is the Mixtral-8x7B shape cut to --layers layers, random weights
(load_format='dummy': identical on every rank). On CPU it runs with gloo and a tiny model (CI smoke).
"""
from __future__ import annotations

import shutil

import torch

from light_moe.bench.e2e import bench_model, run_e2e
from light_moe.bench.env import environment, write_result
from light_moe.cli_args import add_bench_engine_args, async_kwargs

# What `bench ep` and `bench ep-scale` set per engine (EP=1 against EP=N, overlap off and on, the balance run):
# no flags of their own for these. Both leave W4A16 to the EP=1 engine (ep-scale's --baseline-quant).
EP_BENCH_DECIDES = ("expert_parallel_size", "enable_overlap", "fixed_capacity_tokens", "ep_exchange",
                    "num_redundant_experts", "quantization")


def add_workload_args(p, layers: int, exclude: tuple[str, ...] = ()) -> None:
    """Model and workload options shared by `bench ep` and `bench ep-scale`, and the engine flags (but those the
    benchmark decides: EP_BENCH_DECIDES, exclude)."""
    p.add_argument("--shape", choices=["mixtral"], default=None,
                   help="ignore --model and use the Mixtral-8x7B shape with random weights")
    p.add_argument("--layers", type=int, default=layers, help="layers of the --shape model (32: the whole model)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per GPU")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3,
                   help="measured batches per engine after the warm-up; tokens/s are their median")
    add_bench_engine_args(p, exclude=EP_BENCH_DECIDES + exclude)


def add_balance_args(p) -> None:
    """The skewed-routing load-balance measurement (balance_run) and the result file."""
    p.add_argument("--hot-experts", type=int, default=2, help="experts made hot for the balance measurement")
    p.add_argument("--skew", type=float, default=4.0, help="scale of the hot experts' gate rows")
    p.add_argument("--redundant", type=int, default=1, help="expert copies per rank after rebalancing")
    p.add_argument("--output", default=None, help="write the JSON result here (default: print it)")


def add_ep_args(p) -> None:
    add_workload_args(p, layers=4, exclude=("quant_group_size", "quant_symmetric", "quant_attention"))
    p.add_argument("--ep", type=int, default=2, help="expert_parallel_size N compared with 1")
    p.add_argument("--fixed-capacity", type=int, default=256,
                   help="fixed_capacity_tokens of the EP=N engines (0: variable splits only); compare 256 with 0")
    p.add_argument("--exchange", default="nccl", choices=["nccl", "p2p"],
                   help="ep_exchange of the EP=N engines' fixed-capacity exchange; p2p: time NCCL's too, per layer")
    p.add_argument("--time-exchange", action="store_true", help="also time dispatch/combine per MoE layer")
    add_balance_args(p)


def skew_routers(rank_executor, hot_experts: int, scale: float) -> None:
    """On every rank (RankCall): scale the gate rows of experts [0, hot_experts) so they win more often."""
    with torch.no_grad():
        for block in rank_executor.model.moe_blocks():
            block.gate.weight[:hot_experts] *= scale


def per_gpu(row: dict, gpus: int) -> dict:
    return dict(row, gpus=gpus, prefill_tok_s_per_gpu=row["prefill_tok_s"] / gpus,
                decode_tok_s_per_gpu=row["decode_tok_s"] / gpus)


def balance_run(engine, args) -> dict:
    """Skewed routing: measured max/mean rows per rank before and after a rebalance with copies."""
    engine.workers.call(skew_routers, args.hot_experts, args.skew)
    length = max(args.output_len, 24)  # enough steps for a few load syncs (every LOAD_SYNC_STEPS steps)
    batch = engine.config.parallel.expert_parallel_size * args.batch_size
    run_e2e(engine, [batch], args.input_len, length, seed=1)
    before = engine.expert_rank_balance()
    report = engine.rebalance()
    run_e2e(engine, [batch], args.input_len, length, seed=1)  # the same traffic again
    after = engine.expert_rank_balance()
    return dict(hot_experts=args.hot_experts, skew=args.skew, redundant_per_rank=args.redundant,
                measured_before=max(before), measured_after=max(after), measured_before_per_layer=before,
                measured_after_per_layer=after, predicted_before=max(report.get("before", [1.0])),
                predicted_after=max(report.get("after", [1.0])),
                expert_load=engine.expert_load_stats())


def fixed_exchange_us(rank_executor, tokens: int, iters: int, exchange: str = "nccl",
                      layers: int = 1) -> float | None:
    """On every rank (RankCall): median time per MoE layer of the fixed-capacity exchange, dispatch + combine
    with no expert math, for `tokens` random tokens per rank; rank 0's figure is returned. On CUDA `layers`
    exchanges are captured back to back in one graph and replayed (as a decode graph runs them: packing, one
    all_to_all or peer exchange each way, unpacking, weighted sum), and the replay time is divided by
    `layers`. Each replay starts when its own process launches it, so with layers = 1 the figure also holds
    the launch skew between the ranks' processes (paid once per decode step, not once per layer); more
    layers per replay show the steady-state cost of a layer. On CPU it runs eagerly. Every rank replays the
    same number of times, so the collectives stay matched. exchange: "nccl", or "p2p" on an engine built
    with ep_exchange="p2p" (None where the capacity exceeds its buffers, sized for fixed_capacity_tokens)."""
    import statistics
    import time

    from light_moe.bench.timing import time_us
    from light_moe.executor.step_plan import exchange_capacity

    d = rank_executor.dispatchers[0]
    cfg, device = rank_executor.model.config, rank_executor.group.device
    gen = torch.Generator(device=device).manual_seed(1000 + rank_executor.group.rank)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen, device=device).to(rank_executor.runner.dtype)
    ids = torch.rand(tokens, cfg.num_experts, generator=gen, device=device).topk(cfg.top_k, dim=-1).indices
    ids = ids.to(torch.int32)
    weights = torch.full((tokens, cfg.top_k), 1.0 / cfg.top_k, device=device)
    capacity = exchange_capacity([tokens] * d.world_size, cfg.top_k, 1 << 30)
    width = d.packed_layout(cfg.hidden_size, x.element_size())[1]
    if exchange == "p2p" and (d.peer is None or capacity > d.peer.max_rows(width)):  # the same on every rank
        return None
    saved = d.capacity, d.rows_received.clone(), dict(d.exchanges), d.peer
    d.capacity = capacity
    if exchange != "p2p":
        d.peer = None  # NCCL, also on a p2p engine (restored below)

    def layer():
        routed = d.dispatch(x, weights, ids)
        return d.combine(routed.x.contiguous(), routed)  # the received rows stand in for expert outputs

    def stack():
        for _ in range(layers):
            layer()

    try:
        layer()  # warm-up (every rank): compiles, sizes the allocator
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the collectives; the replays run them
                stack()
            us = time_us(graph.replay, iters)  # every rank replays the same number of times
            graph.reset()
            return us / layers
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            stack()
            times.append((time.perf_counter() - start) * 1e6 / layers)
        return statistics.median(times)
    finally:
        d.capacity, d.exchanges, d.peer = saved[0], saved[2], saved[3]
        d.rows_received.copy_(saved[1])


def _exchange_times(engine, args) -> dict:
    """engine: an eager EP=N engine (every exchange runs in Python, so each can be timed)."""
    from light_moe.parallel.dispatch import ExchangeTiming

    timings = []
    for block in engine.model.moe_blocks():
        block.dispatcher.timing = ExchangeTiming()
        timings.append(block.dispatcher.timing)
    rows = run_e2e(engine, [engine.config.parallel.expert_parallel_size * args.batch_size], args.input_len,
                   args.output_len, seed=3)
    for block in engine.model.moe_blocks():
        block.dispatcher.timing = None
    calls = sum(t.calls for t in timings)
    return dict(calls=calls, dispatch_us_per_layer=1e6 * sum(t.dispatch_s for t in timings) / max(calls, 1),
                combine_us_per_layer=1e6 * sum(t.combine_s for t in timings) / max(calls, 1),
                steps=rows[0]["steps"], note="rank 0, device synchronised around each exchange; includes waiting "
                "for the slowest rank")


STACKED_LAYERS = 8  # exchanges per graph replay for the steady-state per-layer figure


def fixed_exchange_table(engine, batch_size: int, exchange: str = "nccl", layers: int = 1) -> dict[int, float | None]:
    """fixed_exchange_us at 1, batch and 4 x batch tokens per rank on an EP engine: {tokens: us per layer}."""
    return {tokens: engine.workers.call(fixed_exchange_us, tokens, 50, exchange, layers)
            for tokens in sorted({1, batch_size, 4 * batch_size})}


def fixed_exchange_tables(engine, batch_size: int, exchange: str = "nccl") -> dict[str, dict[int, float | None]]:
    """One layer per replay ("1") and STACKED_LAYERS back to back (their per-layer figure) for one exchange."""
    return {str(n): fixed_exchange_table(engine, batch_size, exchange, n) for n in (1, STACKED_LAYERS)}


def overlap_saving(off: dict, on: dict) -> dict:
    """Fraction of the overlap-off time that overlap saves (negative: overlap is slower)."""
    return dict(decode=1 - on["decode_s"] / off["decode_s"] if off["decode_s"] else 0.0,
                prefill=1 - on["prefill_s"] / off["prefill_s"] if off["prefill_s"] else 0.0)


def overlap_off_and_on(engine_args, executor, args, measure=None) -> tuple[list, object]:
    """engine_args (EngineArgs of EP=n) on `executor` with two-batch overlap off, then on, each running
    n x --batch-size sequences: their rows, and measure(engine) taken on the overlap-off engine before it shuts
    down."""
    from light_moe import LightMoEEngine

    n = engine_args.expert_parallel_size
    rows, measured = [], None
    for overlap in (False, True):
        engine = LightMoEEngine.from_engine_args(engine_args.replace(enable_overlap=overlap),
                                                 expert_parallel_executor=executor)
        row = run_e2e(engine, [n * args.batch_size], args.input_len, args.output_len, repeats=args.repeats)[0]
        rows.append(dict(per_gpu(row, n), ep=n, overlap=overlap, cuda_graphs=engine.runner.decode_graphs is not None))
        if not overlap and measure is not None:
            measured = measure(engine)
        print(f"EP={n} overlap={overlap}: {rows[-1]['decode_tok_s_per_gpu']:.1f} decode tok/s/GPU", flush=True)
        engine.shutdown()
        del engine
    return rows, measured


def main(args) -> dict:
    from light_moe import LightMoEEngine
    from light_moe.engine.args import EngineArgs
    from light_moe.engine.devices import resolve_device
    from light_moe.executor.rank_executor import free_device_memory
    from light_moe.executor.workers import ExpertParallelExecutor

    if args.ep < 2:
        raise ValueError(f"--ep must be at least 2 (it is compared with 1), got {args.ep}")
    if args.exchange == "p2p" and args.fixed_capacity <= 0:
        raise ValueError("--exchange p2p replaces the fixed-capacity exchange: it needs --fixed-capacity > 0")
    device = resolve_device(args.device)
    if args.exchange == "p2p" and device.type != "cuda":
        raise ValueError("--exchange p2p writes into peer GPUs' memory: it needs --device cuda")
    model_path, load_format, tmp = bench_model(args)
    rows, executor = [], None
    try:
        max_len = args.max_model_len or args.input_len + max(args.output_len, 24) + 16  # the balance run's length
        common = EngineArgs.from_cli_args(args, model=model_path, device=str(device), load_format=load_format,
                                          max_model_len=max_len, max_num_seqs=args.ep * args.batch_size)
        ep = common.replace(expert_parallel_size=args.ep, fixed_capacity_tokens=args.fixed_capacity,
                            ep_exchange=args.exchange)  # checked before any engine loads
        one = LightMoEEngine.from_engine_args(common)
        graphs = one.runner.decode_graphs is not None
        dtype = str(one.config.dtype)
        rows.append(dict(per_gpu(run_e2e(one, [args.batch_size], args.input_len, args.output_len,
                                         repeats=args.repeats)[0], 1),
                         ep=1, overlap=False, cuda_graphs=graphs))
        one.shutdown()  # its CUDA graphs and KV cache (sized to the card) must go before EP=N sizes its own
        del one
        free_device_memory()
        executor = ExpertParallelExecutor(args.ep, device, timeout_s=300.0)
        exchange = None
        ep_rows, fixed_exchange = overlap_off_and_on(
            ep, executor, args,
            # nccl, and p2p on a p2p engine: {exchange: {layers per replay: {tokens per rank: us per layer}}}
            measure=lambda engine: {ex: fixed_exchange_tables(engine, args.batch_size, ex)
                                    for ex in dict.fromkeys(("nccl", args.exchange))})
        rows += ep_rows
        if args.time_exchange:
            engine = LightMoEEngine.from_engine_args(ep.replace(enforce_eager=True), expert_parallel_executor=executor)
            exchange = _exchange_times(engine, args)
            engine.shutdown()
            del engine
        engine = LightMoEEngine.from_engine_args(
            common.replace(expert_parallel_size=args.ep, num_redundant_experts=args.redundant),
            expert_parallel_executor=executor)
        balance = balance_run(engine, args)
        engine.shutdown()
        del engine
    finally:
        if executor is not None:
            executor.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    one_row, off, on = rows
    result = dict(
        benchmark="ep", env=environment(), dtype=dtype, ep=args.ep, per_gpu_batch=args.batch_size,
        fixed_capacity_tokens=args.fixed_capacity, ep_exchange=args.exchange,
        ep1_cuda_graphs=graphs, **async_kwargs(args),
        model=str(model_path) if tmp is None else f"mixtral-8x7b-shape-{args.layers}-layers (random weights)",
        rows=rows,
        decode_per_gpu_vs_ep1=off["decode_tok_s_per_gpu"] / one_row["decode_tok_s_per_gpu"],
        overlap_saving=dict(overlap_saving(off, on),
                            note="fraction of the overlap-off time saved; negative: overlap is slower"),
        all_to_all=exchange, balance=balance,
        fixed_exchange_us_per_layer=dict(
            by_tokens_per_rank=fixed_exchange["nccl"]["1"],
            p2p_by_tokens_per_rank=fixed_exchange["p2p"]["1"] if "p2p" in fixed_exchange else None,
            in_stacked_graph={ex: times[str(STACKED_LAYERS)] for ex, times in fixed_exchange.items()},
            stacked_layers=STACKED_LAYERS, note=(
                "one MoE layer's fixed-capacity dispatch + combine, no expert math, median; CUDA: graph replays; "
                "by_tokens_per_rank: NCCL all_to_all, one layer per replay (includes the ranks' launch skew); "
                "p2p_by_tokens_per_rank (--exchange p2p): NVLink peer writes, null where the capacity exceeds the "
                "p2p buffers; in_stacked_graph: per layer with stacked_layers exchanges back to back per replay "
                "(the steady state of a decode step's layers)")))
    print(f"{'ep':>3} {'overlap':>8} {'graphs':>7} {'prefill tok/s/GPU':>18} {'decode tok/s/GPU':>17}")
    for r in rows:
        print(f"{r['ep']:>3} {str(r['overlap']):>8} {str(r['cuda_graphs']):>7} {r['prefill_tok_s_per_gpu']:>18.1f} "
              f"{r['decode_tok_s_per_gpu']:>17.1f}")
    if exchange:
        print(f"all-to-all per MoE layer: dispatch {exchange['dispatch_us_per_layer']:.0f} us, "
              f"combine {exchange['combine_us_per_layer']:.0f} us")
    for ex, by_layers in fixed_exchange.items():
        for n, times in by_layers.items():
            print(f"fixed-capacity exchange per MoE layer (dispatch + combine), {ex}, {n} per replay: "
                  + ", ".join(f"{t} tokens/rank " + ("n/a" if us is None else f"{us:.0f} us")
                              for t, us in times.items()))
    print(f"max/mean rows per rank (skewed routing): {balance['measured_before']:.2f} -> "
          f"{balance['measured_after']:.2f} after rebalancing (predicted {balance['predicted_before']:.2f} -> "
          f"{balance['predicted_after']:.2f})")
    write_result(result, args.output)
    return result
