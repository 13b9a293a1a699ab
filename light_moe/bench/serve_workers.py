"""The load generator of `light-moe bench serve` over several client processes.

One Python process parsing every streamed event can itself be the bottleneck at the event rates of a GPU server
(measured against a server with no engine behind it: docs/performance.md, "Serving benchmark"). So the requests
are dealt round-robin to N processes, each with its own event loop and connection pool: the arrival times stay
those of the one Poisson process (each worker sends its requests at their global offsets), the concurrency cap
is split between the workers (the seat a request waits for is its worker's), the workers start their clocks
together at a barrier, and the wall time runs from the first start to the last end.
"""
from __future__ import annotations

import asyncio
import math
import multiprocessing
import os

from light_moe.bench.serve import RequestResult, RequestSpec, arrival_offsets, run_stream

BARRIER_TIMEOUT_S = 120.0  # a worker that cannot start (import, connect) breaks the barrier instead of hanging


def client_workers(args, concurrency: int | None) -> int:
    """--client-workers, or by default up to 4 processes, one per 4 CPU cores and 16 concurrent requests (the
    2-core CI machine and small runs keep one, in this process)."""
    if args.client_workers is not None:
        return max(1, args.client_workers)
    cap = concurrency if concurrency is not None else args.num_prompts
    return max(1, min(4, (os.cpu_count() or 1) // 4, cap // 16))


def _split(total: int | None, workers: int, index: int) -> int | None:
    if total is None:
        return None
    return total // workers + (index < total % workers)


def _worker(queue, barrier, index: int, kwargs: dict) -> None:
    epochs: list[float] = []
    try:
        results, _ = asyncio.run(run_stream(**kwargs, ready=lambda: barrier.wait(BARRIER_TIMEOUT_S), epochs=epochs))
        queue.put((index, results, epochs, None))
    except BaseException as exc:  # reported to the parent, which raises it
        barrier.abort()
        queue.put((index, None, epochs, f"{type(exc).__name__}: {exc}"))


def run_clients(base_url: str, model: str, specs: list[RequestSpec], rate: float, max_concurrency: int | None,
                seed: int, token_chunks: bool, api_key: str | None, timeout_s: float,
                workers: int) -> tuple[list[RequestResult], float]:
    """run_stream over `workers` processes (1: in this process); -> results in the order of specs, wall time."""
    workers = max(1, min(workers, len(specs), max_concurrency or len(specs)))
    offsets = arrival_offsets(len(specs), rate, seed)
    if workers == 1:
        return asyncio.run(run_stream(base_url, model, specs, rate, max_concurrency, seed, token_chunks, api_key,
                                      timeout_s, offsets=offsets))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has run event loops and threads
    queue, barrier = ctx.Queue(), ctx.Barrier(workers)
    procs = []
    for w in range(workers):
        kwargs = dict(base_url=base_url, model=model, specs=specs[w::workers], rate=rate,
                      max_concurrency=_split(max_concurrency, workers, w), seed=seed, token_chunks=token_chunks,
                      api_key=api_key, timeout_s=timeout_s, offsets=offsets[w::workers])
        procs.append(ctx.Process(target=_worker, args=(queue, barrier, w, kwargs), daemon=True))
    for p in procs:
        p.start()
    parts: dict[int, tuple[list[RequestResult], list[float]]] = {}
    errors = []
    try:
        for _ in procs:
            index, results, epochs, error = queue.get(timeout=BARRIER_TIMEOUT_S + timeout_s + (
                0 if math.isinf(rate) else offsets[-1]))
            if error is not None:
                errors.append(f"client worker {index}: {error}")
            else:
                parts[index] = (results, epochs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("; ".join(errors))
    ordered: list[RequestResult] = [None] * len(specs)  # type: ignore[list-item]
    for w, (results, _) in parts.items():
        ordered[w::workers] = results
    start = min(epochs[0] for _, epochs in parts.values())
    end = max(epochs[1] for _, epochs in parts.values())
    return ordered, end - start
