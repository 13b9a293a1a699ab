"""The engine-core process of a split server: the engine (scheduler, model, sampling; it owns the GPU) with
nothing of HTTP, tokenisation or text, fed by the API process (engine_client.py) over two pipes, or by several
API processes (`serve --api-server-count N`, api_servers.py) over a pair of pipes each.

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

Several clients (API processes): each has its own pair of pipes and the protocol above, per client. A client's
request ids are its own: the engine holds them as "<client>:<id>" (so two clients may use the same id), and each
step's deltas are split by owner, every client getting its own deltas under its own ids (never another's) with
the step's stats (every client's /metrics and /health read the engine's state). "shutdown" from a client, or its
pipe closing (the process died), aborts that client's requests (their KV blocks are freed) and drops it; the
others are served on; the process ends once no client is left. With one client the ids go to the engine as they
are, and everything is as described above.
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
    """The process's target with one API process: build the engine, report, serve commands until shutdown."""
    run_engine_core_for_clients(spec, [(requests, outputs)])


def run_engine_core_for_clients(spec: EngineCoreSpec, clients: list[tuple[Connection, Connection]]) -> None:
    """The process's target: build the engine, report to every client ((requests, outputs) pipes each), serve
    their commands until none is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s [engine core]: %(message)s")
    inbox = _Inbox([requests for requests, _ in clients])
    outputs = [conn for _, conn in clients]
    try:
        engine = _build(spec)
    except BaseException as exc:  # the API process raises it again: a traceback here only for the unexpected
        if not isinstance(exc, ValueError | TypeError | FileNotFoundError):
            logger.exception("the engine could not be built")
        for conn in outputs:
            _send(conn, ("failed", type(exc).__name__, str(exc)))
        raise SystemExit(1) from None
    try:
        info = {"max_model_len": engine.max_model_len, "model_name": engine.model_name,
                "device": str(engine.config.device), "pid": os.getpid()}
        for conn in outputs:
            _send(conn, ("ready", info))
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
    """The clients' requests pipes, each read by a thread of its own so that an API process never waits on a busy
    step to hand over a request; the engine loop takes what arrived between steps, as (client, message) pairs in
    arrival order, or sleeps here while idle. A pipe that closes (its API process is gone) reads as "shutdown"."""

    def __init__(self, conns: list[Connection]):
        self._cv = threading.Condition()
        self._messages: deque = deque()
        for client, conn in enumerate(conns):
            threading.Thread(target=self._read, args=(client, conn), name=f"light-moe-core-inbox-{client}",
                             daemon=True).start()

    def _read(self, client: int, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the API process closed the pipe or died
                message = ("shutdown",)
            with self._cv:
                self._messages.append((client, message))
                self._cv.notify()
            if message[0] == "shutdown":
                return

    def take(self, wait: bool) -> list:
        with self._cv:
            while wait and not self._messages:
                self._cv.wait()
            messages = list(self._messages)
            self._messages.clear()
        return messages


class EngineCore:
    def __init__(self, engine, inbox: _Inbox, outputs: list[Connection]):
        self.engine = engine
        self.inbox = inbox
        self.outputs: dict[int, Connection] = dict(enumerate(outputs))  # the clients still here
        self.expert_sync_interval_s = 1.0  # the API process's ("configure", ...) sets its metrics' interval
        # the engine's id of a client's request: its own with one client, "<client>:<id>" with several
        self._namespaced = len(outputs) > 1
        self._live: dict[str, tuple[int, str]] = {}  # engine id -> (client, the client's id), still in the engine
        self._expert_synced_at = 0.0

    def run(self) -> int:
        """Serve until every client has left (0) or a step failed (1)."""
        engine = self.engine
        while True:
            accepted: dict[int, list] = {}
            messages = self.inbox.take(wait=not engine.has_unfinished_requests())
            for client, message in messages:
                if client not in self.outputs:
                    continue  # sent before it left
                kind = message[0]
                if kind == "add":
                    accepted.setdefault(client, []).append(self._add(client, *message[1:]))
                elif kind == "abort":
                    for request_id in message[1]:
                        key = self._key(client, request_id)
                        if key in self._live:
                            del self._live[key]
                            engine.abort(key)
                elif kind == "configure":
                    self.expert_sync_interval_s = message[1]["expert_sync_interval_s"]
                elif kind == "shutdown":
                    self._leave(client)  # the API process ends its streams itself ("abort")
            if not self.outputs:
                return 0
            # after any command, as the in-process loop publishes: an abort frees KV blocks the metrics show (to
            # every client: each one's /metrics reads the engine's state)
            if messages:
                stats = self._stats()
                for client in list(self.outputs):
                    self._send_to(client, ("accepted", accepted.get(client, []), stats))
                if not self.outputs:
                    return 0
            if not engine.has_unfinished_requests():
                continue
            try:
                deltas = engine.step()
            except BaseException as exc:  # the engine is in an unknown state: every request fails
                logger.exception("an engine step failed; the engine core stops")
                for conn in self.outputs.values():
                    _send(conn, ("dead", f"{type(exc).__name__}: {exc}"))
                return 1
            stats = self._stats()
            for client, client_deltas in self._route(deltas).items():
                self._send_to(client, ("step", client_deltas, stats))
            if not self.outputs:
                return 0

    def _key(self, client: int, request_id: str) -> str:
        return f"{client}:{request_id}" if self._namespaced else request_id

    def _route(self, deltas: list) -> dict[int, list]:
        """Each client's deltas of a step, under its own ids (every client gets a message, with no deltas too:
        the stats travel with it)."""
        routed: dict[int, list] = {client: [] for client in self.outputs}
        for delta in deltas:
            owner = self._live.get(delta.request_id)
            if owner is None:
                continue  # its client left: aborted
            if delta.finish_reason is not None:
                del self._live[delta.request_id]
            client, request_id = owner
            if client in routed:
                routed[client].append(delta._replace(request_id=request_id) if self._namespaced else delta)
        return routed

    def _send_to(self, client: int, message) -> None:
        if not _send(self.outputs[client], message):
            self._leave(client)  # its API process is gone

    def _leave(self, client: int) -> None:
        """A client left (said so, or its pipes closed): abort its requests, which frees their KV blocks."""
        if self.outputs.pop(client, None) is None:
            return
        mine = [key for key, (owner, _) in self._live.items() if owner == client]
        for key in mine:
            del self._live[key]
            self.engine.abort(key)
        if self._namespaced:
            logger.info("API process %d left; %d of its requests aborted, %d API process(es) remain", client,
                        len(mine), len(self.outputs))

    def _add(self, client: int, request_id: str, prompt_token_ids: list[int], params) -> tuple[str, tuple | None]:
        """(id, None), or (id, (error type, message)): ValueError / TypeError are the request's fault (400)."""
        key = self._key(client, request_id)
        try:
            self.engine.add_request(prompt_token_ids, params, key)
        except Exception as exc:
            if not isinstance(exc, ValueError | TypeError):
                logger.exception("add_request failed for %s", key)
                self.engine.abort(key)  # it may have reached the scheduler before failing
            return request_id, (type(exc).__name__, str(exc), isinstance(exc, ValueError | TypeError))
        self._live[key] = (client, request_id)
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
