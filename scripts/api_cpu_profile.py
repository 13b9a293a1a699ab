"""Where a request's CPU goes in the API process: microseconds per request admission and per streamed token.

    python scripts/api_cpu_profile.py                             # split server, 64 streams, both routes
    python scripts/api_cpu_profile.py --no-engine-process         # the engine thread in the server's process
    python scripts/api_cpu_profile.py --profile [PATH]            # again under cProfile: top functions
    python scripts/api_cpu_profile.py --routes completions --requests 1024 --output result.json

The server: build_app + uvicorn (uvloop and httptools when installed, as `light-moe serve` runs) in this process
over the bundled demo model whose model step is scripts/serve_overhead.py's stub (fixed logits, paced like a GPU
step by --step-ms), in an engine-core process of its own by default (what a GPU server runs: this process then
does exactly an API process's work: HTTP, validation, tokenisation, the hand-over to the core, detokenisation,
stop strings, SSE). The client: another process, --streams raw HTTP/1.1 keep-alive connections, each sending
streamed requests back to back until --requests have been answered.

Per route, two phases: admission (max_tokens 1: a request is little but its admission) and tokens (max_tokens
--max-tokens, ignore_eos). Each phase's API CPU (this process's, from /proc; with --no-engine-process minus the
engine thread) is requests x A + tokens x T; the two phases give A (CPU per request admission, its one token
excluded) and T (CPU per streamed token). Also reported: the event-loop thread's share, the chat template
workers' CPU (processes of their own) and SSE events per token (1.0 when the API process keeps pace).

--profile runs each phase again under cProfile (thread CPU time of the event-loop thread) and prints the top
functions by own and by cumulative time. The CPU figures are this machine's: compare before / after on one
machine, in one run of each.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import multiprocessing
import os
import platform
import pstats
import sys
import time
from importlib.util import find_spec
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_overhead  # noqa: E402  (the stub engine, the in-process server, /proc CPU times)

ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def request_body(route: str, max_tokens: int) -> bytes:
    fields = {"model": "demo-moe", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    if route == "chat":
        fields["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        fields["prompt"] = PROMPT
    return json.dumps(fields).encode()


# ---- the client: another process ------------------------------------------------------------------------------
async def _one_connection(port: int, request: bytes, todo: list[int], events: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo[0] > 0:
            todo[0] -= 1
            writer.write(request)
            done = False
            async for data in serve_overhead.read_stream(reader):
                events[0] += data.count(b"data: ")
                done = done or b"data: [DONE]" in data
            if not done:
                raise RuntimeError("a stream ended without data: [DONE]")
    finally:
        writer.close()


async def _all_connections(port: int, request: bytes, connections: int, todo: list[int], events: list[int]) -> None:
    await asyncio.gather(*(_one_connection(port, request, todo, events) for _ in range(connections)))


def client_main(port: int, streams: int, conn) -> None:
    """Runs ("run", route path, body, requests) commands until ("stop",); replies ("done", SSE events)."""
    while True:
        command = conn.recv()
        if command[0] == "stop":
            return
        _, path, body, requests = command
        request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
                   f"Content-Type: application/json\r\nUser-Agent: api-cpu-profile\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        todo, events = [requests], [0]
        try:
            asyncio.run(_all_connections(port, request, min(streams, requests), todo, events))
            conn.send(("done", events[0]))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ---- measuring ------------------------------------------------------------------------------------------------
class Harness:
    """The server in this process, the client in another, and the CPU counters of each party."""

    def __init__(self, args):
        import functools

        from light_moe.server.engine_client import EngineProcess

        self.split = args.engine_process
        build = functools.partial(serve_overhead.build_stub_engine, step_s=args.step_ms / 1e3)
        engine_args = serve_overhead.engine_args(args.streams)
        self.engine = EngineProcess(engine_args, build=build) if self.split else build(engine_args)
        self.server = serve_overhead.Server(self.engine, profile=False, loop=args.loop, http=args.http)
        self.registry = self.server.app.state.server.metrics.registry
        self.server.__enter__()
        ctx = multiprocessing.get_context("spawn")
        self.commands, client_end = ctx.Pipe()  # duplex: commands out, replies back
        self.client = ctx.Process(target=client_main, args=(self.server.port, args.streams, client_end),
                                  daemon=True)
        self.client.start()
        self.pid = os.getpid()
        self.loop_tid = self.server.thread.native_id
        self.engine_tid = None if self.split else self.server.app.state.server.loop._thread.native_id

    def close(self) -> None:
        self.commands.send(("stop",))
        self.client.join(10)
        self.server.__exit__(None, None, None)
        self.engine.shutdown()

    def _template_pids(self) -> list[int]:
        core = self.engine.process.pid if self.split else None
        pids = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split() if int(c) != core]
        return [p for p in pids if p != self.client.pid]

    def sample(self) -> dict:
        process = serve_overhead.cpu_seconds(self.pid)
        engine_thread = serve_overhead.cpu_seconds(self.pid, self.engine_tid) if self.engine_tid else 0.0
        templates = 0.0
        for pid in self._template_pids():
            try:
                templates += serve_overhead.cpu_seconds(pid)
            except OSError:
                pass
        return {"time": time.monotonic(), "api": process - engine_thread,
                "event_loop": serve_overhead.cpu_seconds(self.pid, self.loop_tid), "template_workers": templates,
                "tokens": self.registry.get_sample_value("light_moe_generation_tokens_total") or 0.0}

    def run(self, route: str, max_tokens: int, requests: int) -> dict:
        before = self.sample()
        self.commands.send(("run", ROUTES[route], request_body(route, max_tokens), requests))
        kind, value = self.commands.recv()
        if kind == "error":
            raise RuntimeError(f"the client failed: {value}")
        after = self.sample()
        delta = {k: after[k] - before[k] for k in before}
        delta["requests"] = requests
        # events that carry tokens: a chat stream's role chunk, the usage chunk and [DONE] are per request
        delta["token_events"] = value - requests * (3 if route == "chat" else 2)
        return delta

    def profiled(self, route: str, max_tokens: int, requests: int) -> tuple[pstats.Stats, dict]:
        """The phase again, with the event-loop thread under cProfile (its thread CPU time); its stats and
        counters. The profiler slows the API process several times: unless the stub's steps are slowed as much
        (--step-ms), it falls behind and joins tokens into fewer SSE events than it would send unprofiled."""
        profiler = cProfile.Profile(time.thread_time)
        loop = self.server.app.state.server.loop._loop
        loop.call_soon_threadsafe(profiler.enable)  # cProfile profiles the thread that enables it
        time.sleep(0.1)
        try:
            counters = self.run(route, max_tokens, requests)
        finally:
            loop.call_soon_threadsafe(profiler.disable)
            time.sleep(0.1)
        return pstats.Stats(profiler), counters


def solve(admission: dict, tokens: dict, key: str) -> tuple[float, float]:
    """(CPU us per request admission, per token) from two phases: cpu = requests x A + tokens x T."""
    r1, t1, c1 = admission["requests"], admission["tokens"], admission[key]
    r2, t2, c2 = tokens["requests"], tokens["tokens"], tokens[key]
    det = r1 * t2 - r2 * t1
    per_request = (c1 * t2 - c2 * t1) / det
    per_token = (r1 * c2 - r2 * c1) / det
    return 1e6 * per_request, 1e6 * per_token


def _top(stats: pstats.Stats, sort: str, limit: int) -> str:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats(sort).print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64, help="concurrent connections (and the engine's max_num_seqs)")
    p.add_argument("--requests", type=int, default=512, help="requests per admission phase")
    p.add_argument("--token-requests", type=int, default=128, help="requests per tokens phase")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request in the tokens phase")
    p.add_argument("--step-ms", type=float, default=4.4,
                   help="pace of the stub's steps (4.4: the H100's 4-layer decode step at 64 streams; 0: free)")
    p.add_argument("--routes", nargs="+", choices=tuple(ROUTES), default=list(ROUTES))
    p.add_argument("--repeats", type=int, default=2, help="measurements of each phase (all reported)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine core in a process of its own (default), or a thread of this one")
    p.add_argument("--profile", nargs="?", const="", default=None,
                   help="also run each phase under cProfile (PATH: dump the stats to PATH.<route>.<phase>)")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto")
    p.add_argument("--output", default=None, help="JSON result")
    args = p.parse_args(argv)
    if args.loop == "auto":  # record what auto resolves to, as `light-moe serve` picks it
        args.loop = "uvloop" if find_spec("uvloop") else "asyncio"
    if args.http == "auto":
        args.http = "httptools" if find_spec("httptools") else "h11"
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    result = {"cpu": serve_overhead._cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
              "python": platform.python_version(), "args": vars(args), "routes": {}}
    harness = Harness(args)
    try:
        for route in args.routes:
            harness.run(route, 1, 2 * args.streams)  # warm-up: first uses, template workers, allocator
            harness.run(route, args.max_tokens, args.streams)
            runs = []
            for _ in range(args.repeats):
                admission = harness.run(route, 1, args.requests)
                tokens = harness.run(route, args.max_tokens, args.token_requests)
                a, t = solve(admission, tokens, "api")
                a_loop, t_loop = solve(admission, tokens, "event_loop")
                runs.append({"admission_us": a, "token_us": t, "event_loop_admission_us": a_loop,
                             "event_loop_token_us": t_loop,
                             "template_us_per_request": 1e6 * admission["template_workers"] / admission["requests"],
                             "events_per_token": tokens["token_events"] / max(tokens["tokens"], 1),
                             "requests_per_s": admission["requests"] / admission["time"],
                             "tokens_per_s": tokens["tokens"] / tokens["time"],
                             "phases": {"admission": admission, "tokens": tokens}})
                print(f"{route:12s} admission {a:7.1f} us CPU/request (event loop {a_loop:6.1f}), "
                      f"{t:5.1f} us CPU/token (event loop {t_loop:5.1f}); template workers "
                      f"{runs[-1]['template_us_per_request']:.0f} us/request; "
                      f"{runs[-1]['events_per_token']:.2f} SSE events per token; "
                      f"{runs[-1]['requests_per_s']:.0f} req/s, {runs[-1]['tokens_per_s']:.0f} tok/s")
            result["routes"][route] = runs
            if args.profile is not None:
                for phase, max_tokens, requests in (("admission", 1, args.requests),
                                                    ("tokens", args.max_tokens, args.token_requests)):
                    stats, counters = harness.profiled(route, max_tokens, requests)
                    if args.profile:
                        stats.dump_stats(f"{args.profile}.{route}.{phase}")
                    total = sum(v[2] for v in stats.stats.values())
                    print(f"\n== {route}, {phase} phase under cProfile: {total:.2f} s event-loop CPU, "
                          f"{requests} requests, {counters['token_events'] / max(counters['tokens'], 1):.2f} "
                          "SSE events per token ==")
                    for sort in ("tottime", "cumulative"):
                        print(f"-- by {sort}\n{_top(stats, sort, args.top)}")
    finally:
        harness.close()
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
