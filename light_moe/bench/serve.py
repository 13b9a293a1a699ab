"""`light-moe bench serve`: the serving benchmark. Drives an OpenAI-compatible server with a request stream
and reports what its clients see.

    light-moe bench serve [--model DIR | --shape mixtral --layers N] --num-prompts 200 --request-rate 8
    light-moe bench serve --base-url http://127.0.0.1:8000 --max-concurrency 16 --endpoint chat
    light-moe bench serve ... --sweep-rates 1 2 4 8 --output result.json      (+ result.png)

The server: started here as a subprocess (`light-moe serve` with the engine flags given, on a free loopback
port, ready once /health answers 200; stopped with SIGINT at the end), or an existing one at --base-url.

The request stream: --num-prompts requests, arriving as a Poisson process at --request-rate per second (inf:
all at once), at most --max-concurrency in flight. Prompts are synthetic (random token ids, or random words
for chat and for a server whose vocabulary is unknown), --input-len +- --range-ratio tokens after an optional
--shared-prefix-len tokens common to all (a shared system prompt: run with and without --no-prefix-caching to
see the prefix cache's TTFT gain), or lines of a --dataset JSONL ({"prompt": ...} or {"messages": [...]},
optional "output_len"). Every request streams with ignore_eos, so it generates exactly its output length.
Everything random comes from --seed.

Per request (client clock, time.perf_counter): TTFT = first streamed token; ITL = gaps between later chunks
that carry tokens; TPOT = (e2e - TTFT) / (output tokens - 1); e2e = until the stream ends. Output tokens are
the server's usage count. Chunks carry text, so a token whose text is held back (an incomplete character)
arrives with the next one; --token-chunks asks for logprobs so that every step's tokens come in a chunk of
their own (on by default with --shape, whose random model has a tiny tokenizer).
Per run: request and output token throughput over the run's wall time, mean / p50 / p90 / p99 of each latency,
goodput (requests per second meeting every SLO given: --slo-ttft-ms, --slo-tpot-ms, --slo-e2e-ms) and errors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from light_moe.bench.env import environment, write_result
from light_moe.bench.serve_client import RequestResult, RequestSpec, client_workers, run_clients, run_stream
from light_moe.bench.shapes import SHAPES
from light_moe.engine.args import SERVER_DEFAULTS, EngineArgs

PERCENTILES = (50, 90, 99)
_WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or has had "
          "not but what all when we there can one more out if so up said about into than them some could time "
          "model expert token layer batch cache serve kernel memory stream route prefix latency").split()


# ---- the request stream --------------------------------------------------------------------------
def _lengths(rng: random.Random, mean: int, ratio: float, n: int) -> list[int]:
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def synthetic_requests(num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                       shared_prefix_len: int = 0, vocab_size: int | None = None, chat: bool = False,
                       seed: int = 0) -> list[RequestSpec]:
    """Random prompts: token ids below vocab_size (skipping the first 10, where special tokens usually are), or,
    without a vocabulary or for chat, words (about one token each). The first shared_prefix_len are common."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    words = chat or vocab_size is None

    def draw(n: int) -> list:
        if words:
            return [rng.choice(_WORDS) for _ in range(n)]
        return [rng.randrange(10, vocab_size) for _ in range(n)]

    prefix = draw(shared_prefix_len)
    specs = []
    for n_in, n_out in zip(_lengths(rng, input_len, range_ratio, num), _lengths(rng, output_len, range_ratio, num)):
        body = prefix + draw(n_in)
        if chat:
            system, user = " ".join(body[:shared_prefix_len]), " ".join(body[shared_prefix_len:])
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            specs.append(RequestSpec(messages, n_out))
        else:
            specs.append(RequestSpec(" ".join(body) if words else body, n_out))
    return specs


def dataset_requests(path: str, num: int, output_len: int, chat: bool) -> list[RequestSpec]:
    """The first `num` lines of a JSONL file: {"prompt": text} or {"messages": [...]}, optional "output_len"."""
    specs = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            prompt = row["messages"] if chat else "\n".join(m["content"] for m in row["messages"])
        elif "prompt" in row:
            prompt = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
        else:
            raise ValueError(f"{path} line {i + 1}: expected a 'prompt' or 'messages' field")
        specs.append(RequestSpec(prompt, int(row.get("output_len", output_len))))
        if len(specs) == num:
            break
    if not specs:
        raise ValueError(f"{path} holds no prompts")
    return specs


