"""`light-moe serve --api-server-count N`: N API processes (HTTP, chat templates, tokenisation, detokenisation,
SSE) in front of one engine-core process, all on the same host:port.

One API process's event loop is the ceiling of a split server at many streams: on an H100 at 64 concurrent
streams its ~0.76 ms of CPU per request admission (half of it the ASGI stack) plus detokenisation and SSE per token
added ~43 ms to every wave's TTFT and held the server at 87-90% of the offline engine's tok/s. N processes share
that work, as vLLM's `--api-server-count` does.

    parent (serve_api_servers)
      binds host:port for every API process, without listening (bind_sockets: an address in use is one clear
      error, before the engine loads)
      makes the metrics directory (metrics_shared.py), removed at exit
      SharedEngineCore: the engine-core process with one pair of pipes per API process; waits until it is built
      N API processes (spawn, api_server_process.py): each gets its socket, its pair of pipes and the core's info;
      the parent then closes its copies of both, and supervises: signals, an API process or the core exiting
    API process i (run_api_server)
      CoreConnection (engine_client.EngineCoreClient over its pipes) -> build_app -> uvicorn on its socket (its
      listen() lets the kernel give it connections); on exit it says "shutdown" to the core, which aborts what
      is left of its requests
    engine core (engine_core.py): each client's request ids namespaced, each step's deltas split by owner

The sockets (bind_sockets). On Linux each API process gets a socket of its own, all bound to host:port by the
parent with SO_REUSEPORT: the kernel hashes every new connection to one of the listening sockets, an even spread
whatever the timing. One socket shared by all processes (the other way, and the fallback elsewhere) lets the
processes race for each connection, and the first awake accepts every connection pending: 64 connections opened
at once over 4 API processes (the tiny model on the 2-core CPU box, three bursts) landed 7/14/20/23, 13/18/5/28
and 5/9/19/31 per process with the shared socket, 19/17/18/10, 16/18/15/15 and 12/19/16/17 with SO_REUSEPORT.
Benchmark clients open their connections at once and keep them, so the shared socket's skew would last the whole
run, its busiest process the bottleneck that N processes are meant to remove. What the shared socket had, kept:
the parent binds (the port is known, an error comes out once, before the engine loads), and it first binds a
plain socket (no SO_REUSEPORT) to check that nothing holds the port, so a second server started on the port of one
that serves fails ("address already in use") instead of silently taking a share of its connections. Left: a
second server of the same user started while the first still loads its engine (its sockets bound, not listening
yet), or another program binding the port with SO_REUSEPORT, would join the group; connections queued on a
process that dies are reset with it (the server then stops anyway). `light_moe_api_process_requests_total{
api_server, pid}` shows the spread.

Signals: SIGINT / SIGTERM to the parent are forwarded as SIGTERM to every API process (once each has started
serving; until then they ignore both), which drains as one-process mode does (app.DrainingServer); a terminal's
Ctrl-C reaches every process of the group, the API processes included, so a second one still hurries their
drain. The core ignores both and exits once every API process has left. The parent exits 0.

Failures (the parent restarts nothing, as vLLM): an API process that exits on its own (killed, out of memory)
loses its connections; the core aborts its requests (their KV blocks are freed) and serves the others on; the
parent logs which process died and drains the others (their in-flight requests finish for up to
--shutdown-timeout), then exits 1 so that a supervisor restarts the whole server. An engine core that dies fails
every request in flight (503) and stops the server the same way. The API processes stop too if the parent
itself dies (they watch its sentinel).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import wait

from light_moe.engine.args import EngineArgs
from light_moe.server.api_server_process import ApiServerSpec, run_api_server
from light_moe.server.engine_client import kill_with_children, wait_until_ready
from light_moe.server.engine_core import EngineCoreSpec, run_engine_core_for_clients

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 30.0  # past --shutdown-timeout before an API process that has not exited is killed; and the
# time one still starting (signals ignored) may take before it is sent SIGTERM anyway


def check_api_server_count(count: int, engine_process: bool | None) -> None:
    """`--api-server-count` N > 1 needs the engine-core process (every API process talks to it over pipes)."""
    from light_moe.parallel.groups import torchrun_launch

    if count < 1:
        raise SystemExit(f"--api-server-count must be at least 1, got {count}")
    if count == 1:
        return
    if engine_process is False:
        raise SystemExit(f"--api-server-count {count} needs the engine-core process: drop --no-engine-process")
    launched = torchrun_launch()
    if launched is not None and launched.world_size > 1:
        raise SystemExit(f"--api-server-count {count} needs the engine-core process, which does not run under "
                         "torchrun (each rank constructs the engine in its own process)")


def bind_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """The API processes' sockets, bound to host:port but not listening (connections are refused until an API
    process serves): on Linux `count` sockets with SO_REUSEPORT, elsewhere one socket `count` times (the module's
    docstring says why). SystemExit, naming the address, if anything holds the port."""
    probe = _bind(host, port, reuse_port=False)  # fails on any holder, a SO_REUSEPORT group included
    if not sys.platform.startswith("linux"):  # SO_REUSEPORT balances connections on Linux only
        return [probe] * count
    port = probe.getsockname()[1]  # --port 0: the port the kernel chose
    probe.close()  # never listened: the port is free again at once
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(_bind(host, port, reuse_port=True))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart beside TIME_WAIT sockets
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


# ---- the engine core, as the parent starts and stops it ----------------------------------------------------
class SharedEngineCore:
    """The engine-core process serving `count` API processes: client_ends[i] is API process i's (requests,
    outputs) pair of pipes. Blocks until the engine is built (its own error raised here)."""

    def __init__(self, engine_args, count: int, *, build=None, log_level: int = logging.WARNING,
                 startup_timeout_s: float | None = None):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be initialised again in a forked child
        core_ends, self.client_ends = [], []
        for _ in range(count):
            core_requests, client_requests = ctx.Pipe(duplex=False)
            client_outputs, core_outputs = ctx.Pipe(duplex=False)
            core_ends.append((core_requests, core_outputs))
            self.client_ends.append((client_requests, client_outputs))
        spec = EngineCoreSpec(engine_args, build, log_level=log_level)
        # not daemonic: the core spawns expert-parallel workers of its own
        self.process = ctx.Process(target=run_engine_core_for_clients, args=(spec, core_ends),
                                   name="light-moe-engine-core")
        self.process.start()
        for conns in core_ends:
            for conn in conns:
                conn.close()
        try:  # every client's pipe carries the same "ready" first: take them all
            infos = [wait_until_ready(self.process, outputs, startup_timeout_s) for _, outputs in self.client_ends]
        except BaseException:
            self.close_client_ends()  # the core sees every client gone and exits once built
            self.stop(timeout=5.0)
            raise
        self.info = infos[0]

    def close_client_ends(self) -> None:
        """The parent's copies, once the API processes have theirs: a pipe then closes when its API process exits."""
        for conns in self.client_ends:
            for conn in conns:
                conn.close()

    def stop(self, timeout: float = 60.0) -> None:
        """Wait for the core to exit (it does once every API process has left), then kill it and its children."""
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine-core process did not stop within %.1f s: killing it", timeout)
            kill_with_children(self.process.pid)
            self.process.join(5.0)


