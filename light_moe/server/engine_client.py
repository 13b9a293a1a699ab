"""The API process's side of a split server: the engine runs in an engine-core process (engine_core.py), and
this process keeps HTTP, chat templates, tokenisation, detokenisation, stop strings and SSE, so that Python work
on either side never stalls the other (one GIL each).

    EngineProcess(engine_args)       starts the engine-core process (spawn), waits until its engine is built;
                                     what the handlers read of an engine: tokenizer, model_config, max_model_len,
                                     model_name, validate(); shutdown() stops the process
    EngineProcessLoop(process, ...)  the server's engine loop for it (EngineLoop's interface: start, submit,
                                     abort, drain, shutdown, alive), all on the event loop's thread:

    submit  -> ("add", id, prompt ids, params) ------------------> engine core
               await accepted  <-- ("accepted", [(id, error)], stats)   (400 / 503 as in-process)
    reader on the outputs pipe (loop.add_reader, no thread hop) <-- ("step", [TokenDelta, ...], stats):
               FrontendState per request: text, stop strings (found one: ("abort", [id]) to the core) ->
               RequestOutputs -> StreamRouter (metrics) -> each handler's queue
    drain / shutdown: streams end with "abort" here; ("shutdown",) there; the process is joined, killed if it
               does not end
    the core gone (its step raised: "dead"; or the process died: EOF) -> EngineDeadError for every stream, 503s

/metrics reads the engine's state from the stats of the core's last message (EngineStats: the same public
calls ServerMetrics makes on an in-process engine).

EngineCoreClient is what the loop and the handlers use of either: EngineProcess, which starts the core itself, or,
under `serve --api-server-count N`, an API process's connection to the core its parent started
(api_servers.py).
"""
from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from light_moe.engine.devices import resolve_device
from light_moe.engine.engine import LightMoEEngine
from light_moe.engine.request_state import FrontendState
from light_moe.engine.tokenizer import Tokenizer
from light_moe.models.loader import load_model_config
from light_moe.parallel.groups import torchrun_launch
from light_moe.sampling_params import SamplingParams
from light_moe.server.engine_core import EngineCoreSpec, build_engine, run_engine_core
from light_moe.server.engine_loop import EngineDeadError, QueueFullError, RequestStream, StreamRouter, deliver
from light_moe.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def start_engine(engine_args, engine_process: bool | None = None, *, log_level: int = logging.WARNING):
    """The engine `light-moe serve` serves: an EngineProcess (the engine in an engine-core process) or a
    LightMoEEngine in this process. engine_process None: the default, the engine-core process on CUDA devices
    (where the GPU must never wait for this process's Python) and this process on the CPU (where the model step
    dwarfs the API's work); never under torchrun, whose every rank must construct the engine itself."""
    launched = torchrun_launch()
    under_torchrun = launched is not None and launched.world_size > 1
    if engine_process is None:
        engine_process = resolve_device(_option(engine_args, "device")).type == "cuda" and not under_torchrun
    elif engine_process and under_torchrun:
        raise ValueError("an engine-core process is not supported under torchrun (each rank constructs the engine "
                         "in its own process): serve with --no-engine-process")
    if engine_process:
        engine = EngineProcess(engine_args, log_level=log_level)
        logger.info("the engine runs in an engine-core process (pid %d, %s)", engine.process.pid, engine.device)
        return engine
    logger.info("the engine runs in the server's process")
    return build_engine(engine_args)


def _option(engine_args, name: str):
    if isinstance(engine_args, dict):
        return engine_args.get(name, "auto")
    return getattr(engine_args, name)


class EngineCoreClient:
    """An API process's end of the engine-core process: its pair of pipes, and what the handlers read of an engine
    (tokenizer, model_config, max_model_len, model_name, device, validate()). Subclasses set them up with the
    helpers below and say whether the core still runs."""

    # The engine's own request checks, which read only tokenizer, model_config and max_model_len: the API
    # process answers 400s with the engine's words without asking the core.
    _tokenize = LightMoEEngine._tokenize
    validate = LightMoEEngine.validate

    def _attach(self, requests: Connection, outputs: Connection) -> None:
        """This end of the core's pipes: commands go out on requests, the core's messages come in on outputs."""
        self._requests, self._outputs = requests, outputs
        self._send_lock = threading.Lock()
        self._stopped = False

    def _load_model_side(self, model: str | Path) -> None:
        """What the handlers need of the checkpoint that the core does not send: the tokenizer and the config."""
        self.tokenizer = Tokenizer(Path(model))
        _, self.model_config = load_model_config(Path(model))

    def _take_info(self, info: dict) -> None:
        """The core's "ready" info (engine_core.py)."""
        self.max_model_len = info["max_model_len"]
        self.model_name = info["model_name"]
        self.device = info["device"]

    def _stop_sending(self) -> None:
        """Say "shutdown" (the core aborts what it holds of ours) and close the requests pipe; idempotent."""
        self.send(("shutdown",))
        with self._send_lock:
            self._stopped = True
            self._requests.close()

    def send(self, message) -> bool:
        """Send a command to the core (any thread); False once the core is gone."""
        with self._send_lock:
            if self._stopped:
                return False
            try:
                self._requests.send(message)
                return True
            except (BrokenPipeError, ConnectionResetError, OSError):
                return False

    @property
    def outputs(self):
        return self._outputs

    def core_alive(self) -> bool:
        raise NotImplementedError

    def core_gone_reason(self) -> str:
        """Why the outputs pipe closed (the core exited), for the 503s."""
        raise NotImplementedError