# ---- the numbers ---------------------------------------------------------------------------------
def _percentiles(values: list[float], prefix: str) -> dict:
    """mean and p50 / p90 / p99 in milliseconds (linear interpolation); None without values."""
    out = {f"mean_{prefix}_ms": None, **{f"p{p}_{prefix}_ms": None for p in PERCENTILES}}
    if not values:
        return out
    xs = sorted(values)
    out[f"mean_{prefix}_ms"] = 1e3 * sum(xs) / len(xs)
    for p in PERCENTILES:
        pos = (len(xs) - 1) * p / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{p}_{prefix}_ms"] = 1e3 * (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def summarize(results: list[RequestResult], duration_s: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None, slo_e2e_ms: float | None = None) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def meets(r: RequestResult) -> bool:
        tpot = r.tpot
        return ((slo_ttft_ms is None or 1e3 * r.ttft <= slo_ttft_ms)
                and (slo_tpot_ms is None or tpot is None or 1e3 * tpot <= slo_tpot_ms)
                and (slo_e2e_ms is None or 1e3 * r.e2e <= slo_e2e_ms))

    good = [r for r in ok if meets(r)]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    row = {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration_s, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "goodput": len(good) / duration_s, "good_requests": len(good),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "e2e_ms": slo_e2e_ms},
    }
    row.update(_percentiles([r.ttft for r in ok], "ttft"))
    row.update(_percentiles([r.tpot for r in ok if r.tpot is not None], "tpot"))
    row.update(_percentiles([g for r in ok for g in r.itl], "itl"))
    row.update(_percentiles([r.e2e for r in ok], "e2e"))
    row["errors"] = errors
    return row


def steady_state(results: list[RequestResult], concurrency: int | None) -> dict:
    """Output tok/s while every one of `concurrency` closed-loop streams runs: from the moment the first
    `concurrency` requests sent all have their first token to the moment the last request is sent (after it the
    streams only end: the run's drain). A run's output_throughput includes that ramp and drain, which weigh more the
    fewer requests each stream serves and the more their lengths vary; this figure does not. Token arrival times come
    from each request's send time, TTFT and inter-token gaps. {} where there is no such window (no concurrency cap,
    no more requests than streams, or no time between the two moments)."""
    ok = sorted((r for r in results if r.ok and r.sent is not None), key=lambda r: r.sent)
    if concurrency is None or len(ok) <= concurrency:
        return {}
    start = max(r.sent + r.ttft for r in ok[:concurrency])
    end = ok[-1].sent
    if end <= start:
        return {}
    tokens = 0
    for r in ok:
        t = r.sent + r.ttft
        tokens += start <= t <= end
        for gap in r.itl:
            t += gap
            tokens += start <= t <= end
    return {"steady_output_throughput": tokens / (end - start), "steady_window_s": end - start}


def detailed(results: list[RequestResult]) -> list[dict]:
    """One record per request, in send order of the spec list: when it was sent (seconds after the first send),
    TTFT and end-to-end (ms), output tokens, the error if any: to see *which* requests make a tail."""
    sent = [r.sent for r in results if r.sent is not None]
    t0 = min(sent) if sent else 0.0

    def ms(v):
        return None if v is None else 1e3 * v

    return [{"sent_s": None if r.sent is None else r.sent - t0, "ttft_ms": ms(r.ttft), "e2e_ms": ms(r.e2e),
             "output_tokens": r.output_tokens, "error": r.error} for r in results]


# The server's own latency histograms (docs/server.md, /metrics): their sums, counts and buckets before and after
# a row give the row's server-side means and quantiles, measured from arrival at the server, so a client-side
# TTFT splits into the time before the engine scheduled the request (queue), the rest of the server's time to the
# first token, and what lies outside the server (HTTP in, the client's own event loop); the quantiles say whether
# a client's tail is the server's too
SERVER_LATENCIES = {"ttft": "light_moe_time_to_first_token_seconds",
                    "queue_time": "light_moe_request_queue_time_seconds",
                    "itl": "light_moe_inter_token_latency_seconds", "e2e": "light_moe_e2e_request_latency_seconds"}


SERVER_QUANTILES = (50, 99)


