"""The one thread that owns the engine, and the bridge between it and the asyncio handlers.

    handler (event loop)                       engine thread
    submit() -> command deque ---------------> apply adds/aborts -> engine.step()
       await stream.accepted  <--------------- accepted / 400 error  (call_soon_threadsafe)
       async for out in stream <-------------- RequestOutputs of each step, one hop per step
    abort()  -> command deque ---------------> engine.abort(): KV blocks freed

A request whose own work fails in the engine (finish_reason "error") gets RequestFailedError; only an
exception out of engine.step() itself stops the loop (EngineDeadError for everyone).

The engine is not thread-safe, so nothing but this thread calls into it (engine.validate,
which only reads the tokenizer and the config, is the exception the handlers use to answer
400s before queueing). Commands go through a deque under a Condition: the thread sleeps on
it while the engine is idle and drains it between steps, so requests that arrive during a
step join the running batch at the next one (continuous batching by the scheduler).
Outputs of one step travel to the event loop in a single call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from light_moe.engine.outputs import RequestOutput
from light_moe.sampling_params import SamplingParams
from light_moe.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or step() raised): no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting than max_waiting allows."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine (its own host work raised); the engine goes on (500)."""


class RequestStream:
    """The handler's end of one request: acceptance, then its outputs until one is finished."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, arrival_time: float, stream_deltas: bool,
                 join_outputs: bool = False):
        self.request_id = request_id
        self.arrival_time = arrival_time
        self.stream_deltas = stream_deltas  # False: only the final output is delivered
        self.join_outputs = join_outputs  # see next()
        self.accepted: asyncio.Future = loop.create_future()
        self.finished = False
        # Outputs not yet taken, and the future the handler sleeps on while there are none: a step's hand-over
        # appends and wakes the handler at most once, and the handler takes everything queued at wake-up
        # without sleeping again (asyncio.Queue's put / get cost more per token than the rest of the hop).
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future | None = None
        self._loop = loop
        # engine-thread bookkeeping for the latency metrics
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_tokens = 0
        self.engine_request = None  # in-process: the engine's Request, whose first_scheduled_time gives the queue time
        self.scheduled_time: float | None = None  # split: that time, as the engine-core process reported it
        self.frontend = None  # split: the request's FrontendState (engine/request_state.py: text, stop strings)

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # done: the handler was cancelled while it slept
                waiter.set_result(None)

    async def wait_accepted(self, abort) -> RequestStream:
        """Wait until the engine has taken the request (its error raised here); cancelled meanwhile (the client
        left), abort(request_id) it."""
        try:
            await self.accepted
        except asyncio.CancelledError:
            abort(self.request_id)
            raise
        return self

    def _resolve(self, error: BaseException | None) -> None:
        if self.accepted.done():
            return
        if error is None:
            self.accepted.set_result(None)
        else:
            self.accepted.set_exception(error)

    async def next(self) -> RequestOutput:
        """The next output. With join_outputs (a split server: engine_client.py), a handler that fell behind
        gets every output queued since in one (their deltas joined), so one SSE event carries several tokens and
        the API process catches up instead of holding the engine core back; otherwise one output per token,
        which clients timing each token (bench serve --token-chunks) rely on."""
        if not self._items:
            await self._wait()
        return self._take()

    async def _wait(self) -> None:
        """Sleep until _put queues something (one consumer: the request's handler)."""
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter

    def _take(self) -> RequestOutput:
        items = self._items
        item = items.popleft()
        while self.join_outputs and items and isinstance(item, RequestOutput) and not item.finished:
            following = items[0]
            if isinstance(following, BaseException):
                break  # the outputs before it go out first; the error comes next
            items.popleft()
            # outputs are this handler's alone: join into the later one in place (dataclasses.replace is slow)
            following.delta_text = item.delta_text + following.delta_text
            following.delta_token_ids = item.delta_token_ids + following.delta_token_ids
            item = following
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        # next() inlined: one frame fewer per token
        while not self.finished:
            if not self._items:
                await self._wait()
            yield self._take()


class StreamRouter:
    """The live requests' streams and their latency metrics: a step's outputs in, deliveries to the handlers
    out. Owned by one thread: the engine thread (EngineLoop), or the event loop (engine_client.py's loop of a
    split server, where the outputs arrive)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.streams: dict[str, RequestStream] = {}
        self.deliveries: list[tuple[RequestStream, RequestOutput | BaseException]] = []

    def add(self, stream: RequestStream, num_prompt_tokens: int) -> None:
        self.streams[stream.request_id] = stream
        self.metrics.prompt_tokens.inc(num_prompt_tokens)

    def abort(self, request_id: str) -> bool:
        """Forget a live request (its client went away): counted as an abort, nothing delivered."""
        if self.streams.pop(request_id, None) is None:
            return False
        self.metrics.finished.labels(finish_reason="abort").inc()
        return True

    def abort_all(self) -> list[str]:
        """End every live request with finish_reason "abort" (shutdown); their ids."""
        for request_id, stream in self.streams.items():
            self.metrics.finished.labels(finish_reason="abort").inc()
            self.deliveries.append((stream, _aborted_output(request_id)))
        ids = list(self.streams)
        self.streams.clear()
        return ids

    def fail_all(self, error: BaseException) -> None:
        self.deliveries.extend((stream, error) for stream in self.streams.values())
        self.streams.clear()

    def take(self) -> list[tuple[RequestStream, RequestOutput | BaseException]]:
        deliveries, self.deliveries = self.deliveries, []
        return deliveries

    def route(self, outputs: list[RequestOutput], now: float) -> None:
        m = self.metrics
        generated = 0
        for output in outputs:
            stream = self.streams.get(output.request_id)
            if stream is None:
                continue  # aborted while the step ran
            n = len(output.delta_token_ids)
            if n:
                generated += n
                stream.num_tokens += n
                if stream.first_token_time is None:
                    stream.first_token_time = now
                    m.ttft.observe(now - stream.arrival_time)
                    self._observe_queue_time(stream)
                    n -= 1  # the first token has no predecessor
                if n:
                    m.itl.observe((now - stream.last_token_time) / n, n)  # n gaps of 1/n of the interval
                stream.last_token_time = now
            if output.finished:
                del self.streams[output.request_id]
                m.finished.labels(finish_reason=output.finish_reason or "length").inc()
                m.e2e.observe(now - stream.arrival_time)
                if stream.first_token_time is None:
                    self._observe_queue_time(stream)  # ended without a token (capacity, error)
                elif stream.num_tokens > 1:
                    m.tpot.observe((stream.last_token_time - stream.first_token_time) / (stream.num_tokens - 1))
            if output.finish_reason == "error":  # the engine logged it; this request alone fails
                error = getattr(output, "error", "") or "unknown error"
                self.deliveries.append((stream, RequestFailedError(f"the request failed in the engine: {error}")))
            elif output.finished or stream.stream_deltas:
                self.deliveries.append((stream, output))
        if generated:
            m.generation_tokens.inc(generated)  # once per step, not per request: the counter takes a lock

    def _observe_queue_time(self, stream: RequestStream) -> None:
        request = stream.engine_request
        scheduled = request.first_scheduled_time if request is not None else stream.scheduled_time
        if scheduled is not None:
            self.metrics.queue_time.observe(max(0.0, scheduled - stream.arrival_time))


@dataclass
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class EngineLoop:
    def __init__(self, engine, metrics: ServerMetrics, max_waiting: int | None = None):
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None (no limit), got {max_waiting}")
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()
        self._queued_adds = 0  # submitted, not yet applied (guarded by _cv)
        self._engine_waiting = 0  # scheduler.num_waiting after the last command drain or step (guarded by _cv)
        self._stopping = False
        self._drain_deadline: float | None = None  # set by drain(): refuse new requests, abort old ones then
        self._error: BaseException | None = None
        # engine thread only: live requests, and what the next hand-over to the event loop carries
        self._router = StreamRouter(metrics)
        self._accepted: list[tuple[RequestStream, BaseException | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- any thread -----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self._drain_deadline is None)

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request (no-op if it already finished)."""
        with self._cv:
            self._commands.append(_Abort(request_id))
            self._cv.notify()

    # ---- event loop -----------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="light-moe-engine", daemon=True)
        self._thread.start()

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     arrival_time: float, stream_deltas: bool = True) -> RequestStream:
        """Queue a validated request; returns once the engine has taken it.

        Raises QueueFullError (429), EngineDeadError (503), or the engine's ValueError (400).
        """
        stream = RequestStream(request_id, asyncio.get_running_loop(), arrival_time, stream_deltas)
        with self._cv:
            if self._error is not None or self._stopping or self._thread is None:
                raise EngineDeadError("the engine is not running" + (f": {self._error}" if self._error else ""))
            if self._drain_deadline is not None:
                raise EngineDeadError("the server is shutting down")
            if self.max_waiting is not None and self._queued_adds + self._engine_waiting >= self.max_waiting:
                raise QueueFullError(f"{self._queued_adds + self._engine_waiting} requests are already waiting "
                                     f"(max_waiting={self.max_waiting}); retry later")
            self._commands.append(_Add(stream, prompt_token_ids, params))
            self._queued_adds += 1
            self._cv.notify()
        return await stream.wait_accepted(self.abort)

    def drain(self, timeout: float) -> None:
        """Refuse new requests from now on (503); abort those still running `timeout` seconds later.

        Called when the server starts shutting down, so in-flight requests end on their own terms
        (finished, or finish_reason "abort") instead of being cancelled by the ASGI server.
        """
        with self._cv:  # a Condition's lock is reentrant: safe from a signal handler on the loop's thread
            deadline = time.monotonic() + max(timeout, 0.0)
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is still running, deliver 'abort' to its handlers, stop the thread. Blocking."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.1f s", timeout)

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not self._commands and not self._stopping and not engine.has_unfinished_requests():
                        self._cv.wait()
                    commands = list(self._commands)
                    self._commands.clear()
                    stopping = self._stopping
                    drained = self._drain_deadline is not None and time.monotonic() >= self._drain_deadline
                num_adds = 0
                for command in commands:
                    if isinstance(command, _Add):
                        num_adds += 1
                        self._accepted.append((command.stream, self._add(command)))
                    elif self._router.abort(command.request_id):
                        engine.abort(command.request_id)
                if stopping or drained:
                    for request_id in self._router.abort_all():
                        engine.abort(request_id)
                self._publish(num_adds)
                if stopping:
                    return
                if engine.has_unfinished_requests():
                    self._router.route(engine.step(), time.monotonic())
                    self._publish(0)
        except BaseException as exc:  # a failed step leaves the engine in an unknown state: stop serving
            logger.exception("the engine loop stopped on an error")
            self._fail_everything(exc)

    def _add(self, command: _Add) -> BaseException | None:
        stream = command.stream
        try:
            self.engine.add_request(command.prompt_token_ids, command.params, stream.request_id)
        except (ValueError, TypeError) as exc:
            return exc
        except Exception as exc:
            logger.exception("add_request failed for %s", stream.request_id)
            self.engine.abort(stream.request_id)  # it may have reached the scheduler before failing
            return exc
        self._router.add(stream, len(command.prompt_token_ids))
        stream.engine_request = self.engine.get_request(stream.request_id)
        return None

    def _publish(self, num_adds: int) -> None:
        waiting = self.engine.queue_stats()["num_waiting"]
        with self._cv:
            self._queued_adds -= num_adds
            self._engine_waiting = waiting
            queued = self._queued_adds + waiting
        self.metrics.observe_step(self.engine, queued)
        self._send()

    def _send(self) -> None:
        """Hand this iteration's acceptances and outputs to the event loop in one call."""
        accepted, deliveries = self._accepted, self._router.take()
        if not accepted and not deliveries:
            return
        self._accepted = []
        hand_over = functools.partial(deliver, accepted, deliveries)
        try:
            self._loop.call_soon_threadsafe(hand_over)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _fail_everything(self, exc: BaseException) -> None:
        with self._cv:
            self._error = exc
            pending = [c.stream for c in self._commands if isinstance(c, _Add)]
            self._commands.clear()
            self._queued_adds = 0
        error = EngineDeadError(f"the engine stopped: {exc}")
        # Requests accepted before the failure get the error as their next output; the rest are refused.
        self._accepted.extend((stream, error) for stream in pending)
        self._router.fail_all(error)
        self._send()


def deliver(accepted: list[tuple[RequestStream, BaseException | None]],
            deliveries: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """On the event loop: resolve acceptances, then queue outputs for their handlers."""
    for stream, error in accepted:
        stream._resolve(error)
    for stream, item in deliveries:
        stream._put(item)


def _aborted_output(request_id: str) -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[], text="", token_ids=[],
                         delta_text="", delta_token_ids=[], finished=True, finish_reason="abort")
