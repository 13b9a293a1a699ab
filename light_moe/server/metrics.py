"""Prometheus metrics of one server, in a registry of its own (never the process-global one,
so two apps in one process, as in the tests, do not collide).

Who writes what: the HTTP layer counts requests by route and status; the engine thread
(engine_loop.py) records tokens, latencies, finished requests and, after every step,
observe_step() reads the scheduler, the KV cache (usage, prefix-cache lookups) and the experts'
load. Only the engine thread may touch the engine, so scrapes never do: they read the last
published snapshot.

Per-request latencies, all from the request's arrival at the server (time.monotonic()) and
observed on the engine thread when its outputs are handed over (what a client sees, minus the
transport): queue time (arrival to first scheduled, kv_cache/scheduler stamp it), TTFT (arrival to
the first token), ITL (between tokens; a step that yields k tokens of one request gives k gaps of
1/k of its interval), TPOT ((last token - first token) / (tokens - 1), once per finished request with
at least two tokens) and e2e (arrival to the last output). The prefix-cache counters are in tokens
(looked up on admission, found cached); their ratio is the hit rate, also published as a gauge.

Expert load comes from the engine's own window (engine.expert_load_stats(): tokens per expert
over the last expert_load_window steps, summed over expert-parallel ranks, refreshed on the host
every few steps without a per-step sync); it is copied into the metrics at most every
`expert_sync_interval_s` and whenever the engine goes idle.
"""
from __future__ import annotations

import bisect
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# The exported metrics, one table for both exporters (ServerMetrics here, SharedServerMetrics in metrics_shared.py
# for several API processes), so their names and help texts cannot drift apart: (attribute, name, help, labels).
REQUEST_COUNTERS = (
    ("http_requests", "light_moe_http_requests", "HTTP requests to the API by route and status", ("route", "status")),
    ("finished", "light_moe_requests_finished", "Generation requests finished, by reason", ("finish_reason",)),
    ("prompt_tokens", "light_moe_prompt_tokens", "Prompt tokens of accepted requests", ()),
    ("generation_tokens", "light_moe_generation_tokens", "Generated tokens", ()),
)
# per-request latencies (attribute, name, help): observed per token or per request, the cheap kind
LATENCIES = (
    ("ttft", "light_moe_time_to_first_token_seconds", "From arrival at the server to the first generated token"),
    ("itl", "light_moe_inter_token_latency_seconds", "Between consecutive generated tokens"),
    ("e2e", "light_moe_e2e_request_latency_seconds", "From arrival to the last token"),
    ("tpot", "light_moe_time_per_output_token_seconds",
     "Per finished request: (last token - first token) / (generated tokens - 1)"),
    ("queue_time", "light_moe_request_queue_time_seconds", "From arrival to the request's first scheduled step"),
)
# the engine's state (attribute, name, help, a counter rather than a gauge)
ENGINE_VALUES = (
    ("prefix_queries", "light_moe_prefix_cache_queries", "Prompt tokens looked up in the prefix cache on admission",
     True),
    ("prefix_hits", "light_moe_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache", True),
    ("prefix_hit_rate", "light_moe_prefix_cache_hit_rate",
     "Prefix-cache hits over queries since the start (tokens; 0 before any)", False),
    ("max_batch_size", "light_moe_max_batch_size", "Largest batch of one engine step so far", False),
    ("running", "light_moe_num_requests_running", "Requests in the running batch", False),
    ("waiting", "light_moe_num_requests_waiting",
     "Requests accepted but not running (submitted or in the scheduler's queue)", False),
    ("kv_usage", "light_moe_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)", False),
    ("preemptions", "light_moe_preemptions", "Requests preempted for lack of KV blocks", True),
    ("engine_steps", "light_moe_engine_steps", "Engine steps that ran the model", True),
)
BATCH_SIZE = ("light_moe_batch_size", "Requests computed together in one engine step")
MODEL_INFO = ("light_moe_model_info", "The served model")


class _ExpertLoadCollector:
    """Yields the expert-load snapshot at scrape time (custom collector: labels come from the model)."""

    def __init__(self) -> None:
        self.window: list[list[float]] = []  # [L][E] tokens per expert over the engine's load window
        self.rank_balance: list[float] = []  # [L] busiest rank's rows over the mean rank's

    def collect(self):
        tokens = GaugeMetricFamily(
            "light_moe_expert_tokens",
            "Tokens routed to each expert over the engine's load window (last expert_load_window steps, all "
            "ranks); layer counts MoE layers only", labels=["layer", "expert"])
        for layer, counts in enumerate(self.window):
            for expert, count in enumerate(counts):
                tokens.add_metric([str(layer), str(expert)], count)
        balance = GaugeMetricFamily("light_moe_expert_rank_imbalance",
                                    "Per MoE layer: the busiest rank's expert rows over the mean rank's (1 = even)",
                                    labels=["layer"])
        for layer, ratio in enumerate(self.rank_balance):
            balance.add_metric([str(layer)], ratio)
        return [tokens, balance]


