"""What the API path costs per streamed token, on the CPU: the real server over an engine whose model step is
(almost) free, so every cycle left is host work: HTTP, SSE, detokenisation, scheduling, sampling, IPC.

    python scripts/serve_overhead.py                        # both modes, one after the other, free steps
    python scripts/serve_overhead.py --engine-process       # only the split (engine core in its own process)
    python scripts/serve_overhead.py --step-ms 4.4          # steps paced like the H100's B=64 4-layer decode
    python scripts/serve_overhead.py --no-engine-process --profile /tmp/serve.prof
    python scripts/serve_overhead.py --streams 64 --max-tokens 256 --duration 10 --output result.json

Shapes: --streams S concurrent streams (the engine's max_num_seqs = S), each of --max-tokens tokens; logits
[S, V] with V = 2048 (the demo model's vocabulary).

The engine: the bundled demo model (light_moe/assets/demo-moe), whose runner's execute() is replaced by a stub
returning fixed logits (rows cycling over word tokens, so every token has text): scheduling, sampling (greedy,
on the CPU), stop checks, detokenisation and outputs all run as in a real step; the model does not. --step-ms
paces the stub like a GPU: a step cannot start before the previous one's step time has passed (the host's work
overlaps it, as under async scheduling; the wait releases the GIL as a device wait does). The server: build_app
+ uvicorn on a loopback port in this process (as tests/test_server.py runs it), over a LightMoEEngine (engine
thread) or an EngineProcess (the split). The client: a separate process with --streams raw asyncio HTTP
connections, each streaming completions back to back (ignore_eos), counting SSE events that carry tokens.

Reported per mode: the tokens/s the engine handed to the handlers (the server's generation-token counter), the
SSE events/s the client received and tokens per event (above 1 when handlers fall behind and join outputs), and
the CPU time per token of each party, from /proc: this process's event-loop thread (HTTP, SSE, handlers; in the
split also detokenisation and routing), its engine thread (in-process: the engine's host work and the text),
the engine-core process (split), and the client. The busiest party's CPU per token bounds the rate on any
number of cores; on a loaded machine the CPU figures stay meaningful where the wall-clock rates do not.
--profile runs each measurement again under cProfile (thread CPU time: the event-loop thread, the engine thread
or the engine-core process) and prints own time by group and the top functions.

This is the ceiling of the API path on this CPU, not a GPU figure: on a GPU the step is not free.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import cProfile
import functools
import json
import logging
import multiprocessing
import os
import platform
import pstats
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from light_moe.assets import DEMO_MODEL_DIR  # noqa: E402
from light_moe.engine.args import EngineArgs  # noqa: E402
from light_moe.engine.engine import LightMoEEngine  # noqa: E402

WORDS = " the model serves tokens to the expert layer and the cache of every batch"


# ---- the engine with a free (or paced) model step -----------------------------------------------------------
class StubExecute:
    """runner.execute's stand-in: logits [S, V] (S = rows that sample) whose argmax cycles over word tokens;
    with step_s > 0, calls at most one per step_s (the device's step time, overlapped by the host's work)."""

    def __init__(self, engine: LightMoEEngine, step_s: float):
        ids = engine.tokenizer.encode(WORDS, add_special_tokens=False)
        vocab = engine.model_config.vocab_size
        self.table = torch.full((len(ids), vocab), -10.0)
        self.table[torch.arange(len(ids)), torch.tensor(ids)] = 10.0
        self.calls = 0
        self.step_s = step_s
        self.device_free_at = 0.0

    def __call__(self, scheduled, graph_tag=None, allow_graph=True, prev_tokens=None) -> torch.Tensor:
        if self.step_s > 0:
            now = time.monotonic()
            if now < self.device_free_at:
                time.sleep(self.device_free_at - now)
            self.device_free_at = max(now, self.device_free_at) + self.step_s
        rows = sum(1 for s in scheduled if s.samples)
        self.calls += 1
        index = (torch.arange(rows) + self.calls) % self.table.shape[0]
        return self.table.index_select(0, index)


def build_stub_engine(args: EngineArgs, step_s: float = 0.0, profile_path: str | None = None) -> LightMoEEngine:
    """The engine of `args` with the stub step (module level: the engine-core process is given it by name).
    profile_path: profile this thread (in the engine-core process the main thread, which goes on to run the
    core's loop) from here on, and dump the stats there at exit."""
    torch.set_num_threads(1)  # the stub's CPU sampling gains nothing from more; idle OpenMP workers would spin
    engine = LightMoEEngine.from_engine_args(args)
    engine.runner.execute = StubExecute(engine, step_s)
    if profile_path is not None:
        prof = cProfile.Profile(time.thread_time)
        prof.enable()

        def dump():
            prof.disable()
            prof.dump_stats(profile_path)

        atexit.register(dump)
    return engine


def engine_args(max_num_seqs: int) -> EngineArgs:
    return EngineArgs(DEMO_MODEL_DIR, dtype="float32", device="cpu", show_progress=False, max_num_seqs=max_num_seqs,
                      enable_prefix_caching=False)


# ---- CPU time from /proc ------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


# ---- the client: another process, raw HTTP/1.1 over asyncio ---------------------------------------------------
async def read_stream(reader: asyncio.StreamReader):
    """One streamed response on a keep-alive connection: checks the 200, skips the headers, then yields each
    chunk of the chunked body (an SSE event or a few, with its trailing CRLF) until the last, empty one."""
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"the server answered {status!r}")
    while await reader.readline() not in (b"\r\n", b""):
        pass
    while True:
        size = int((await reader.readline()).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return
        yield data


async def _stream_forever(port: int, body: bytes, counts: list, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        while not stop.is_set():
            writer.write(request)
            async for data in read_stream(reader):  # one SSE event per chunk
                if data.startswith(b'data: {"id"') and b'"text":""' not in data:
                    counts[0] += 1
    finally:
        writer.close()


def client_main(port: int, streams: int, max_tokens: int, seconds: float, logprobs: bool, out) -> None:
    fields = {"model": "demo-moe", "prompt": "the expert layer and the cache", "max_tokens": max_tokens,
              "temperature": 0, "ignore_eos": True, "stream": True}
    if logprobs:
        fields["logprobs"] = 0
    body = json.dumps(fields).encode()

    async def main():
        counts, stop = [0], asyncio.Event()
        tasks = [asyncio.ensure_future(_stream_forever(port, body, counts, stop)) for _ in range(streams)]
        marks = []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            await asyncio.sleep(0.25)
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                raise failed[0].exception()
            marks.append((time.monotonic(), counts[0], cpu_seconds(os.getpid())))
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return marks

    try:
        out.send(("marks", asyncio.run(main())))
    except BaseException as exc:
        out.send(("error", f"{type(exc).__name__}: {exc}"))


# ---- the server in this process -------------------------------------------------------------------------------
class Server:
    def __init__(self, engine, profile: bool, loop: str = "auto", http: str = "auto"):
        import uvicorn

        from light_moe.server.app import DrainingServer, build_app

        self.app = build_app(engine, served_model_name="demo-moe")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", loop=loop,
                                http=http)
        self.server = DrainingServer(config, self.app.state.server.loop, drain_timeout=1.0)
        self.profiles: dict = {}
        self.thread = threading.Thread(target=self._run, args=(profile,), daemon=True)

    def _run(self, profile: bool) -> None:
        if profile:
            self.profiles["event loop"] = prof = cProfile.Profile(time.thread_time)
            prof.enable()
        self.server.run()
        if profile:
            prof.disable()

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def _profile_engine_thread(loop, profiles: dict) -> None:
    """Wrap the in-process engine loop's thread body in a cProfile of its own."""
    run = loop._run

    def profiled():
        profiles["engine thread"] = prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            run()
        finally:
            prof.disable()

    loop._run = profiled


def measure(args, split: bool, profile: bool) -> dict:
    from light_moe.server.engine_client import EngineProcess

    core_profile = f"{args.profile or '/tmp/serve_overhead'}.engine_core.{os.getpid()}" if profile and split else None
    build = functools.partial(build_stub_engine, step_s=args.step_ms / 1e3, profile_path=core_profile)
    engine = EngineProcess(engine_args(args.streams), build=build) if split else build(engine_args(args.streams))
    try:
        server = Server(engine, profile, args.loop, args.http)
        loop = server.app.state.server.loop
        registry = server.app.state.server.metrics.registry
        if profile and not split:
            _profile_engine_thread(loop, server.profiles)
        with server:
            ctx = multiprocessing.get_context("spawn")
            recv, send = ctx.Pipe(duplex=False)
            client = ctx.Process(target=client_main, args=(server.port, args.streams, args.max_tokens,
                                                           args.warmup + args.duration + 1.0, args.logprobs, send),
                                 daemon=True)
            client.start()
            pid = os.getpid()
            threads = {"event loop": server.thread.native_id}
            if not split:
                threads["engine thread"] = loop._thread.native_id

            def sample() -> dict:
                cpu = {name: cpu_seconds(pid, tid) for name, tid in threads.items()}
                cpu["server process"] = cpu_seconds(pid)
                if split:
                    cpu["engine-core process"] = cpu_seconds(engine.process.pid)
                counters = {name: registry.get_sample_value(f"light_moe_{name}_total") or 0.0
                            for name in ("engine_steps", "generation_tokens")}
                return {"time": time.monotonic(), "cpu": cpu, **counters}

            time.sleep(args.warmup)
            before = sample()
            time.sleep(args.duration)
            after = sample()
            if not recv.poll(args.duration + 60):
                raise RuntimeError(f"the client did not report (exit code {client.exitcode})")
            kind, marks = recv.recv()
            client.join(30)
            if kind == "error":
                raise RuntimeError(f"the client failed: {marks}")
    finally:
        engine.shutdown()
    wall = after["time"] - before["time"]
    tokens = after["generation_tokens"] - before["generation_tokens"]
    steps = after["engine_steps"] - before["engine_steps"]
    inside = [m for m in marks if before["time"] <= m[0] <= after["time"]]  # the same clock, other process
    (t0, n0, c0), (t1, n1, c1) = inside[0], inside[-1]
    cpu = {name: after["cpu"][name] - before["cpu"][name] for name in after["cpu"]}
    cpu["client process"] = (c1 - c0) * wall / max(t1 - t0, 1e-9)
    events_per_s = (n1 - n0) / max(t1 - t0, 1e-9)
    result = {"loop": args.loop, "http": args.http,
              "mode": "engine-core process (split)" if split else "in-process (engine thread)",
              "tokens_per_s": tokens / wall, "events_per_s": events_per_s,
              "tokens_per_event": tokens / wall / max(events_per_s, 1e-9), "tokens_per_step": tokens / max(steps, 1),
              "window_s": wall, "cpu_s": cpu, "cpu_us_per_token": {k: 1e6 * v / max(tokens, 1) for k, v in cpu.items()}}
    if args.step_ms > 0:
        result["ideal_tokens_per_s"] = args.streams / (args.step_ms / 1e3)
    if profile:
        if core_profile is not None:
            server.profiles["engine-core process"] = pstats.Stats(core_profile)
        result["profile"] = {name: _grouped(prof) for name, prof in server.profiles.items()}
        if args.profile:
            for name, prof in server.profiles.items():
                prof.dump_stats(f"{args.profile}.{'split' if split else 'inprocess'}.{name.replace(' ', '_')}")
    return result


# ---- profile summary ------------------------------------------------------------------------------------------
GROUPS = [  # (group, substrings of "file:function"), first match wins
    ("sse / json", ("json/", "app.py:events", "app.py:chunks", "app.py:_body", "app.py:_chunk")),
    ("http (uvicorn, h11, starlette)", ("uvicorn/", "h11/", "starlette/", "fastapi/", "anyio/")),
    ("asyncio", ("asyncio/", "selectors.py", "socket.py")),
    ("detokenise / outputs", ("request_state.py", "tokenizer.py", "outputs.py", "tokenizers")),
    ("engine loop / ipc / metrics", ("engine_loop.py", "engine_core.py", "engine_client.py", "multiprocessing/",
                                     "pickle", "metrics.py", "prometheus_client/")),
    ("scheduler / kv", ("scheduler.py", "kv_cache.py", "request.py")),
    ("sampling / torch", ("sampler.py", "inflight.py", "device_to_host.py", "torch", "serve_overhead.py")),
    ("engine step (other)", ("engine.py", "expert_load.py", "balancer.py")),
    ("threading / waits", ("threading.py", "method 'acquire'", "method 'wait'")),
]


def _grouped(prof: cProfile.Profile | pstats.Stats) -> dict:
    stats = prof if isinstance(prof, pstats.Stats) else pstats.Stats(prof)
    total = 0.0
    groups: dict[str, float] = {}
    top = []
    for (file, line, func), (_, _, tottime, _, _) in stats.stats.items():
        key = f"{file}:{func}"
        total += tottime
        group = next((g for g, needles in GROUPS if any(n in key for n in needles)), "other")
        groups[group] = groups.get(group, 0.0) + tottime
        top.append((tottime, f"{Path(file).name}:{line}({func})"))
    top.sort(reverse=True)
    return {"total_s": total, "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top": [(name, t) for t, name in top[:25]]}


def _print(result: dict) -> None:
    ideal = f" of {result['ideal_tokens_per_s']:,.0f} paced" if "ideal_tokens_per_s" in result else ""
    print(f"{result['mode']}: {result['tokens_per_s']:,.0f} tokens/s{ideal}, {result['events_per_s']:,.0f} SSE "
          f"events/s ({result['tokens_per_event']:.2f} tokens per event, {result['tokens_per_step']:.1f} per step)")
    for name, us in result["cpu_us_per_token"].items():
        print(f"  {name:20s} {us:8.1f} us CPU per token   ({result['cpu_s'][name]:.2f} s)")
    for name, prof in result.get("profile", {}).items():
        print(f"  profile, {name}: {prof['total_s']:.2f} s own time (thread CPU, profiler included)")
        for group, t in prof["groups"].items():
            print(f"    {group:32s} {t:7.2f} s  {100 * t / max(prof['total_s'], 1e-9):5.1f} %")
        for func, t in prof["top"][:10]:
            print(f"      {t:7.3f} s  {func}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="pace the stub's steps like a device taking this long per step (0: free steps)")
    p.add_argument("--logprobs", action="store_true", help="ask for logprobs, as `bench serve --token-chunks` does")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="the engine core in a process of its own (default: both modes, one after the other)")
    p.add_argument("--profile", nargs="?", const="", default=None,
                   help="measure again under cProfile (PATH: also dump the stats to PATH.<mode>.<party>)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="uvicorn's event loop (auto: uvloop when installed, as `light-moe serve` runs)")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto",
                   help="uvicorn's HTTP parser (auto: httptools when installed)")
    p.add_argument("--output", default=None, help="JSON result")
    args = p.parse_args(argv)
    if args.loop == "auto":  # record what auto resolves to
        args.loop = "uvloop" if find_spec("uvloop") else "asyncio"
    if args.http == "auto":
        args.http = "httptools" if find_spec("httptools") else "h11"
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # writes to clients that left at the end of a run
    result = {"cpu": _cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
              "python": platform.python_version(), "args": vars(args)}
    if args.engine_process is None:  # each mode in a fresh process: nothing of one run lingers in the other's
        result["runs"], result["profiled"] = [], []
        for flag in ("--no-engine-process", "--engine-process"):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), flag,
                                "--output", out.name], check=True)
                one = json.loads(Path(out.name).read_text())
            result["runs"] += one["runs"]
            result["profiled"] += one.get("profiled", [])
    else:
        result["runs"] = [measure(args, args.engine_process, profile=False)]
        _print(result["runs"][-1])
        if args.profile is not None:
            result["profiled"] = [measure(args, args.engine_process, profile=True)]
            _print(result["profiled"][-1])
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        return f"{info['model name'].strip()} (family {info['cpu family'].strip()}, model {info['model'].strip()})"
    except (OSError, KeyError):
        return platform.processor()


if __name__ == "__main__":
    main()
