"""`light-moe bench serve`: the request stream (Poisson arrivals, synthetic and JSONL prompts, seeds), the
summary numbers, and whole runs on CPU: the CLI starting `light-moe serve` with the bundled model (the CI
check), and the client against an in-process server with chat, a shared prefix and a concurrency cap."""
import asyncio
import json
import math
import statistics
import types

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from light_moe.bench.serve import (  # noqa: E402
    dataset_requests,
    histogram_quantile,
    parse_latency_sums,
    server_view,
    steady_state,
    summarize,
    synthetic_requests,
)
from light_moe.bench.serve_client import RequestResult, RequestSpec, arrival_offsets, run_stream  # noqa: E402
from light_moe.cli import main as cli_main  # noqa: E402


# ---- the request stream --------------------------------------------------------------------------
def test_poisson_arrivals_have_the_rate_and_follow_the_seed():
    offsets = arrival_offsets(4000, 8.0, seed=3)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 8, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: sd = mean
    assert offsets == arrival_offsets(4000, 8.0, seed=3) != arrival_offsets(4000, 8.0, seed=4)
    assert arrival_offsets(5, math.inf, 0) == [0.0] * 5
    with pytest.raises(ValueError, match="positive"):
        arrival_offsets(5, 0, 0)


def test_synthetic_prompts_lengths_shared_prefix_and_seed():
    specs = synthetic_requests(50, input_len=20, output_len=10, range_ratio=0.5, shared_prefix_len=7,
                               vocab_size=300, seed=1)
    assert all(isinstance(s.prompt, list) and 7 + 10 <= len(s.prompt) <= 7 + 30 for s in specs)
    assert all(10 <= t < 300 for s in specs for t in s.prompt)
    assert len({tuple(s.prompt[:7]) for s in specs}) == 1 and len({tuple(s.prompt[7:]) for s in specs}) == 50
    assert {s.output_len for s in specs} <= set(range(5, 16)) and len({s.output_len for s in specs}) > 3
    assert [s.prompt for s in specs] == [s.prompt for s in synthetic_requests(50, 20, 10, 0.5, 7, 300, seed=1)]
    fixed = synthetic_requests(4, 12, 3, vocab_size=None, seed=0)  # no vocabulary: words
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 12 and s.output_len == 3 for s in fixed)
    chat = synthetic_requests(3, 5, 2, shared_prefix_len=4, vocab_size=300, chat=True, seed=0)
    assert [m["role"] for m in chat[0].prompt] == ["system", "user"]
    assert len({s.prompt[0]["content"] for s in chat}) == 1 and len(chat[0].prompt[1]["content"].split()) == 5


def test_dataset_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 3}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "third"}\n')
    specs = dataset_requests(str(path), 2, output_len=9, chat=False)
    assert [(s.prompt, s.output_len) for s in specs] == [("hello there", 3), ("hi", 9)]
    chat = dataset_requests(str(path), 10, output_len=9, chat=True)
    assert chat[0].prompt == [{"role": "user", "content": "hello there"}] and len(chat) == 3
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        dataset_requests(str(path), 1, 4, False)


def test_summary_percentiles_goodput_and_errors():
    def done(ttft, e2e, tokens):
        return RequestResult(ok=True, prompt_tokens=10, output_tokens=tokens, ttft=ttft, e2e=e2e,
                             itl=[(e2e - ttft) / (tokens - 1)] * (tokens - 1))

    results = [done(0.1, 0.5, 5), done(0.3, 1.1, 5), done(0.2, 0.6, 3), RequestResult(error="HTTP 503: busy")]
    row = summarize(results, duration_s=2.0, slo_ttft_ms=250, slo_tpot_ms=150)
    assert (row["completed"], row["failed"], row["errors"]) == (3, 1, {"HTTP 503: busy": 1})
    assert row["output_tokens"] == 13 and row["input_tokens"] == 30
    assert row["request_throughput"] == 1.5 and row["output_throughput"] == 6.5
    assert row["p50_ttft_ms"] == pytest.approx(200) and row["p99_ttft_ms"] == pytest.approx(298)
    assert row["mean_tpot_ms"] == pytest.approx(1e3 * (0.1 + 0.2 + 0.2) / 3)
    # TPOTs 100, 200, 200 ms; TTFTs 100, 300, 200 ms: only the first meets both SLOs
    assert row["good_requests"] == 1 and row["goodput"] == 0.5
    assert summarize(results, 2.0)["good_requests"] == 3
    assert summarize([RequestResult(error="x")], 1.0)["p50_ttft_ms"] is None


