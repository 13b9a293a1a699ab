"""Profile the same engine steps on every expert-parallel rank (scripts/profile_ep_step.py).

`start` and `stop` run on every rank through ExpertParallelExecutor.call (module-level functions, so the
workers can unpickle them; `target` is the rank's RankExecutor), or directly on a single-GPU engine
(`target` the engine). Between the two calls each rank records its kernels (torch profiler, CUDA), its
Python functions (cProfile) and the wall time of its model runner's execute (input preparation and the
launch or graph replay: host work). `stop` writes one report per rank to <prefix>.rank<r>.txt and
returns the rank's summary: GPU kernel time, the part of it in NCCL kernels (which spin while a peer is
late: a long NCCL time on one rank and a short one on another says who waits for whom), the execute time,
and the time in the plan broadcast (rank 0 sending; the others waiting for rank 0).
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from light_moe.bench.env import portable_paths

_running: dict[str, object] = {}  # per process: the profilers between start and stop


def _cumulative_ms(stats: pstats.Stats, file_suffix: str, function: str) -> float:
    return 1e3 * sum(v[3] for (path, _, name), v in stats.stats.items()
                     if name == function and path.replace("\\", "/").endswith(file_suffix))


def start(target) -> None:
    from torch.profiler import ProfilerActivity, profile

    runner, spent = target.runner, [0.0]
    execute = runner.execute

    def timed_execute(*args, **kwargs):  # an instance attribute over the method until stop() deletes it
        begin = time.perf_counter()
        try:
            return execute(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - begin

    runner.execute = timed_execute
    _running["execute_s"] = spent
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _running["torch"] = profile(activities=activities)
    _running["torch"].start()
    _running["cprofile"] = cProfile.Profile()
    _running["cprofile"].enable()


def stop(target, prefix: str, steps: int, top: int = 25) -> dict:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    _running["cprofile"].disable()
    _running["torch"].stop()
    del target.runner.execute  # the method again
    rank = target.group.rank if hasattr(target, "group") else 0
    events = _running["torch"].key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    nccl_us = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower())
    stats = pstats.Stats(_running.pop("cprofile"), stream=io.StringIO())
    summary = dict(rank=rank, gpu_ms_per_step=gpu_us / 1e3 / steps, nccl_ms_per_step=nccl_us / 1e3 / steps,
                   execute_ms=1e3 * _running.pop("execute_s")[0] / steps,
                   # rank 0: sending the plan; the others: waiting for it (idle while rank 0 schedules)
                   plan_broadcast_ms=_cumulative_ms(stats, "parallel/groups.py", "broadcast_bytes") / steps)
    text = io.StringIO()
    text.write(f"{summary}\n")
    text.write(events.table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                            row_limit=top, max_name_column_width=70))
    stats.stream = text
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    with open(f"{prefix}.rank{rank}.txt", "w") as f:
        f.write(portable_paths(text.getvalue()))
    _running.pop("torch")
    return summary
