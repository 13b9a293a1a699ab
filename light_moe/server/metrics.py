"""Prometheus metrics of one server, in a registry of its own (never the process-global one,
so two apps in one process, as in the tests, do not collide).

Who writes what: the HTTP layer counts requests by route and status; the engine thread
(engine_loop.py) records tokens, latencies, finished requests and, after every step,
observe_step() reads the scheduler, the KV cache and the experts' load. Only the engine
thread may touch the engine, so scrapes never do: they read the last published snapshot.

Expert load: engine.runner.expert_load() holds device tensors of the last step. Each step
adds them into a running total on the device (no host sync); the totals are copied to the
host at most every `expert_sync_interval_s` and whenever the engine goes idle, so a GPU
server pays one small device-to-host copy per interval, not one per step.
"""
from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _ExpertLoadCollector:
    """Yields the expert-load snapshot at scrape time (custom collector: labels come from the model)."""

    def __init__(self) -> None:
        self.last_step: list[list[int]] = []  # [L][E] tokens per expert in the last step
        self.total: list[list[int]] = []  # [L][E] tokens per expert since start

    def collect(self):
        last = GaugeMetricFamily("light_moe_expert_tokens",
                                 "Tokens routed to each expert in the last engine step, per MoE layer",
                                 labels=["layer", "expert"])
        total = CounterMetricFamily("light_moe_expert_tokens_routed",
                                    "Tokens routed to each expert since start, per MoE layer",
                                    labels=["layer", "expert"])
        for layer, counts in enumerate(self.last_step):
            for expert, count in enumerate(counts):
                last.add_metric([str(layer), str(expert)], count)
        for layer, counts in enumerate(self.total):
            for expert, count in enumerate(counts):
                total.add_metric([str(layer), str(expert)], count)
        return [last, total]


class ServerMetrics:
    def __init__(self, model_name: str, expert_sync_interval_s: float = 1.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("light_moe_http_requests", "HTTP requests to the API by route and status",
                                     ["route", "status"], registry=r)
        self.finished = Counter("light_moe_requests_finished", "Generation requests finished, by reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("light_moe_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("light_moe_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("light_moe_time_to_first_token_seconds",
                              "From arrival at the server to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("light_moe_inter_token_latency_seconds", "Between consecutive generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("light_moe_e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("light_moe_batch_size", "Requests computed together in one engine step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.max_batch_size = Gauge("light_moe_max_batch_size", "Largest batch of one engine step so far",
                                    registry=r)
        self.running = Gauge("light_moe_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("light_moe_num_requests_waiting",
                             "Requests accepted but not running (submitted or in the scheduler's queue)",
                             registry=r)
        self.kv_usage = Gauge("light_moe_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)",
                              registry=r)
        self.preemptions = Counter("light_moe_preemptions", "Requests preempted for lack of KV blocks", registry=r)
        self.engine_steps = Counter("light_moe_engine_steps", "Engine steps that ran the model", registry=r)
        info = Gauge("light_moe_model_info", "The served model", ["model"], registry=r)
        info.labels(model=model_name).set(1)
        self._experts = _ExpertLoadCollector()
        r.register(self._experts)
        self._expert_sync_interval_s = expert_sync_interval_s
        self._expert_last: torch.Tensor | None = None  # [L, E] on the engine's device
        self._expert_total: torch.Tensor | None = None  # [L, E] int64 on the engine's device
        self._expert_synced_at = 0.0
        self._steps_seen = 0
        self._preemptions_seen = 0

    # ---- engine thread only --------------------------------------------------------------------
    def observe_step(self, engine, num_queued: int) -> None:
        """After engine.step() (or after applying submissions/aborts): batch, queue and cache state."""
        stats = engine.stats
        if stats["steps"] != self._steps_seen:
            self._steps_seen = stats["steps"]
            self.engine_steps.inc()
            self.batch_size.observe(stats["last_batch_size"])
            self.max_batch_size.set(stats["max_batch_size"])
            loads = engine.runner.expert_load()
            if loads:
                step_load = torch.stack(loads)  # [L, E]
                self._expert_last = step_load
                if self._expert_total is None:
                    self._expert_total = torch.zeros(step_load.shape, dtype=torch.int64, device=step_load.device)
                self._expert_total += step_load
        if stats["preemptions"] != self._preemptions_seen:
            self.preemptions.inc(stats["preemptions"] - self._preemptions_seen)
            self._preemptions_seen = stats["preemptions"]
        self.running.set(engine.scheduler.num_running)
        self.waiting.set(num_queued)
        self.kv_usage.set(engine.block_manager.usage)
        idle = not engine.has_unfinished_requests()
        now = time.monotonic()
        if idle or now - self._expert_synced_at >= self._expert_sync_interval_s:
            self.sync_expert_load(now)

    def sync_expert_load(self, now: float) -> None:
        if self._expert_total is None:
            return
        self._experts.last_step = self._expert_last.tolist()
        self._experts.total = self._expert_total.tolist()
        self._expert_synced_at = now