def test_steady_state_counts_the_tokens_while_every_stream_runs():
    """Two streams, closed loop: requests a, b sent at 0, c when a ends, d when b ends. The window runs from the
    later of a's and b's first token (1.0) to d's send (5.0); tokens arrive once a second per request."""
    def done(sent, tokens):  # first token 1 s after the send, then one a second; ends with its last token
        return RequestResult(ok=True, output_tokens=tokens, ttft=1.0, e2e=float(tokens), itl=[1.0] * (tokens - 1),
                             sent=sent)

    a, b, c, d = done(0.0, 3), done(0.0, 5), done(3.0, 4), done(5.0, 2)  # a: 1,2,3  b: 1..5  c: 4..7  d: 6,7
    row = steady_state([d, c, b, a, RequestResult(error="x")], concurrency=2)  # any order; failures ignored
    # in [1, 5]: a 3, b 5, c 2 (4, 5), d 0
    assert row == {"steady_output_throughput": pytest.approx(10 / 4), "steady_window_s": pytest.approx(4.0)}
    assert steady_state([a, b, c, d], None) == {}  # a rate without a cap: no window
    assert steady_state([a, b], 2) == {}  # no request beyond the streams
    assert steady_state([done(0.0, 3), done(0.0, 3), done(0.5, 3)], 2) == {}  # the last send precedes the window


