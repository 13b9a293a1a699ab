"""The metrics of one of several API processes (`serve --api-server-count N`, api_servers.py), exported so that a
scrape, which reaches one API process at random, sees the whole server.

Three kinds, by who owns the truth:

- Request counters (`light_moe_http_requests_total`, `..._requests_finished_total`, `..._prompt_tokens_total`,
  `..._generation_tokens_total`): each API process counts its own requests, so they are summed over the
  processes. prometheus_client's multiprocess mode does that: their values live in memory-mapped files in the
  directory the parent made (one file per process, PROMETHEUS_MULTIPROC_DIR; the API process's entry point turns
  the mode on before any metric exists), and MultiProcessCollector adds them up at scrape time. Written per
  request or per step, so its locked file write (~1.3 us an increment) does not matter. A process that died
  keeps its counts (its file stays), as a counter must.
- The five latency histograms (TTFT, ITL, TPOT, e2e, queue time): per request too, summed the same way, but ITL is
  written per streamed token, where prometheus_client's multiprocess Histogram costs ~3 us an observation against
  ~0.3 us for metrics._LatencyHistogram (docs/server.md, "Metrics cost"). _SharedLatencyHistogram keeps the cheap
  write: its bucket counts and sum are a fixed array of 8-byte words in a memory-mapped file of its own per
  process in the same directory (one writer, the event loop; aligned 8-byte stores are never torn), and a scrape
  adds up every process's file.
- The engine's state (batch sizes, running / waiting, KV usage, preemptions, steps, prefix-cache counters, expert
  load): the engine core sends the same stats to every API process after each step (engine_core.py), so each
  process holds the whole truth and exports its own copy, in memory; summing N copies would count it N times.

`light_moe_api_process_requests_total{api_server, pid}` (one series per API process, not summed over them) counts
the /v1 requests each process answered: how evenly the kernel spreads the connections.
"""
from __future__ import annotations

import bisect
import mmap
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from light_moe.server.metrics import (
    _BATCH_BUCKETS,
    _LATENCY_BUCKETS,
    BATCH_SIZE,
    ENGINE_VALUES,
    LATENCIES,
    MODEL_INFO,
    REQUEST_COUNTERS,
    ServerMetrics,
    _ExpertLoadCollector,
    _LatencyHistogram,
)

_WORD = 8  # bytes of each bucket count (int64) and of the sum (float64)


class _SharedLatencyHistogram(_LatencyHistogram):
    """_LatencyHistogram whose counts and sum are words of a memory-mapped file, `<name>.<pid>.hist` in the shared
    directory (counts first, then the sum); collect() adds up every process's file of this name."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], directory: str):
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)  # upper bounds, ascending; +Inf is the last count
        self.directory = Path(directory)
        size = _WORD * (len(self.bounds) + 2)
        with open(self.directory / f"{name}.{os.getpid()}.hist", "w+b") as f:  # the mapping outlives the file object
            f.truncate(size)
            self._map = mmap.mmap(f.fileno(), size)
        words = memoryview(self._map)
        self.counts = words[:-_WORD].cast("q")
        self._sum = words[-_WORD:].cast("d")

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count  # le: a value on a bound counts in it
        self._sum[0] += value * count

    def collect(self):
        buckets = len(self.bounds) + 1
        counts, total = [0] * buckets, 0.0
        for path in sorted(self.directory.glob(f"{self.name}.*.hist")):
            words = memoryview(path.read_bytes())
            if len(words) != _WORD * (buckets + 1):
                continue  # not written by this layout
            for i, c in enumerate(words[:-_WORD].cast("q")):
                counts[i] += c
            total += words[-_WORD:].cast("d")[0]
        return [self.family(counts, total)]


class _EngineValue:
    """A counter or gauge of the engine's state, in this process's memory (the core sends every API process the
    same stats: exported once, from whichever process is scraped)."""

    def __init__(self, name: str, documentation: str, counter: bool):
        self.name, self.documentation, self.counter = name, documentation, counter
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value

    def family(self):
        family = CounterMetricFamily if self.counter else GaugeMetricFamily
        return family(self.name, self.documentation, value=self.value)


class _EngineStateCollector:
    def __init__(self, values_: list[_EngineValue], model_name: str):
        self.values = values_
        self.model_name = model_name

    def collect(self):
        info = GaugeMetricFamily(*MODEL_INFO, labels=["model"])
        info.add_metric([self.model_name], 1)
        return [*(v.family() for v in self.values), info]


class SharedServerMetrics(ServerMetrics):
    """ServerMetrics (the same names, the same writers) for one of several API processes: `directory` is the
    metrics directory the parent made, api_server this process's index. The process must have turned on
    prometheus_client's multiprocess mode for `directory` first (api_servers.py does, before anything else)."""

    def __init__(self, model_name: str, directory: str, api_server: int, expert_sync_interval_s: float = 1.0):
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != directory or values.ValueClass is values.MutexValue:
            raise RuntimeError(f"prometheus_client's multiprocess mode is not on for {directory}: set "
                               "PROMETHEUS_MULTIPROC_DIR and prometheus_client.values.ValueClass first")
        # summed over the API processes: counters in prometheus_client's files, never in a registry of this
        # process (the MultiProcessCollector below reads them back from the files)
        for attr, name, documentation, labels in REQUEST_COUNTERS:
            setattr(self, attr, Counter(name, documentation, labels, registry=None))
        self._answered = Counter("light_moe_api_process_requests",
                                 "/v1 requests answered by each API process (several API processes only)",
                                 ["api_server", "pid"], registry=None).labels(api_server=str(api_server),
                                                                              pid=str(os.getpid()))
        self.registry = r = CollectorRegistry()
        MultiProcessCollector(r, path=directory)

        for attr, name, documentation in LATENCIES:
            histogram = _SharedLatencyHistogram(name, documentation, _LATENCY_BUCKETS, directory)
            r.register(histogram)
            setattr(self, attr, histogram)
        # the engine's state: this process's copy of the core's stats
        engine_values = []
        for attr, name, documentation, counter in ENGINE_VALUES:
            engine_values.append(_EngineValue(name, documentation, counter))
            setattr(self, attr, engine_values[-1])
        r.register(_EngineStateCollector(engine_values, model_name))
        self.batch_size = _LatencyHistogram(*BATCH_SIZE, _BATCH_BUCKETS)
        r.register(self.batch_size)
        self._experts = _ExpertLoadCollector()
        r.register(self._experts)
        self._init_engine_bookkeeping(expert_sync_interval_s)

    def count_http_request(self, route: str, status: str) -> None:
        super().count_http_request(route, status)
        self._answered.inc()