def parse_latency_sums(text: str) -> dict[str, tuple[float, float, dict[float, float]]]:
    """{key: (sum, count, {bucket upper bound s: cumulative count})} of SERVER_LATENCIES from Prometheus text; keys
    whose metric is absent are left out (the buckets may be empty)."""
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        if not line.startswith("light_moe_"):
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith(("_sum", "_count")):
            values[name] = float(value)
        elif "_bucket{" in name and 'le="' in name:
            metric, _, labels = name.partition("_bucket{")
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets.setdefault(metric, {})[float(bound)] = float(value)  # "+Inf" parses as inf
    out = {}
    for key, metric in SERVER_LATENCIES.items():
        if f"{metric}_sum" in values and f"{metric}_count" in values:
            out[key] = (values[f"{metric}_sum"], values[f"{metric}_count"], buckets.get(metric, {}))
    return out


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile: the q-quantile (0..1) of cumulative bucket counts, interpolated linearly
    inside its bucket (from 0 in the first); the highest finite bound where it falls in +Inf; None without data."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def server_latencies(base_url: str, api_key: str | None) -> dict[str, tuple[float, float]] | None:
    """The server's latency sums and counts now; None where /metrics does not answer (another server)."""
    import httpx

    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10.0)
    except httpx.HTTPError:
        return None
    return parse_latency_sums(response.text) if response.status_code == 200 else None


def server_view(before: dict | None, after: dict | None) -> dict | None:
    """The server-side mean of each latency over the row (ms), and the requests it counted (TTFT's count)."""
    if before is None or after is None:
        return None
    out: dict = {}
    for key, (total, count, buckets) in after.items():
        total0, count0, buckets0 = before.get(key, (0.0, 0.0, {}))
        n = count - count0
        out[f"mean_{key}_ms"] = 1e3 * (total - total0) / n if n > 0 else None
        row_buckets = {bound: c - buckets0.get(bound, 0.0) for bound, c in buckets.items()}
        for q in SERVER_QUANTILES:  # bucket-resolution estimates (metrics._LATENCY_BUCKETS), like a dashboard's
            value = histogram_quantile(q / 100, row_buckets) if n > 0 else None
            out[f"p{q}_{key}_ms"] = None if value is None else 1e3 * value
        if key == "ttft":
            out["requests"] = int(n)
    return out


# ---- the server ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, model_dir: Path, load_format: str, port: int) -> list[str]:
    """`light-moe serve` with this benchmark's engine flags (checked here, before the server starts)."""
    engine_args = EngineArgs.from_cli_args(args, model=model_dir, load_format=load_format)
    mode = [] if args.engine_process is None else ["--engine-process" if args.engine_process else "--no-engine-process"]
    if args.api_server_count is not None:
        mode += ["--api-server-count", str(args.api_server_count)]
    return [sys.executable, "-m", "light_moe.cli", "serve", *engine_args.to_cli_args(SERVER_DEFAULTS), *mode,
            "--port", str(port), "--log-level", "warning", "--max-waiting", str(max(1024, args.num_prompts))]


class Server:
    """`light-moe serve` in a subprocess, its output in a log file; a context manager yielding the base URL."""

    def __init__(self, cmd: list[str], port: int, startup_timeout_s: float) -> None:
        self.cmd, self.port, self.timeout = cmd, port, startup_timeout_s
        self.log = tempfile.NamedTemporaryFile("w+", prefix="light-moe-bench-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"the server was not ready within {self.timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the server's graceful shutdown
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def _served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def _vocab_size(model_dir: Path | None, args) -> int | None:
    if args.vocab_size:
        return args.vocab_size
    if model_dir is None:
        return None
    from light_moe.models.loader import load_model_config

    return load_model_config(model_dir)[1].vocab_size


def warmup_requests(args, vocab_size: int | None, chat: bool) -> list[RequestSpec]:
    """The untimed requests sent before the run: the run's prompt length (as the peers' benchmark warms up on a
    prompt of the run), so that its prefill size is no first use inside the timed window, but other prompts (a
    seed of their own, no shared prefix) that leave the prefix cache nothing to give the run. A dataset run
    warms up on a short synthetic prompt."""
    if args.dataset:
        return synthetic_requests(args.warmup, 16, 4, vocab_size=vocab_size, chat=chat, seed=args.seed + 99)
    return synthetic_requests(args.warmup, args.input_len, min(args.output_len, 16), args.range_ratio, 0,
                              vocab_size, chat, args.seed + 99)


# ---- the run -------------------------------------------------------------------------------------
def benchmark(base_url: str, args, vocab_size: int | None, token_chunks: bool) -> dict:
    model = _served_model(base_url, args.api_key)
    chat = args.endpoint == "chat"
    if args.dataset:
        specs = dataset_requests(args.dataset, args.num_prompts, args.output_len, chat)
    else:
        specs = synthetic_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                                   args.shared_prefix_len, vocab_size, chat, args.seed)
    if args.warmup:
        warm = warmup_requests(args, vocab_size, chat)
        asyncio.run(run_stream(base_url, model, warm, math.inf, None, args.seed, token_chunks, args.api_key))
    rows = []
    for concurrency in args.sweep_concurrency or [args.max_concurrency]:
        # --prompts-per-concurrency: N x concurrency prompts (the first of the same list), so that a row at
        # concurrency 1 does not take as long as one at 256
        n = len(specs) if args.prompts_per_concurrency is None or concurrency is None else \
            min(len(specs), args.prompts_per_concurrency * concurrency)
        for rate in args.sweep_rates or [args.request_rate]:
            before = server_latencies(base_url, args.api_key)
            results, duration = run_clients(base_url, model, specs[:n], rate, concurrency, args.seed, token_chunks,
                                            args.api_key, args.request_timeout, client_workers(args, concurrency))
            row = {"request_rate": _rate(rate), "max_concurrency": concurrency,
                   **summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms),
                   **steady_state(results, concurrency)}
            row["server"] = server_view(before, server_latencies(base_url, args.api_key))
            if args.save_detailed:
                row["requests"] = detailed(results)
            rows.append(row)
            print(_line(row), file=sys.stderr)
    return {"model": model, "endpoint": args.endpoint, "num_prompts": len(specs), "rows": rows}