# ---- whole runs ----------------------------------------------------------------------------------
def test_server_quantiles_from_the_histogram_buckets_of_a_row():
    """A row's server-side quantiles come from the bucket counts it added (after - before), interpolated inside the
    bucket as Prometheus's histogram_quantile does; a quantile in +Inf is the highest finite bound."""
    def text(counts: list[int], total: float) -> str:  # TTFT buckets 0.01 / 0.1 / 1 / +Inf, cumulative
        bounds = ["0.01", "0.1", "1.0", "+Inf"]
        lines = [f'light_moe_time_to_first_token_seconds_bucket{{le="{b}"}} {float(c)}' for b, c in zip(bounds, counts)]
        return "\n".join(lines + [f"light_moe_time_to_first_token_seconds_sum {total}",
                                   f"light_moe_time_to_first_token_seconds_count {float(counts[-1])}"])

    before = parse_latency_sums(text([5, 5, 5, 5], 0.02))  # an earlier row's 5 requests, all under 10 ms
    after = parse_latency_sums(text([5, 55, 104, 105], 0.02 + 100 * 0.05))
    assert after["ttft"][2][math.inf] == 105.0
    view = server_view(before, after)
    assert view["requests"] == 100 and view["mean_ttft_ms"] == pytest.approx(50.0)
    # 50th of 100: in (0.01, 0.1] holding 50 of them -> 0.01 + 0.09 * 50 / 50
    assert view["p50_ttft_ms"] == pytest.approx(100.0)
    # 99th: in (0.1, 1.0] holding 49 (ranks 51..99) -> 0.1 + 0.9 * 49 / 49
    assert view["p99_ttft_ms"] == pytest.approx(1000.0)
    assert histogram_quantile(0.5, {0.1: 2.0, math.inf: 2.0}) == pytest.approx(0.05)
    assert histogram_quantile(0.99, {0.1: 0.0, math.inf: 3.0}) == 0.1  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_cli_starts_the_server_with_the_bundled_model_and_measures(tmp_path):
    """The CI check: 12 requests, 8 tokens each, at two rates and two concurrency caps (3 x cap requests at
    cap 1, all 12 at cap 4) on one `light-moe serve` process."""
    out = tmp_path / "serve.json"
    code = cli_main(["bench", "serve", "--device", "cpu", "--num-prompts", "12", "--sweep-concurrency", "1", "4",
                     "--prompts-per-concurrency", "3", "--input-len", "24", "--output-len", "8",
                     "--sweep-rates", "40", "inf", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
                     "--save-detailed", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["bench"] == "serve" and result["env"]["device"] == "cpu" and result["env"]["commit"]
    assert result["config"]["enable_prefix_caching"] is True and result["config"]["sweep_rates"] == [40.0, "inf"]
    assert result["config"]["sweep_concurrency"] == [1, 4]
    assert [(row["request_rate"], row["max_concurrency"]) for row in result["rows"]] == \
        [(40.0, 1), ("inf", 1), (40.0, 4), ("inf", 4)]
    for row in result["rows"]:
        n = 3 * row["max_concurrency"]
        assert (row["num_requests"], row["completed"], row["failed"], row["errors"]) == (n, n, 0, {})
        assert row["output_tokens"] == n * 8  # ignore_eos: every request generates max_tokens
        assert row["input_tokens"] == n * 24  # token-id prompts: exactly --input-len
        assert row["request_throughput"] == pytest.approx(n / row["duration_s"])
        assert row["output_throughput"] == pytest.approx(n * 8 / row["duration_s"])
        assert row["good_requests"] == n and row["goodput"] == row["request_throughput"]
        for metric in ("ttft", "tpot", "itl", "e2e"):
            assert 0 < row[f"p50_{metric}_ms"] <= row[f"p90_{metric}_ms"] <= row[f"p99_{metric}_ms"]
        assert row["p50_ttft_ms"] <= row["p50_e2e_ms"] and row["p99_ttft_ms"] <= row["p99_e2e_ms"]
        assert row["mean_tpot_ms"] * 7 <= row["mean_e2e_ms"]
        # --save-detailed: one record per request, the summary's numbers come from them
        records = row["requests"]
        assert len(records) == n and all(r["error"] is None and r["output_tokens"] == 8 for r in records)
        assert min(r["sent_s"] for r in records) == 0 and all(0 <= r["sent_s"] < row["duration_s"] for r in records)
        assert all(0 < r["ttft_ms"] <= r["e2e_ms"] for r in records)
        ttfts = sorted(r["ttft_ms"] for r in records)
        assert ttfts[0] <= row["p50_ttft_ms"] <= row["p99_ttft_ms"] <= ttfts[-1]
        assert row["mean_ttft_ms"] == pytest.approx(sum(ttfts) / n)
        # the server's own view of the row (/metrics before and after): its requests, and latencies measured over
        # a part of what the client measured
        server = row["server"]
        assert server["requests"] == n
        assert 0 < server["mean_queue_time_ms"] <= server["mean_ttft_ms"] <= row["mean_ttft_ms"]
        assert 0 < server["mean_e2e_ms"] <= row["mean_e2e_ms"] and server["mean_itl_ms"] > 0
        assert 0 < server["p50_ttft_ms"] <= server["p99_ttft_ms"] and server["p99_queue_time_ms"] > 0
    png = tmp_path / "serve.png"
    # recorded relative to the JSON beside it
    assert (result["plot"] == "serve.png" and png.stat().st_size > 0) or "matplotlib" in result["plot_note"]


def test_client_chat_shared_prefix_and_concurrency_cap(tmp_path_factory):
    from tests.test_server import MODEL, _engine, _metric, _metrics, _running_server, _wait_idle
    from tests.tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=1024)
    engine = _engine(ckpt, block_size=8, max_num_seqs=64)
    specs = synthetic_requests(10, 6, 4, shared_prefix_len=40, vocab_size=320, chat=True, seed=5)
    with _running_server(engine) as url:
        results, duration = asyncio.run(run_stream(url, MODEL, specs, rate=50.0, max_concurrency=3, seed=0,
                                                   token_chunks=True))
        after = _wait_idle(url)
        max_batch = _metric(_metrics(url), "light_moe_max_batch_size")
    assert all(r.ok and r.output_tokens == 4 for r in results), [r.error for r in results]
    assert all(0 < r.ttft <= r.e2e <= duration and len(r.itl) == 3 for r in results)  # one chunk per token
    assert max_batch <= 3  # at most 3 requests in flight
    # the chat system prompt (40 words) is shared: later requests find its blocks cached
    assert _metric(after, "light_moe_prefix_cache_hits_total") >= 8 * 9
    assert sum(r.prompt_tokens for r in results) == _metric(after, "light_moe_prefix_cache_queries_total")


def test_client_workers_split_the_stream_and_keep_its_order(tmp_path_factory):
    """Two client processes: every request sent once (its own output length comes back at its own index), at
    most the concurrency cap in flight together, the wall time from the first start to the last end; failed
    requests come back as such."""
    from light_moe.bench.serve_client import client_workers, run_clients
    from tests.test_server import MODEL, _engine, _metric, _metrics, _running_server
    from tests.tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))
    engine = _engine(ckpt, block_size=8, max_num_seqs=64)
    specs = [RequestSpec(list(range(10, 30)), n) for n in (3, 5, 4, 6, 2, 7, 3)]
    with _running_server(engine) as url:
        results, duration = run_clients(url, MODEL, specs, 100.0, 4, 0, True, None, 60.0, workers=2)
        max_batch = _metric(_metrics(url), "light_moe_max_batch_size")
    # a server that is not there: every request reported failed, by the worker that sent it
    failed, _ = run_clients("http://127.0.0.1:1", MODEL, specs, math.inf, 4, 0, True, None, 5.0, workers=2)
    assert len(failed) == len(specs) and all(not r.ok and r.error for r in failed)
    assert [r.output_tokens for r in results] == [s.output_len for s in specs]
    assert all(r.ok and 0 < r.ttft <= r.e2e <= duration for r in results)
    sent = [r.sent for r in results]  # one clock across the workers: all sent within the run
    assert max(sent) - min(sent) <= duration
    assert max_batch <= 4
    args = types.SimpleNamespace(client_workers=None, num_prompts=1000)
    assert client_workers(args, 1) == 1 and client_workers(args, 8) == 1  # small runs stay in this process
    assert client_workers(types.SimpleNamespace(client_workers=3, num_prompts=1), 1) == 3