class _LatencyHistogram:
    """A histogram written by one thread with plain integers, read at scrape time (a custom collector).

    prometheus_client's Histogram takes a lock and walks its buckets in Python on every observe: per streamed
    token (ITL) that was the largest part of the router's metrics cost in the API process (docs/server.md,
    "Metrics cost"). Here an observation is a bisect and two additions, and k tokens sharing one gap are one
    call. A scrape from another thread reads the counts while they may grow: the cumulative buckets and the
    count come from one copy of the list, so they stay consistent with each other (the sum may be one
    observation ahead)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)  # upper bounds, ascending; +Inf is the last count
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count  # le: a value on a bound counts in it
        self.sum += value * count

    def collect(self):
        return [self.family(list(self.counts), self.sum)]

    def family(self, counts: list[int], total: float) -> HistogramMetricFamily:
        """The exposition of per-bucket counts (not cumulative; +Inf last) and their sum."""
        cumulative, running = [], 0
        for bound, c in zip([*self.bounds, math.inf], counts):
            running += c
            cumulative.append((floatToGoString(bound), running))  # the le labels prometheus_client's Histogram writes
        return HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=total)


class ServerMetrics:
    def __init__(self, model_name: str, expert_sync_interval_s: float = 1.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for attr, name, documentation, labels in REQUEST_COUNTERS:
            setattr(self, attr, Counter(name, documentation, labels, registry=r))
        for attr, name, documentation in LATENCIES:
            setattr(self, attr, self._latency(name, documentation))
        for attr, name, documentation, counter in ENGINE_VALUES:
            setattr(self, attr, (Counter if counter else Gauge)(name, documentation, registry=r))
        self.batch_size = Histogram(*BATCH_SIZE, buckets=_BATCH_BUCKETS, registry=r)
        info = Gauge(*MODEL_INFO, ["model"], registry=r)
        info.labels(model=model_name).set(1)
        self._experts = _ExpertLoadCollector()
        r.register(self._experts)
        self._init_engine_bookkeeping(expert_sync_interval_s)

    def _init_engine_bookkeeping(self, expert_sync_interval_s: float) -> None:
        """What observe_step compares the engine's stats with, to turn its totals into increments."""
        self._expert_sync_interval_s = expert_sync_interval_s
        self._expert_synced_at = 0.0
        self._steps_seen = 0
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)  # (queries, hits)

    def _latency(self, name: str, documentation: str) -> _LatencyHistogram:
        histogram = _LatencyHistogram(name, documentation, _LATENCY_BUCKETS)
        self.registry.register(histogram)
        return histogram

    def count_http_request(self, route: str, status: str) -> None:
        """One /v1 request answered (the HTTP layer's middleware)."""
        self.http_requests.labels(route=route, status=status).inc()

    # ---- engine thread only --------------------------------------------------------------------
    def observe_step(self, engine, num_queued: int) -> None:
        """After engine.step() (or after applying submissions/aborts): batch, queue and cache state."""
        stats = engine.stats
        if stats["steps"] != self._steps_seen:
            self._steps_seen = stats["steps"]
            self.engine_steps.inc()
            self.batch_size.observe(stats["last_batch_size"])
            self.max_batch_size.set(stats["max_batch_size"])
        if stats["preemptions"] != self._preemptions_seen:
            self.preemptions.inc(stats["preemptions"] - self._preemptions_seen)
            self._preemptions_seen = stats["preemptions"]
        queue = engine.queue_stats()
        self.running.set(queue["num_running"])
        self.waiting.set(num_queued)
        self.kv_usage.set(queue["kv_usage"])
        queries, hits = queue["prefix_cache_queries"], queue["prefix_cache_hits"]
        if (queries, hits) != self._prefix_seen:
            self.prefix_queries.inc(queries - self._prefix_seen[0])
            self.prefix_hits.inc(hits - self._prefix_seen[1])
            self._prefix_seen = (queries, hits)
            self.prefix_hit_rate.set(hits / queries)
        idle = not engine.has_unfinished_requests()
        now = time.monotonic()
        if idle or now - self._expert_synced_at >= self._expert_sync_interval_s:
            self.sync_expert_load(engine, now)

    def sync_expert_load(self, engine, now: float) -> None:
        self._experts.window = engine.expert_load_stats()
        self._experts.rank_balance = engine.expert_rank_balance()
        self._expert_synced_at = now
