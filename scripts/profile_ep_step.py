"""Where an expert-parallel decode step spends its time, on every rank, next to one GPU's step.

bench ep measures EP=N decode per GPU below EP=1 although each rank reads 1/N of the expert weights; this
script says why: per EP size, the wall time of a decode step and, on every rank, the GPU time of its
kernels (NCCL's apart: a rank whose NCCL kernels run long waits for a late peer), the wall time of its
model runner's execute (input preparation and launches) and of the plan broadcast, with a report per rank
(kernels; Python functions by own and by cumulative time).

    python scripts/profile_ep_step.py --ep 1 2 4 --shape mixtral --layers 4 --batch-size 16 --device cuda

On CPU it runs on gloo with the bundled model (a smoke run of the script itself). Profiling slows the host: compare the
per-rank figures with each other, and the plain step times (measured first, unprofiled) across EP sizes.
"""
from __future__ import annotations

import argparse
import ast
import shutil
import tempfile
import time

import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.bench import rank_profile
from light_moe.bench.e2e import bench_model
from light_moe.engine.devices import resolve_device


def decode_steps(engine, batch: int, input_len: int, vocab: int, steps: int):
    """Start `batch` requests, run until every one has its first token, then return a function that runs
    one decode step (None when nothing is left)."""
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    ids = {engine.add_request(torch.randint(0, vocab, (input_len,), generator=gen).tolist(), params)
           for _ in range(batch)}
    first = set()
    while len(first) < batch:
        first.update(o.request_id for o in engine.step() if o.request_id in ids)
    return engine.step


def profile_one(model_path, load_format, ep: int, args, device) -> dict:
    kwargs = dict(dtype=args.dtype, device=str(device), load_format=load_format, show_progress=False,
                  max_num_seqs=ep * args.batch_size, max_model_len=args.input_len + 3 * args.steps + 64,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  async_output_processing=args.async_output_processing, async_scheduling=args.async_scheduling)
    if ep > 1:
        kwargs.update(expert_parallel_size=ep, fixed_capacity_tokens=args.fixed_capacity,
                      ep_exchange=args.exchange)
    engine = LightMoEEngine(model_path, **kwargs)
    try:
        vocab, batch = engine.model_config.vocab_size, ep * args.batch_size
        gen = torch.Generator().manual_seed(0)  # warm-up, the same batch: graphs captured, kernels compiled
        engine.generate_outputs([torch.randint(0, vocab, (args.input_len,), generator=gen).tolist()
                                 for _ in range(batch)], SamplingParams(max_tokens=args.steps, ignore_eos=True))
        step = decode_steps(engine, batch, args.input_len, vocab, 2 * args.steps + 16)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
        # the same steps profiled on every rank (rank_profile.start/stop run on each through a RankCall)
        call = (lambda fn, *a: fn(engine, *a)) if engine.workers is None else engine.workers.call
        prefix = f"{args.report_dir}/ep{ep}"
        call(rank_profile.start)
        for _ in range(args.steps):
            step()
        rank0 = call(rank_profile.stop, prefix, args.steps, args.top)
    finally:
        engine.shutdown()
    ranks = [rank0] + [eval_summary(f"{prefix}.rank{r}.txt") for r in range(1, ep)]
    return dict(ep=ep, batch=batch, wall_ms_per_step=wall_ms, ranks=ranks, reports=[
        f"{prefix}.rank{r}.txt" for r in range(ep)])


def eval_summary(path: str) -> dict:
    """The summary dict on the first line of a rank's report."""
    with open(path) as f:
        return ast.literal_eval(f.readline())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shape", choices=["mixtral"], default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per GPU")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (and as many profiled)")
    p.add_argument("--fixed-capacity", type=int, default=256)
    p.add_argument("--exchange", choices=["nccl", "p2p"], default="nccl")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--async-output-processing", action="store_true",
                   help="engines with async output processing (a step's outputs made while the next one runs)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="engines with async scheduling (a step launched before the last one's tokens are read)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--top", type=int, default=25, help="rows of each report table")
    p.add_argument("--report-dir", default=None, help="where the per-rank reports go (default: a temporary folder)")
    p.add_argument("--print-ranks", type=int, nargs="*", default=[0, 1], help="ranks whose full report is printed")
    args = p.parse_args()
    device = resolve_device(args.device)
    if args.report_dir is None:
        args.report_dir = tempfile.mkdtemp(prefix="light-moe-ep-profile-")
    model_path, load_format, tmp = bench_model(args)
    try:
        results = [profile_one(model_path, load_format, ep, args, device) for ep in args.ep]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        for rank in args.print_ranks:
            if rank < r["ep"]:
                with open(r["reports"][rank]) as f:
                    print(f"\n######## EP={r['ep']} ({r['batch']} sequences), rank {rank}\n{f.read()}")
    print(f"reports in {args.report_dir}")
    print(f"{'ep':>3} {'seqs':>5} {'step ms':>8} {'rank':>5} {'GPU ms':>7} {'NCCL ms':>8} {'execute ms':>11} "
          f"{'plan bcast ms':>14}")
    for r in results:
        for x in r["ranks"]:
            print(f"{r['ep']:>3} {r['batch']:>5} {r['wall_ms_per_step']:>8.2f} {x['rank']:>5} "
                  f"{x['gpu_ms_per_step']:>7.2f} {x['nccl_ms_per_step']:>8.2f} {x['execute_ms']:>11.2f} "
                  f"{x['plan_broadcast_ms']:>14.2f}")


if __name__ == "__main__":
    main()