@pytest.mark.parametrize("flag,expected", [([], None), (["--engine-process"], "--engine-process"),
                                           (["--no-engine-process"], "--no-engine-process")])
def test_server_command_passes_the_engine_process_choice(flag, expected, tmp_path):
    from light_moe.bench.serve import server_command
    from light_moe.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--device", "cpu", *flag])
    cmd = server_command(args, tmp_path, "auto", 8123)
    modes = [a for a in cmd if a.endswith("engine-process")]
    assert modes == ([] if expected is None else [expected])
    assert cmd[cmd.index("--port") + 1] == "8123"


def test_a_chunk_of_several_tokens_gives_one_itl_value_per_token():
    from light_moe.bench.serve_client import _logprob_tokens

    completion = {"choices": [{"text": "abc", "logprobs": {"tokens": ["a", "b", "c"], "token_logprobs": [0, 0, 0]}}]}
    chat = {"choices": [{"delta": {"content": "ab"}, "logprobs": {"content": [{"token": "a"}, {"token": "b"}]}}]}
    plain = {"choices": [{"text": "abc", "logprobs": None}]}
    assert [_logprob_tokens(c) for c in (completion, chat, plain)] == [3, 2, 1]


def test_warmup_requests_take_the_run_length_and_other_prompts():
    """The warm-up is as long as the run's prompts (its prefill size is compiled and captured before the clock
    starts) but shares no prompt or prefix with the run (the prefix cache gives the run nothing)."""
    import argparse

    from light_moe.bench.serve import warmup_requests

    args = argparse.Namespace(warmup=3, dataset=None, input_len=40, output_len=256, range_ratio=0.0,
                              shared_prefix_len=16, seed=5)
    run = synthetic_requests(10, 40, 256, 0.0, 16, vocab_size=300, seed=5)
    warm = warmup_requests(args, 300, chat=False)
    assert len(warm) == 3 and all(len(w.prompt) == 40 and w.output_len == 16 for w in warm)
    run_prompts = {tuple(r.prompt) for r in run}
    assert all(tuple(w.prompt) not in run_prompts and w.prompt[:16] != run[0].prompt[:16] for w in warm)
    args.dataset = "prompts.jsonl"
    assert all(len(w.prompt) == 16 and w.output_len == 4 for w in warmup_requests(args, 300, chat=False))


def test_server_command_passes_the_api_server_count(tmp_path):
    from light_moe.bench.serve import server_command
    from light_moe.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--device", "cpu"])
    assert "--api-server-count" not in server_command(args, tmp_path, "auto", 8123)  # the server's default
    args = build_parser().parse_args(["bench", "serve", "--device", "cpu", "--api-server-count", "4"])
    cmd = server_command(args, tmp_path, "auto", 8123)
    assert cmd[cmd.index("--api-server-count") + 1] == "4"


def test_cli_measures_a_server_with_two_api_processes(tmp_path):
    """`bench serve --api-server-count 2` on the CPU: the requests spread over two API processes, and the server's
    view of the row (/metrics, aggregated over the processes) counts each request once."""
    out = tmp_path / "serve.json"
    code = cli_main(["bench", "serve", "--device", "cpu", "--api-server-count", "2", "--num-prompts", "8",
                     "--max-concurrency", "4", "--input-len", "16", "--output-len", "6", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["api_server_count"] == 2
    (row,) = result["rows"]
    assert (row["completed"], row["failed"], row["output_tokens"]) == (8, 0, 48)
    assert row["server"]["requests"] == 8
