"""`light-moe serve --model DIR`: load the engine, serve the OpenAI API with uvicorn.

Shutdown on SIGINT or SIGTERM: uvicorn stops accepting connections and lets in-flight
requests finish for up to --shutdown-timeout seconds, then aborts them (streams end with their
last chunk and [DONE], non-streamed requests get a 503); the app's lifespan then stops the chat
template workers and the engine thread. A second SIGINT aborts at once, with the same endings.
The process exits 0 without a traceback.

With --api-server-count N > 1 this process only binds the port and supervises: the engine runs in an engine-core
process and N API processes serve HTTP on the shared socket (api_servers.py).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from importlib.util import find_spec

from light_moe.engine.args import SERVER_DEFAULTS, EngineArgs
from light_moe.server.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_WAITING,
    DEFAULT_TEMPLATE_MEMORY_BYTES,
    DEFAULT_TEMPLATE_TIME_LIMIT_S,
    DEFAULT_TEMPLATE_WORKERS,
)

logger = logging.getLogger(__name__)


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    EngineArgs.add_cli_args(parser, defaults=SERVER_DEFAULTS)  # --model (required) and every engine option
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the checkpoint directory's name)")
    parser.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                        help="requests allowed to wait for a batch seat before new ones get 429")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted (larger ones get 413)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a request body may take to arrive (slower ones get 408)")
    parser.add_argument("--template-workers", type=int, default=DEFAULT_TEMPLATE_WORKERS,
                        help="processes rendering chat templates")
    parser.add_argument("--template-timeout", type=float, default=DEFAULT_TEMPLATE_TIME_LIMIT_S,
                        help="seconds one chat template render may take (longer ones get 400)")
    parser.add_argument("--template-memory-mb", type=int, default=DEFAULT_TEMPLATE_MEMORY_BYTES >> 20,
                        help="address-space limit of each chat template worker process")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may run after SIGINT/SIGTERM before they are aborted")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the engine (scheduler, model, sampling) in a process of its own, apart from HTTP, "
                             "tokenisation and detokenisation (default: on for CUDA devices, off on the CPU; "
                             "docs/server.md)")
    parser.add_argument("--api-server-count", type=int, default=1,
                        help="API processes (HTTP, tokenisation, detokenisation, SSE) serving host:port in front of "
                             "one engine-core process; more than 1 implies --engine-process (docs/server.md)")
    return parser


def run_server(engine, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
               served_model_name: str | None = None, max_waiting: int | None = DEFAULT_MAX_WAITING,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_timeout: float = 30.0,
               log_level: str = "info", **app_kwargs) -> None:
    """Serve `engine` until SIGINT/SIGTERM (call from the main thread: uvicorn installs the handlers).
    app_kwargs: build_app's other limits (body_timeout_s, template_workers, template_time_limit_s,
    template_memory_bytes)."""
    import uvicorn

    from light_moe.server.app import DrainingServer, build_app

    app = build_app(engine, served_model_name=served_model_name, api_key=api_key, max_waiting=max_waiting,
                    max_body_bytes=max_body_bytes, **app_kwargs)
    # uvicorn's own timeout cancels handler tasks, which it logs as tracebacks; it is only a backstop
    # behind the engine loop's drain, which ends the requests first.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout + 10.0)
    server = DrainingServer(config, app.state.server.loop, shutdown_timeout, app.state.server.templates)
    # uvicorn's "auto" choices take uvloop / httptools when installed (the server extra): say which ran
    logger.info("event loop: %s, HTTP parser: %s", "uvloop" if find_spec("uvloop") else "asyncio",
                "httptools" if find_spec("httptools") else "h11")
    # uvicorn re-raises the signal it caught once it has shut down, into the handler that was installed
    # before it started. Install silent ones for that moment, so SIGTERM does not kill the process (exit
    # status 143) and SIGINT raises no KeyboardInterrupt after a clean shutdown.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("server stopped")


def _ignore_signal(signum, frame) -> None:
    pass


def serve(args: argparse.Namespace) -> int:
    from light_moe.server.engine_client import start_engine

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.max_waiting < 0:
        raise SystemExit(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.max_body_bytes <= 0:
        raise SystemExit(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    for flag in ("body_timeout", "template_workers", "template_timeout", "template_memory_mb"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    engine_args = EngineArgs.from_cli_args(args)  # every engine flag checked before anything loads
    if args.api_server_count != 1:
        from light_moe.server.api_servers import check_api_server_count, serve_api_servers

        check_api_server_count(args.api_server_count, args.engine_process)
        return serve_api_servers(args, engine_args)
    try:  # in an engine-core process, or in this one (server/engine_client.py)
        engine = start_engine(engine_args, args.engine_process, log_level=getattr(logging, args.log_level.upper()))
    except KeyboardInterrupt:
        return 130
    try:
        run_server(engine, args.host, args.port, api_key=args.api_key, served_model_name=args.served_model_name,
                   max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                   shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                   body_timeout_s=args.body_timeout, template_workers=args.template_workers,
                   template_time_limit_s=args.template_timeout, template_memory_bytes=args.template_memory_mb << 20)
    finally:
        engine.shutdown()  # the engine-core process, expert-parallel worker processes, if any
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_args(argparse.ArgumentParser(prog="light-moe serve",
                                                    description="OpenAI-compatible API server"))
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