def _line(row: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    server = row.get("server") or {}
    inside = (f"; server side: TTFT mean {f(server.get('mean_ttft_ms'))} p99 {f(server.get('p99_ttft_ms'))} ms, "
              f"queue mean {f(server.get('mean_queue_time_ms'))} p99 {f(server.get('p99_queue_time_ms'))} ms"
              ) if server else ""
    steady = (f" (steady {row['steady_output_throughput']:.1f} over {row['steady_window_s']:.2f} s)"
              if "steady_output_throughput" in row else "")
    return (f"rate {row['request_rate']} concurrency {row['max_concurrency']}: "
            f"{row['completed']}/{row['num_requests']} ok, "
            f"{row['request_throughput']:.2f} req/s, {row['output_throughput']:.1f} out tok/s{steady}, "
            f"TTFT p50 {f(row['p50_ttft_ms'])} p99 {f(row['p99_ttft_ms'])} mean {f(row['mean_ttft_ms'])} ms, "
            f"TPOT p50 {f(row['p50_tpot_ms'])} ms, ITL p50 {f(row['p50_itl_ms'])} ms, "
            f"goodput {row['goodput']:.2f} req/s{inside}")


def plot(result: dict, path: str) -> str | None:
    """Latency against output throughput, one point per rate; None when matplotlib is missing (a note
    instead)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    rows = result["rows"]
    x = [r["output_throughput"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, label in (("p50_ttft_ms", "TTFT p50"), ("p99_ttft_ms", "TTFT p99")):
        ax1.plot(x, [r[key] for r in rows], marker="o", label=label)
    for key, label in (("p50_tpot_ms", "TPOT p50"), ("p99_tpot_ms", "TPOT p99"), ("p50_itl_ms", "ITL p50")):
        ax2.plot(x, [r[key] for r in rows], marker="o", label=label)
    for ax, what in ((ax1, "time to first token (ms)"), (ax2, "time per output token (ms)")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend()
        for r, xi in zip(rows, x):
            label = f"{r['request_rate']}/s" + ("" if r["max_concurrency"] is None else f" c{r['max_concurrency']}")
            ax.annotate(label, (xi, r["p50_ttft_ms" if ax is ax1 else "p50_tpot_ms"] or 0),
                        fontsize=7, textcoords="offset points", xytext=(3, 3))
    fig.suptitle(f"light-moe bench serve: {result['model']}, {result['env']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(args) -> dict:
    from light_moe.bench.e2e import bench_model

    token_chunks = args.token_chunks if args.token_chunks is not None else args.shape is not None
    tmp = None
    if args.base_url:
        vocab = _vocab_size(None, args)
        result = benchmark(args.base_url.rstrip("/"), args, vocab, token_chunks)
    else:
        model_dir, load_format, tmp = bench_model(args)
        try:
            port = _free_port()
            with Server(server_command(args, model_dir, load_format, port), port, args.server_timeout) as url:
                result = benchmark(url, args, _vocab_size(model_dir, args), token_chunks)
        finally:
            if tmp is not None:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    result = {"bench": "serve", "env": environment(), "config": _config(args, token_chunks), **result}
    if len(result["rows"]) > 1 or args.plot:
        png = args.plot or (str(Path(args.output).with_suffix(".png")) if args.output else None)
        if png:
            note = plot(result, png)
            # recorded relative to the JSON (results get committed: no machine paths)
            where = os.path.relpath(png, Path(args.output).resolve().parent) if args.output else png
            result["plot"] = where if note is None else None
            if note:
                result["plot_note"] = note
                print(note, file=sys.stderr)
    write_result(result, args.output)
    return result


def _config(args, token_chunks: bool) -> dict:
    keys = ("base_url", "model", "shape", "layers", "endpoint", "dataset", "num_prompts", "input_len", "output_len",
            "range_ratio", "shared_prefix_len", "request_rate", "sweep_rates", "max_concurrency", "sweep_concurrency",
            "prompts_per_concurrency", "seed",
            "enable_prefix_caching", "engine_process", "api_server_count", "async_scheduling", "max_num_seqs",
            "max_num_batched_tokens",
            "dtype", "device",
            "expert_parallel_size", "quantization")
    config = {k: getattr(args, k, None) for k in keys}
    config["token_chunks"] = token_chunks
    for k in ("request_rate", "sweep_rates"):  # JSON has no infinity
        v = config[k]
        config[k] = [_rate(x) for x in v] if isinstance(v, list) else _rate(v)
    return config


def _rate(rate: float | None):
    return "inf" if rate is not None and math.isinf(rate) else rate


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    server = p.add_argument_group("server (started here unless --base-url)")
    server.add_argument("--base-url", default=None, help="benchmark this running server instead of starting one")
    server.add_argument("--api-key", default=None)
    server.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    server.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="ignore --model: a released model's shape with random weights (bench/shapes.py)")
    server.add_argument("--layers", type=int, default=4, help="layers of the --shape model")
    server.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for /health")
    server.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="the server's engine-core process on or off (default: the server's choice, on with CUDA)")
    server.add_argument("--api-server-count", type=int, default=None,
                        help="the server's API processes in front of its engine core (default: the server's, 1)")
    # the server's engine flags (--shape decides the load format; --seed is the request stream's)
    EngineArgs.add_cli_args(p, exclude=("model", "load_format", "seed"), defaults=SERVER_DEFAULTS)
    load = p.add_argument_group("load")
    load.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    load.add_argument("--num-prompts", type=int, default=100)
    load.add_argument("--dataset", default=None, help='JSONL: {"prompt": ...} or {"messages": [...]} per line')
    load.add_argument("--input-len", type=int, default=128)
    load.add_argument("--output-len", type=int, default=64)
    load.add_argument("--range-ratio", type=float, default=0.0,
                      help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    load.add_argument("--shared-prefix-len", type=int, default=0,
                      help="tokens (words for chat) every prompt starts with, before its own --input-len")
    load.add_argument("--vocab-size", type=int, default=None,
                      help="draw token-id prompts below this (default: the model's; with --base-url, words)")
    load.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf)")
    load.add_argument("--sweep-rates", type=float, nargs="+", default=None,
                      help="one run per rate on the same server; writes a latency-vs-throughput plot")
    load.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    load.add_argument("--sweep-concurrency", type=int, nargs="+", default=None,
                      help="one row per most-in-flight value (times each --sweep-rates rate), one server for all")
    load.add_argument("--prompts-per-concurrency", type=int, default=None,
                      help="with --sweep-concurrency: N x concurrency prompts per row (at most --num-prompts)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--warmup", type=int, default=1,
                      help="requests sent (and not counted) before the run, of the run's prompt length")
    load.add_argument("--request-timeout", type=float, default=600.0)
    load.add_argument("--client-workers", type=int, default=None,
                      help="client processes sending the requests (default: up to 4, one per 4 cores and 16 "
                      "concurrent requests; one process parsing every event can be the bottleneck)")
    load.add_argument("--token-chunks", action=argparse.BooleanOptionalAction, default=None,
                      help="ask for logprobs so that every token arrives in a chunk of its own (default: with --shape)")
    out = p.add_argument_group("results")
    out.add_argument("--slo-ttft-ms", type=float, default=None)
    out.add_argument("--slo-tpot-ms", type=float, default=None)
    out.add_argument("--slo-e2e-ms", type=float, default=None)
    out.add_argument("--output", default=None, help="write the JSON result here (default: print it)")
    out.add_argument("--save-detailed", action="store_true",
                     help="keep every request's send time, TTFT, end-to-end and tokens in each row (\"requests\")")
    out.add_argument("--plot", default=None, help="the plot's PNG (default with --sweep-rates: --output's, .png)")
