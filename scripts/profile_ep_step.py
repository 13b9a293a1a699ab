"""Where an expert-parallel decode step spends its time, seen from rank 0, next to one GPU's step.

bench ep measures EP=N decode per GPU below EP=1 although each rank reads 1/N of the expert weights; this
script says why: per EP size, the wall time of a decode step, the GPU time of rank 0's kernels in it (torch
profiler), and the Python functions that take the host time (cProfile, by own time and by cumulative time).

    python scripts/profile_ep_step.py --ep 1 2 4 --shape mixtral --layers 4 --batch-size 16 --device cuda

On CPU it runs on gloo with the bundled model (a smoke run of the script itself).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import time

import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.bench.e2e import bench_model
from light_moe.engine.engine import _resolve_device


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
                  max_num_batched_tokens=args.max_num_batched_tokens)
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
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step()
        sync()
        prof.disable()
        gpu_ms = None
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
                for _ in range(8):
                    step()
                sync()
            events = tp.key_averages()
            gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / 8
            kernels = tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
        else:
            kernels = ""
    finally:
        engine.shutdown()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return dict(ep=ep, batch=batch, wall_ms_per_step=wall_ms, gpu_ms_per_step_rank0=gpu_ms,
                cprofile=text.getvalue(), kernels=kernels)


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
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--top", type=int, default=30, help="functions listed per cProfile table")
    args = p.parse_args()
    device = _resolve_device(args.device)
    model_path, load_format, tmp = bench_model(args)
    try:
        results = [profile_one(model_path, load_format, ep, args, device) for ep in args.ep]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        print(f"\n######## EP={r['ep']} ({r['batch']} sequences)\n{r['kernels']}\n{r['cprofile']}")
    print(f"{'ep':>3} {'seqs':>5} {'step ms':>8} {'rank-0 GPU ms':>14}")
    for r in results:
        gpu = "n/a" if r["gpu_ms_per_step_rank0"] is None else f"{r['gpu_ms_per_step_rank0']:.2f}"
        print(f"{r['ep']:>3} {r['batch']:>5} {r['wall_ms_per_step']:>8.2f} {gpu:>14}")


if __name__ == "__main__":
    main()
