"""One of the N API processes of `serve --api-server-count N` (api_servers.py starts and watches them): the app
of one-process mode over this process's pair of pipes to the shared engine core, uvicorn on the socket the parent
bound, and its metrics in the shared directory (metrics_shared.py).

    run_api_server(spec, sock, requests, outputs, started)
      SIGINT / SIGTERM ignored until uvicorn's handlers are in (the parent forwards its signal once all serve)
      prometheus_client's multiprocess mode on, for spec.metrics_dir
      CoreConnection (the pipes; tokenizer and config loaded here) -> build_app(metrics=SharedServerMetrics)
      ApiServer (app.DrainingServer) on [sock]: `started` set once it serves; drains on SIGTERM, on a
      terminal's SIGINT, or when the parent dies
      then ("shutdown",) to the core: it aborts whatever of this process's requests it still holds
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass
from multiprocessing.connection import Connection

import uvicorn
from prometheus_client import values

from light_moe.server.app import DrainingServer, build_app
from light_moe.server.engine_client import EngineCoreClient
from light_moe.server.metrics_shared import SharedServerMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiServerSpec:
    """What an API process is started from (pickled to it: spawn): serve's options for build_app and uvicorn."""

    index: int
    model: str
    core_info: dict  # the core's "ready": max_model_len, model_name, device, pid
    metrics_dir: str
    served_model_name: str | None
    api_key: str | None
    max_waiting: int | None
    max_body_bytes: int
    body_timeout_s: float
    template_workers: int
    template_time_limit_s: float
    template_memory_bytes: int
    shutdown_timeout: float
    log_level: str = "info"


class CoreConnection(EngineCoreClient):
    """An API process's end of the engine core its parent started: the pipes it was given, and the tokenizer and
    config it loads itself. Whether the core runs is the pipe's to say (EOF, or "dead": EngineProcessLoop)."""

    def __init__(self, requests: Connection, outputs: Connection, model: str, info: dict):
        self._attach(requests, outputs)
        self._load_model_side(model)
        self._take_info(info)
        self.core_pid = info["pid"]

    def core_alive(self) -> bool:
        return True  # until its pipe closes, which the loop sees

    def core_gone_reason(self) -> str:
        return f"the engine-core process exited (pid {self.core_pid})"

    def shutdown(self) -> None:
        """Leave: the core aborts whatever of this process's requests it still holds."""
        self._stop_sending()
        self._outputs.close()


class ApiServer(DrainingServer):
    """DrainingServer that tells the parent once it serves, and drains if the parent dies (nothing would stop it
    otherwise)."""

    def __init__(self, config: uvicorn.Config, engine_loop, drain_timeout: float, templates, started):
        super().__init__(config, engine_loop, drain_timeout, templates)
        self.started_event = started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        parent = multiprocessing.parent_process()
        if parent is not None:
            asyncio.get_running_loop().add_reader(parent.sentinel, self._parent_gone, parent.sentinel)
        self.started_event.set()

    def _parent_gone(self, sentinel: int) -> None:
        asyncio.get_running_loop().remove_reader(sentinel)
        logger.warning("the server's parent process is gone: shutting down")
        self.should_exit = True


def run_api_server(spec: ApiServerSpec, sock: socket.socket, requests: Connection, outputs: Connection,
                   started) -> None:
    """The process's target: serve until SIGTERM (from the parent), a terminal's SIGINT, or the parent's death.
    started: a multiprocessing Event, set once uvicorn serves."""
    # until uvicorn's handlers are in: ignored (the parent forwards its signal once every API process serves);
    # uvicorn puts these back when it is done and re-raises what it caught into them, so nothing is raised then
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(levelname)s %(name)s [api server {spec.index}]: %(message)s")
    # prometheus_client's multiprocess mode, before any metric of this process exists (metrics_shared.py): the
    # request counters' values go to files in the parent's directory, which every API process's /metrics adds up.
    # Set here, in the process's entry point, rather than inherited: nothing else in this process is affected.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = spec.metrics_dir
    values.ValueClass = values.MultiProcessValue()
    core = CoreConnection(requests, outputs, spec.model, spec.core_info)
    try:
        model_name = spec.served_model_name or core.model_name
        app = build_app(core, served_model_name=model_name, api_key=spec.api_key, max_waiting=spec.max_waiting,
                        max_body_bytes=spec.max_body_bytes, body_timeout_s=spec.body_timeout_s,
                        template_workers=spec.template_workers, template_time_limit_s=spec.template_time_limit_s,
                        template_memory_bytes=spec.template_memory_bytes,
                        metrics=SharedServerMetrics(model_name, spec.metrics_dir, spec.index))
        # as serve.run_server: uvicorn's own timeout only backs up the engine loop's drain
        config = uvicorn.Config(app, log_level=spec.log_level, lifespan="on",
                                timeout_graceful_shutdown=spec.shutdown_timeout + 10.0)
        server = ApiServer(config, app.state.server.loop, spec.shutdown_timeout, app.state.server.templates, started)
        server.run(sockets=[sock])
    finally:
        core.shutdown()
