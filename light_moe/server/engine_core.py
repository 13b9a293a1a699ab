"""The engine-core process of a split server: the engine (scheduler, model, sampling; it owns the GPU) with
nothing of HTTP, tokenisation or text, fed by the API process (engine_client.py) over two pipes.

    API process (engine_client.py)                       engine-core process (run_engine_core)
    EngineProcess(spec)  -- spawn ----------------->     build the engine (detokenize False) -> ("ready", info)
    ("add", id, prompt ids, SamplingParams) ------->     input thread -> commands; applied between steps
    ("abort", [ids])  ----------------------------->     engine.abort (a client left, a stop string, drain)
    ("configure", {"expert_sync_interval_s": s}) -->     how often the stats carry the expert load
    ("shutdown",) or the pipe closing  ------------->     abort everything, engine.shutdown(), exit 0
                      <------------------------------     ("accepted", [(id, error)], stats)  after commands
                      <------------------------------     ("step", [TokenDelta, ...], stats)  one per engine step
                      <------------------------------     ("dead", "Type: message")  step() raised: exit 1

One message per engine step carries every request's new token ids, finish reasons and logprobs (TokenDelta
tuples); stats is the engine's public state (engine.stats, queue_stats(), has_unfinished_requests(), and the
expert load at most every expert_sync_interval_s and when idle) for /metrics and /health. Token-level endings
(EOS, stop token ids, max_tokens, capacity) are decided here; stop strings are the API process's (it has the
text), which aborts the request here when it finds one.

The process ignores SIGINT and SIGTERM: a terminal's Ctrl-C or a supervisor's SIGTERM reaches the whole
process group, and the API process decides how its in-flight requests end (its drain), then sends "shutdown".
Should the API process die instead, the requests pipe closes and this process ends as if told to.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineCoreSpec:
    """What the engine-core process is started from (pickled to it: spawn). engine_args: an EngineArgs
    (engine/args.py), or a dict of LightMoEEngine's keywords with "model". build: a module-level callable
    engine_args -> LightMoEEngine (None: build_engine; tests and scripts/serve_overhead.py pass their own)."""

    engine_args: object
    build: Callable | None = None
    log_level: int = logging.WARNING


def run_engine_core(spec: EngineCoreSpec, requests: Connection, outputs: Connection) -> None:
    """The process's target: build the engine, report, serve commands until shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s [engine core]: %(message)s")
    inbox = _Inbox(requests)
    try:
        engine = _build(spec)
    except BaseException as exc:  # the API process raises it again: a traceback here only for the unexpected
        if not isinstance(exc, ValueError | TypeError | FileNotFoundError):
            logger.exception("the engine could not be built")
        _send(outputs, ("failed", type(exc).__name__, str(exc)))
        raise SystemExit(1) from None
    try:
        _send(outputs, ("ready", {"max_model_len": engine.max_model_len, "model_name": engine.model_name,
                                  "device": str(engine.config.device), "pid": os.getpid()}))
        code = EngineCore(engine, inbox, outputs).run()
    finally:
        engine.shutdown()
    raise SystemExit(code)


def build_engine(engine_args):
    """A LightMoEEngine from an EngineArgs, or from a dict of LightMoEEngine's keywords with "model"."""
    from light_moe.engine.engine import LightMoEEngine

    if isinstance(engine_args, dict):
        options = dict(engine_args)
        return LightMoEEngine(options.pop("model"), **options)
    return LightMoEEngine.from_engine_args(engine_args)


def _build(spec: EngineCoreSpec):
    engine = (spec.build or build_engine)(spec.engine_args)
    engine.detokenize = False
    return engine


def _send(conn: Connection, message) -> bool:
    try:
        conn.send(message)
        return True
    except (BrokenPipeError, ConnectionResetError, OSError):  # the API process is gone
        return False


class _Inbox:
    """The requests pipe, read by a thread of its own so that the API process never waits on a busy step to
    hand over a request; the engine loop takes what arrived between steps, or sleeps here while idle."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._cv = threading.Condition()
        self._messages: deque = deque()
        self.closed = False
        threading.Thread(target=self._read, name="light-moe-core-inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the API process closed the pipe or died
                message = ("shutdown",)
            with self._cv:
                self._messages.append(message)
                self._cv.notify()
            if message[0] == "shutdown":
                self.closed = True
                return

    def take(self, wait: bool) -> list:
        with self._cv:
            while wait and not self._messages:
                self._cv.wait()
            messages = list(self._messages)
            self._messages.clear()
        return messages


class EngineCore:
    def __init__(self, engine, inbox: _Inbox, outputs: Connection):
        self.engine = engine
        self.inbox = inbox
        self.outputs = outputs
        self.expert_sync_interval_s = 1.0  # the API process's ("configure", ...) sets its metrics' interval
        self._live: set[str] = set()  # request ids the engine still holds
        self._expert_synced_at = 0.0

    def run(self) -> int:
        """Serve until "shutdown" (0) or a failed step (1)."""
        engine = self.engine
        while True:
            accepted, stop = [], False
            messages = self.inbox.take(wait=not engine.has_unfinished_requests())
            for message in messages:
                kind = message[0]
                if kind == "add":
                    accepted.append(self._add(*message[1:]))
                elif kind == "abort":
                    for request_id in message[1]:
                        if request_id in self._live:
                            self._live.discard(request_id)
                            engine.abort(request_id)
                elif kind == "configure":
                    self.expert_sync_interval_s = message[1]["expert_sync_interval_s"]
                elif kind == "shutdown":
                    stop = True
            if stop:
                for request_id in self._live:  # the API process ends its streams itself ("abort")
                    engine.abort(request_id)
                return 0
            # after any command, as the in-process loop publishes: an abort frees KV blocks the metrics show
            if messages and not _send(self.outputs, ("accepted", accepted, self._stats())):
                return 0
            if not engine.has_unfinished_requests():
                continue
            try:
                deltas = engine.step()
            except BaseException as exc:  # the engine is in an unknown state: every request fails
                logger.exception("an engine step failed; the engine core stops")
                _send(self.outputs, ("dead", f"{type(exc).__name__}: {exc}"))
                return 1
            for delta in deltas:
                if delta.finish_reason is not None:
                    self._live.discard(delta.request_id)
            if not _send(self.outputs, ("step", deltas, self._stats())):
                return 0

    def _add(self, request_id: str, prompt_token_ids: list[int], params) -> tuple[str, tuple | None]:
        """(id, None), or (id, (error type, message)): ValueError / TypeError are the request's fault (400)."""
        try:
            self.engine.add_request(prompt_token_ids, params, request_id)
        except Exception as exc:
            if not isinstance(exc, ValueError | TypeError):
                logger.exception("add_request failed for %s", request_id)
                self.engine.abort(request_id)  # it may have reached the scheduler before failing
            return request_id, (type(exc).__name__, str(exc), isinstance(exc, ValueError | TypeError))
        self._live.add(request_id)
        return request_id, None

    def _stats(self) -> dict:
        """The engine's public state, as ServerMetrics.observe_step reads it from an in-process engine."""
        engine = self.engine
        stats = {key: engine.stats[key] for key in ("steps", "last_batch_size", "max_batch_size", "preemptions")}
        stats["queue"] = engine.queue_stats()
        stats["unfinished"] = unfinished = engine.has_unfinished_requests()
        now = time.monotonic()
        if not unfinished or now - self._expert_synced_at >= self.expert_sync_interval_s:
            stats["expert_load"] = engine.expert_load_stats()
            stats["expert_rank_balance"] = engine.expert_rank_balance()
            self._expert_synced_at = now
        return stats