class EngineProcess(EngineCoreClient):
    """The engine in an engine-core process of its own, as the API process sees it. engine_args: an EngineArgs
    (or a dict of LightMoEEngine's keywords with "model"); build: a module-level callable engine_args ->
    LightMoEEngine, run in the child (default: engine_core.build_engine)."""

    def __init__(self, engine_args, *, build=None, startup_timeout_s: float | None = None,
                 log_level: int = logging.WARNING):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be initialised again in a forked child
        core_requests, requests = ctx.Pipe(duplex=False)
        outputs, core_outputs = ctx.Pipe(duplex=False)
        self._attach(requests, outputs)
        spec = EngineCoreSpec(engine_args, build, log_level=log_level)
        # not daemonic: the core spawns expert-parallel workers of its own; shutdown() (and the core's watch of
        # the requests pipe, should this process die) end it
        self.process = ctx.Process(target=run_engine_core, args=(spec, core_requests, core_outputs),
                                   name="light-moe-engine-core")
        self.process.start()
        core_requests.close()
        core_outputs.close()
        try:
            self._load_model_side(_option(engine_args, "model"))  # while the core loads the weights
            info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown(timeout=5.0)
            raise
        self._take_info(info)

    def _wait_ready(self, timeout_s: float | None) -> dict:
        return wait_until_ready(self.process, self._outputs, timeout_s)

    def core_alive(self) -> bool:
        return self.process.is_alive()

    def core_gone_reason(self) -> str:
        self.process.join(1.0)
        return f"the engine-core process exited (code {self.process.exitcode})"

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the engine-core process (it frees the device and stops its expert-parallel workers, which can
        take a while): asked, then, after `timeout` seconds, killed with its own child processes. Idempotent;
        blocking."""
        self._stop_sending()
        if self.process.pid is None:
            return
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            try:  # whatever it still sends: it must never block on a full pipe instead of exiting
                if self._outputs.poll(0.05):
                    self._outputs.recv()
            except (EOFError, OSError):
                self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            logger.warning("the engine-core process did not stop within %.1f s: killing it", timeout)
            kill_with_children(self.process.pid)
        self.process.join(5.0)


def wait_until_ready(process, outputs, timeout_s: float | None) -> dict:
    """The core's "ready" info from its outputs pipe, or the engine's own error (e.g. a ValueError about an
    option) raised here; the process exiting first or the timeout passing raise too."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not outputs.poll(0.1):
        if not process.is_alive():
            raise RuntimeError(f"the engine-core process exited with code {process.exitcode} while "
                               "building the engine")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the engine-core process did not build the engine within {timeout_s} s")
    kind, *rest = outputs.recv()
    if kind == "failed":  # the engine's own exception, e.g. a ValueError about an option
        name, message = rest
        error = getattr(builtins, name, None)
        if isinstance(error, type) and issubclass(error, Exception):
            raise error(message)
        raise RuntimeError(f"{name}: {message}")
    return rest[0]


