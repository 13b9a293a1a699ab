"""The load generator of `light-moe bench serve`: one streamed request (`send`), a request stream in one event
loop (`run_stream`: each request at its arrival time, under the concurrency cap), and the same stream over several
client processes (`run_clients`).

One Python process parsing every streamed event can itself be the bottleneck at the event rates of a GPU server
(measured against a server with no engine behind it: docs/performance.md, "Serving benchmark"). So the requests
can be dealt round-robin to N processes, each with its own event loop and connection pool: the arrival times stay
those of the one Poisson process (each worker sends its requests at their global offsets), the concurrency cap
is split between the workers (the seat a request waits for is its worker's), the workers start their clocks
together at a barrier, and the wall time runs from the first start to the last end.
"""
from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import random
import time
from dataclasses import dataclass, field


@dataclass
class RequestSpec:
    prompt: str | list[int] | list[dict]  # text, token ids, or chat messages
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # seconds
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    sent: float | None = None  # time.time() when it was sent (a common clock across client workers)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process (exponential gaps) at `rate`
    per second; all at 0 for rate inf."""
    if rate <= 0:
        raise ValueError(f"request rate must be positive (inf: all at once), got {rate}")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---- the client ----------------------------------------------------------------------------------
async def send(client, base_url: str, model: str, spec: RequestSpec, token_chunks: bool,
               api_key: str | None = None) -> RequestResult:
    """One streamed request; the result records what the client saw (errors included, never raised)."""
    chat = isinstance(spec.prompt, list) and bool(spec.prompt) and isinstance(spec.prompt[0], dict)
    body = {"model": model, "max_tokens": spec.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = spec.prompt
        if token_chunks:
            body["logprobs"] = True
    else:
        body["prompt"] = spec.prompt
        if token_chunks:
            body["logprobs"] = 0
    url = f"{base_url}/v1/{'chat/completions' if chat else 'completions'}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    result = RequestResult(sent=time.time())
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message')}"
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not _has_tokens(chunk):
                    continue
                # a chunk may carry k tokens (a split server joins a lagging stream's outputs): with logprobs the
                # count is known, and the k tokens share the gap (the first chunk's extra tokens came at once)
                k = _logprob_tokens(chunk)
                if last is None:
                    result.ttft = now - start
                    result.itl.extend([0.0] * (k - 1))
                else:
                    result.itl.extend([(now - last) / k] * k)
                last = now
    except Exception as exc:  # a benchmark reports a failed request; it does not stop
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    if result.ttft is None:
        result.ttft = result.e2e  # every token's text came with the last chunk
    result.ok = result.output_tokens > 0
    if not result.ok:
        result.error = "no tokens (the stream ended without usage)"
    return result


def _has_tokens(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        logprobs = choice.get("logprobs") or {}  # completions: tokens; chat: content
        if choice.get("text") or logprobs.get("tokens") or logprobs.get("content"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content"):
            return True
    return False


def _logprob_tokens(chunk: dict) -> int:
    """Tokens a chunk carries by its logprobs (completions: tokens; chat: content), at least 1."""
    n = 0
    for choice in chunk.get("choices") or ():
        logprobs = choice.get("logprobs") or {}
        n += len(logprobs.get("tokens") or logprobs.get("content") or ())
    return max(1, n)


async def run_stream(base_url: str, model: str, specs: list[RequestSpec], rate: float, max_concurrency: int | None,
                     seed: int, token_chunks: bool, api_key: str | None = None, timeout_s: float = 600.0,
                     offsets: list[float] | None = None, ready=None,
                     epochs: list[float] | None = None) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (waiting for a seat under max_concurrency); -> results, wall time.
    offsets: the arrival times (default: arrival_offsets(rate, seed)); ready: called just before the clock starts
    (a client worker's start barrier: run_clients); epochs: gets the start and end in time.time()."""
    import httpx

    offsets = arrival_offsets(len(specs), rate, seed) if offsets is None else offsets
    seats = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=(max_concurrency or len(specs)) + 4, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        if ready is not None:
            ready()
        start = time.perf_counter()
        if epochs is not None:
            epochs.append(time.time())

        async def one(spec: RequestSpec, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if seats is None:
                return await send(client, base_url, model, spec, token_chunks, api_key)
            async with seats:
                return await send(client, base_url, model, spec, token_chunks, api_key)

        results = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets)))
        if epochs is not None:
            epochs.append(time.time())
        return list(results), time.perf_counter() - start


# ---- several client processes ----------------------------------------------------------------
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