# ---- the parent -------------------------------------------------------------------------------------------
class ApiServers:
    """The N API processes over a SharedEngineCore, and the parent's watch over them and the core."""

    def __init__(self, spec: ApiServerSpec, sockets: list[socket.socket], core: SharedEngineCore):
        self.spec, self.sockets, self.core = spec, sockets, core
        self.processes: list[multiprocessing.Process] = []
        self.started: list = []  # an Event each, set once the process serves
        self._signals = 0  # SIGINT / SIGTERM received by the parent
        self._stopping = False  # the API processes are to drain ...
        self._terminated = False  # ... and have been told to (SIGTERM)
        self._failed = False
        self._stop_since: float | None = None
        self._kill_at: float | None = None

    def on_signal(self, signum, frame) -> None:
        self._signals += 1  # acted on by supervise(): nothing here that could be interrupted half-way

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for index, (requests, outputs) in enumerate(self.core.client_ends):
            started = ctx.Event()
            process = ctx.Process(target=run_api_server, name=f"light-moe-api-server-{index}",
                                  args=(replace(self.spec, index=index), self.sockets[index], requests, outputs,
                                        started))
            process.start()
            self.processes.append(process)
            self.started.append(started)
        self.core.close_client_ends()

    def supervise(self) -> int:
        """Until every API process has exited, then the core (which exits once they all left): 0, or 1 if an API
        process or the core exited on its own."""
        announced = False
        while any(p.exitcode is None for p in self.processes):
            sentinels = [p.sentinel for p in (*self.processes, self.core.process) if p.exitcode is None]
            wait(sentinels, 0.2)
            if self._signals and not self._stopping:
                logger.info("shutting down: the %d API processes drain", len(self.processes))
                self._stopping = True
            self._watch_failures()
            if self._stopping and self._stop_since is None:
                self._stop_since = time.monotonic()
            serving = all(e.is_set() or p.exitcode is not None for e, p in zip(self.started, self.processes))
            if serving and not announced and not self._stopping:
                announced = True
                logger.info("serving with %d API processes (pids %s) and the engine-core process (pid %d)",
                            len(self.processes), ", ".join(str(p.pid) for p in self.processes), self.core.process.pid)
            # SIGTERM once they all have uvicorn's handlers (before, they ignore it), or once one stuck starting
            # has had its time (it is killed later if it ignores the signal)
            starting_too_long = self._stop_since is not None and time.monotonic() - self._stop_since > _STOP_GRACE_S
            if self._stopping and (serving or starting_too_long) and not self._terminated:
                self._terminate()
            if self._kill_at is not None and time.monotonic() > self._kill_at:
                self._kill_stragglers()
        self.core.stop()
        return 1 if self._failed else 0

    def _watch_failures(self) -> None:
        if self._stopping:
            return
        for index, process in enumerate(self.processes):
            if process.exitcode is not None:
                logger.error("API server %d (pid %d) exited with code %s: stopping the server (the other API "
                             "processes drain, then the engine core stops)", index, process.pid, process.exitcode)
                self._stopping = self._failed = True
                return
        if self.core.process.exitcode is not None:
            logger.error("the engine-core process (pid %d) exited with code %s: stopping the server",
                         self.core.process.pid, self.core.process.exitcode)
            self._stopping = self._failed = True

    def _terminate(self) -> None:
        """SIGTERM to every API process (never SIGINT: a terminal's Ctrl-C reaches them too, and a second SIGINT
        would hurry their drain)."""
        self._terminated = True
        for process in self.processes:
            if process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        self._kill_at = time.monotonic() + self.spec.shutdown_timeout + _STOP_GRACE_S

    def _kill_stragglers(self) -> None:
        self._kill_at = None
        for index, process in enumerate(self.processes):
            if process.exitcode is None:
                logger.error("API server %d (pid %d) did not stop: killing it", index, process.pid)
                kill_with_children(process.pid)
                process.join(5.0)
                self._failed = True