def kill_with_children(pid: int) -> None:
    """SIGKILL a process and the processes it started (the core ignores SIGTERM, engine_core.py)."""
    for target in (*_child_pids(pid), pid):  # expert-parallel workers first
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def _child_pids(pid: int) -> list[int]:
    """The processes `pid` started (Linux /proc; none where it is missing)."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except OSError:
        return []


class EngineStats:
    """The engine's public state as the core last reported it, read as ServerMetrics.observe_step reads an
    in-process engine: stats, queue_stats(), has_unfinished_requests(), expert_load_stats(),
    expert_rank_balance()."""

    def __init__(self) -> None:
        self.stats = {"steps": 0, "last_batch_size": 0, "max_batch_size": 0, "preemptions": 0}
        self._queue = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "prefix_cache_queries": 0,
                       "prefix_cache_hits": 0}
        self._unfinished = False
        self._expert_load: list[list[float]] = []
        self._rank_balance: list[float] = []

    def update(self, stats: dict) -> None:
        self.stats = {k: stats[k] for k in ("steps", "last_batch_size", "max_batch_size", "preemptions")}
        self._queue = stats["queue"]
        self._unfinished = stats["unfinished"]
        if "expert_load" in stats:
            self._expert_load = stats["expert_load"]
            self._rank_balance = stats["expert_rank_balance"]

    def queue_stats(self) -> dict:
        return self._queue

    def has_unfinished_requests(self) -> bool:
        return self._unfinished

    def expert_load_stats(self) -> list[list[float]]:
        return self._expert_load

    def expert_rank_balance(self) -> list[float]:
        return self._rank_balance


class EngineProcessLoop:
    """EngineLoop's interface over an EngineCoreClient (an EngineProcess, or api_servers.py's); everything but
    abort() / drain() / shutdown() runs on the event loop's thread (those hop there)."""

    MAX_MESSAGES_PER_READ = 8  # engine steps read before the handlers run (_on_readable)

    def __init__(self, engine: EngineCoreClient, metrics: ServerMetrics, max_waiting: int | None = None,
                 expert_sync_interval_s: float = 1.0):
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None (no limit), got {max_waiting}")
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.expert_sync_interval_s = expert_sync_interval_s
        self.stats = EngineStats()
        self._router = StreamRouter(metrics)
        self._pending: dict[str, tuple[RequestStream, int]] = {}  # sent, not yet accepted by the core
        self._abort_on_accept: set[str] = set()
        self._error: BaseException | None = None
        self._stopping = False
        self._drain_deadline: float | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._reading = False

    # ---- any thread ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return (self._loop is not None and self._error is None and not self._stopping
                and self._drain_deadline is None and self.engine.core_alive())

    def abort(self, request_id: str) -> None:
        self._on_loop(self._abort, request_id)

    def drain(self, timeout: float) -> None:
        """Refuse new requests from now on (503); abort those still running `timeout` seconds later."""
        deadline = time.monotonic() + max(timeout, 0.0)
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline
            self._on_loop(self._arm_drain, deadline)

    def shutdown(self, timeout: float = 10.0) -> None:
        """End every stream with "abort" (the core aborts them too) and stop reading the core's outputs. The
        process runs on until EngineProcess.shutdown() (serve's, or the caller's who made it)."""
        self._stopping = True
        done = threading.Event()

        def stop():
            self._abort_all()
            if self._reading:
                self._loop.remove_reader(self.engine.outputs.fileno())
                self._reading = False
            done.set()

        self._on_loop(stop)
        if not done.wait(timeout):
            logger.warning("the engine loop did not stop within %.1f s", timeout)

    def _on_loop(self, fn, *args) -> None:
        if self._loop is None or threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody listens, so only the core needs telling
            fn(*args)

    # ---- event loop ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError("the engine loop is already started")
        self._loop, self._loop_thread = loop, threading.get_ident()
        fd = self.engine.outputs.fileno()
        loop.add_reader(fd, self._on_readable)
        # uvloop's add_reader makes the fd non-blocking; Connection.recv() then fails (EAGAIN) on a message longer
        # than the pipe holds at that moment (64 KB: a step of a few hundred requests, logprobs), which read as the
        # core being gone. Blocking, recv() waits for the rest, which the core is writing (readiness still comes
        # from the loop's poll, which does not care)
        os.set_blocking(fd, True)
        self._reading = True
        self.engine.send(("configure", {"expert_sync_interval_s": self.expert_sync_interval_s}))

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     arrival_time: float, stream_deltas: bool = True) -> RequestStream:
        """Send a validated request to the core; returns once the core has taken it.

        Raises QueueFullError (429), EngineDeadError (503), or the engine's ValueError (400)."""
        if self._error is not None or self._stopping or self._loop is None:
            raise EngineDeadError("the engine is not running" + (f": {self._error}" if self._error else ""))
        if self._drain_deadline is not None:
            raise EngineDeadError("the server is shutting down")
        waiting = len(self._pending) + self.stats.queue_stats()["num_waiting"]
        if self.max_waiting is not None and waiting >= self.max_waiting:
            raise QueueFullError(f"{waiting} requests are already waiting (max_waiting={self.max_waiting}); "
                                 "retry later")
        stream = RequestStream(request_id, self._loop, arrival_time, stream_deltas, join_outputs=True)
        stream.frontend = FrontendState(request_id, prompt_token_ids, params, self.engine.tokenizer, arrival_time)
        self._pending[request_id] = (stream, len(prompt_token_ids))
        if not self.engine.send(("add", request_id, prompt_token_ids, params)):
            del self._pending[request_id]
            raise EngineDeadError("the engine is not running: the engine-core process is gone")
        return await stream.wait_accepted(self.abort)

    def _abort(self, request_id: str) -> None:
        if request_id in self._pending:
            self._abort_on_accept.add(request_id)
        elif not self._router.abort(request_id):
            return
        self.engine.send(("abort", [request_id]))

    def _arm_drain(self, deadline: float) -> None:
        if self._loop is None:
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._drain_timer = self._loop.call_at(self._loop.time() + max(0.0, deadline - time.monotonic()),
                                               self._abort_all)

    def _abort_all(self) -> None:
        """Every request ends with "abort" (drain deadline, shutdown), those the core has not acknowledged yet
        too (it takes the add, then the abort); their acknowledgements are ignored when they come."""
        for stream, num_prompt_tokens in self._pending.values():
            self._router.add(stream, num_prompt_tokens)
            stream._resolve(None)
        self._pending.clear()
        self._abort_on_accept.clear()
        ids = self._router.abort_all()
        if ids:
            self.engine.send(("abort", ids))
        self._publish()

    def _on_readable(self) -> None:
        """The messages already waiting, up to MAX_MESSAGES_PER_READ, then the handlers they woke run (the
        selector calls again while the pipe has data). Keeping pace, that is one step's message and one token
        per SSE event; fallen behind, each handler joins the steps read together into one event, so the API
        process catches up on its per-event cost instead of holding the core back (a full pipe blocks it), and
        a core far ahead still cannot starve the handlers."""
        conn = self.engine.outputs
        if not os.get_blocking(conn.fileno()):  # start() made it blocking; a loop that flips it back must not win
            os.set_blocking(conn.fileno(), True)
        try:
            for _ in range(self.MAX_MESSAGES_PER_READ):
                self._handle(conn.recv())
                if not conn.poll():
                    break
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())
            self._reading = False
            if not self._stopping and self._error is None:
                self._fail_everything(self.engine.core_gone_reason())

    def _handle(self, message) -> None:
        kind = message[0]
        if kind == "step":
            self._step(message[1])
            self.stats.update(message[2])
            self._publish()
        elif kind == "accepted":
            self._accepted(message[1])
            self.stats.update(message[2])
            self._publish()
        elif kind == "dead":
            self._fail_everything(message[1])

    def _accepted(self, accepted: list) -> None:
        for request_id, error in accepted:
            if request_id not in self._pending:
                continue  # sent by an earlier loop over the same process
            stream, num_prompt_tokens = self._pending.pop(request_id)
            if error is None:
                self._router.add(stream, num_prompt_tokens)
                if request_id in self._abort_on_accept:
                    self._abort_on_accept.discard(request_id)
                    self._router.abort(request_id)
                stream._resolve(None)
                continue
            self._abort_on_accept.discard(request_id)
            name, text, client_error = error
            stream._resolve((ValueError if name == "ValueError" else TypeError)(text) if client_error
                            else RuntimeError(f"{name}: {text}"))

    def _step(self, deltas: list) -> None:
        now = time.monotonic()
        outputs, stopped = [], []
        streams = self._router.streams
        for delta in deltas:
            stream = streams.get(delta.request_id)
            if stream is None:
                continue  # aborted here meanwhile, or ended by a stop string already
            if stream.scheduled_time is None:
                stream.scheduled_time = delta.first_scheduled_time
            try:
                output = stream.frontend.update(delta, now)
            except Exception as exc:  # its text failed: this request alone fails, as in-process
                logger.exception("request %s failed", delta.request_id)
                output = stream.frontend.failed(f"{type(exc).__name__}: {exc}", now, delta.num_cached_tokens)
            if output.finished and delta.finish_reason is None:
                stopped.append(delta.request_id)  # a stop string, or a failure here: the core still runs it
            outputs.append(output)
        self._router.route(outputs, now)
        if stopped:
            self.engine.send(("abort", stopped))

    def _publish(self) -> None:
        queued = len(self._pending) + self.stats.queue_stats()["num_waiting"]
        self.metrics.observe_step(self.stats, queued)
        deliveries = self._router.take()
        if deliveries:
            deliver([], deliveries)

    def _fail_everything(self, reason: str) -> None:
        self._error = RuntimeError(reason)
        error = EngineDeadError(f"the engine stopped: {reason}")
        logger.error("the engine stopped: %s", reason)
        pending, self._pending = self._pending, {}
        for stream, _ in pending.values():
            stream._resolve(error)
        self._router.fail_all(error)
        deliver([], self._router.take())

