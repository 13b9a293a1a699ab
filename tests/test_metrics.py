"""/metrics after real requests against a real uvicorn (tiny model, CPU): the latency histograms (TTFT, TPOT,
ITL, e2e, queue time) have one observation per request (ITL: one per token after the first), the prefix-cache
counters count the prompt tokens looked up and found, and preemptions match the engine's count."""
import asyncio

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client.parser")

from tests.test_server import MODEL, _engine, _metric, _running_server, _wait_idle  # noqa: E402
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

SYSTEM = ("You are a careful assistant. Answer briefly and precisely, and never make anything up. "
          "The quick brown fox jumps over the lazy dog. ")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=1024)


def _complete(url: str, prompts: list[str], max_tokens: int, stream: bool = True) -> list[dict]:
    async def one(client, prompt):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
            usage = None
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        import json

                        usage = json.loads(line[6:]).get("usage") or usage
            return usage
        response = await client.post(f"{url}/v1/completions", json=body)
        assert response.status_code == 200
        return response.json()["usage"]

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    return asyncio.run(main())


HISTOGRAMS = ("light_moe_time_to_first_token_seconds", "light_moe_time_per_output_token_seconds",
              "light_moe_e2e_request_latency_seconds", "light_moe_request_queue_time_seconds")


def test_latency_histograms_and_prefix_cache_counters(ckpt):
    max_tokens = 5
    with _running_server(_engine(ckpt, block_size=8)) as url:
        before = _wait_idle(url)
        for name in HISTOGRAMS + ("light_moe_inter_token_latency_seconds",):
            assert (f"{name}_count", ()) in before, name
        for name in ("light_moe_prefix_cache_queries_total", "light_moe_prefix_cache_hits_total",
                     "light_moe_preemptions_total", "light_moe_prefix_cache_hit_rate"):
            assert (name, ()) in before, name
        first = _complete(url, [SYSTEM + "First question?"], max_tokens)
        _wait_idle(url)
        rest = _complete(url, [SYSTEM + f"Question number {i}?" for i in range(3)], max_tokens, stream=False)
        rest += _complete(url, [SYSTEM + "Streamed question?"], max_tokens)
        after = _wait_idle(url)
    usages = first + rest
    n = len(usages)
    assert all(u["completion_tokens"] == max_tokens for u in usages)
    for name in HISTOGRAMS:
        assert _metric(after, f"{name}_count") == n, name
    assert _metric(after, "light_moe_inter_token_latency_seconds_count") == n * (max_tokens - 1)
    ttft, e2e = (_metric(after, f"{name}_sum") for name in HISTOGRAMS[::2])
    queue = _metric(after, "light_moe_request_queue_time_seconds_sum")
    assert 0 <= queue <= ttft <= e2e
    assert 0 < _metric(after, "light_moe_time_per_output_token_seconds_sum") <= e2e
    queries = _metric(after, "light_moe_prefix_cache_queries_total")
    hits = _metric(after, "light_moe_prefix_cache_hits_total")
    assert queries == sum(u["prompt_tokens"] for u in usages)
    # the system prompt's full blocks of 8 tokens, cached by the first request, are found by the other four
    assert hits > 0 and hits % 8 == 0 and hits >= 4 * 8 * 3
    assert _metric(after, "light_moe_prefix_cache_hit_rate") == pytest.approx(hits / queries)
    assert _metric(after, "light_moe_preemptions_total") == 0
    # usage.prompt_tokens_details.cached_tokens (streamed and not): each request's share of those hits
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert cached[0] == 0 and all(c > 0 and c % 8 == 0 for c in cached[1:]) and sum(cached) == hits


def test_preemptions_are_counted_and_prefix_caching_can_be_off(ckpt):
    engine = _engine(ckpt, block_size=8, num_kv_blocks=12, enable_prefix_caching=False)
    with _running_server(engine) as url:
        usages = _complete(url, [f"Question number {i}?" for i in range(6)], 40)
        after = _wait_idle(url)
    assert all(u["completion_tokens"] == 40 for u in usages)
    assert engine.stats["preemptions"] > 0
    assert _metric(after, "light_moe_preemptions_total") == engine.stats["preemptions"]
    assert _metric(after, "light_moe_prefix_cache_queries_total") == 0
    assert _metric(after, "light_moe_prefix_cache_hits_total") == 0
    assert _metric(after, "light_moe_request_queue_time_seconds_count") == 6


def test_the_latency_histogram_writes_what_prometheus_clients_histogram_writes():
    """The router's cheap histogram (one thread, plain integers, k equal gaps in one call) against
    prometheus_client's own Histogram given the same observations one by one: identical exposition."""
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from light_moe.server.metrics import _LATENCY_BUCKETS, _LatencyHistogram

    ours = _LatencyHistogram("t_seconds", "doc", _LATENCY_BUCKETS)
    registry = CollectorRegistry()
    theirs = Histogram("t_seconds", "doc", buckets=_LATENCY_BUCKETS, registry=registry)
    rng = random.Random(0)
    values = [*_LATENCY_BUCKETS, 0.0, 1e-6, 1e3, *(rng.lognormvariate(-4, 2) for _ in range(500))]
    for v in values:
        k = rng.choice((1, 1, 3))
        ours.observe(v, k)
        for _ in range(k):
            theirs.observe(v)
    mine = CollectorRegistry()
    mine.register(ours)

    def lines(text: bytes) -> dict:
        out = {}
        for line in text.decode().splitlines():
            if line.startswith("t_seconds_") and "_created" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    expected = lines(generate_latest(registry))
    got = lines(generate_latest(mine))
    assert set(got) == set(expected) and len(got) == len(_LATENCY_BUCKETS) + 3  # buckets, +Inf, count, sum
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