def serve_api_servers(args: argparse.Namespace, engine_args: EngineArgs) -> int:
    """`serve` with --api-server-count N > 1 (args: serve's, already checked)."""
    sockets = bind_sockets(args.host, args.port, args.api_server_count)
    metrics_dir = tempfile.mkdtemp(prefix="light-moe-metrics-")
    try:
        try:
            core = SharedEngineCore(engine_args, args.api_server_count,
                                    log_level=getattr(logging, args.log_level.upper()))
        except KeyboardInterrupt:
            return 130
        logger.info("the engine runs in an engine-core process (pid %d, %s) behind %d API processes",
                    core.process.pid, core.info["device"], args.api_server_count)
        spec = ApiServerSpec(0, str(engine_args.model), core.info, metrics_dir, args.served_model_name, args.api_key,
                             args.max_waiting, args.max_body_bytes, args.body_timeout, args.template_workers,
                             args.template_timeout, args.template_memory_mb << 20, args.shutdown_timeout,
                             args.log_level)
        servers = ApiServers(spec, sockets, core)
        previous = {sig: signal.signal(sig, servers.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            servers.start()
            for sock in sockets:  # the API processes hold theirs: once they all closed them, the port is free again
                sock.close()
            code = servers.supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        logger.info("server stopped")
        return code
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
