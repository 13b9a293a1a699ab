"""Chat templates rendered in worker processes: TemplateRenderer(source, bos, eos, ...).render(messages).

    handler --await render()--> idle worker (asyncio queue) --JSON line--> worker: ChatTemplate.render
            <-- text / 400 / 503 -------------------------------- JSON line <--

A chat template is code from the checkpoint run on client data. The sandbox (engine/chat_template.py) bounds
its time and what it builds, and each worker compiles it once; the process adds what a thread cannot give:
  - the event loop and the engine thread never wait for a render, nor share the GIL with it;
  - a worker's address space is capped (RLIMIT_AS): a template that allocates past it gets MemoryError;
  - a render that outlives its time limit (plus a grace) is killed with its process, and a new worker
    starts in its place, so hostile templates can neither exhaust the workers nor keep SIGTERM from
    stopping the server; a worker also exits when its stdin closes (the server went away).
A request waits at most queue_timeout_s for a free worker (503 otherwise). Workers start with the app.

The worker is this file run as a script (python -I this_file): it loads chat_template.py by path, so it
imports only jinja2, not the light_moe package with torch behind it.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

_KILL_GRACE_S = 1.0  # past the sandbox's own deadline, before the process is killed


class TemplateBusyError(RuntimeError):
    """No worker came free within queue_timeout_s."""


class TemplateRenderer:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None, *, num_workers: int = 2,
                 time_limit_s: float = 5.0, max_chars: int = 8 * 1024 * 1024, memory_bytes: int = 1 << 30,
                 queue_timeout_s: float = 10.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.config = {"source": source, "bos_token": bos_token, "eos_token": eos_token,
                       "time_limit_s": time_limit_s, "max_chars": max_chars, "memory_bytes": memory_bytes}
        self.num_workers = num_workers
        self.time_limit_s = time_limit_s
        self.max_chars = max_chars
        self.queue_timeout_s = queue_timeout_s
        self._idle: asyncio.Queue | None = None
        self._live: set[asyncio.subprocess.Process] = set()
        self._closing = False

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.num_workers)))
        for worker in workers:
            self._idle.put_nowait(worker)

    def abort(self) -> None:
        """The server is shutting down: renders in progress and new ones end with TemplateBusyError (503)."""
        self._closing = True
        for worker in list(self._live):
            self._kill(worker)

    async def close(self) -> None:
        self._closing = True
        for worker in list(self._live):
            if worker.stdin is not None:
                worker.stdin.close()
        for worker in list(self._live):
            try:
                await asyncio.wait_for(worker.wait(), 1.0)
            except asyncio.TimeoutError:
                self._kill(worker)
        self._live.clear()

    async def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text. ValueError: the template refused the messages or passed a limit (the message
        says which); TemplateBusyError: every worker stayed busy for queue_timeout_s, or the server is
        shutting down."""
        if self._closing:
            raise TemplateBusyError("the server is shutting down")
        try:
            worker = await asyncio.wait_for(self._idle.get(), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise TemplateBusyError(f"every chat template worker stayed busy for {self.queue_timeout_s:g} s") from None
        try:
            if self._closing:
                raise TemplateBusyError("the server is shutting down")
            if worker is None or worker.returncode is not None:
                worker = await self._spawn()
            request = {"messages": messages, "add_generation_prompt": add_generation_prompt}
            worker.stdin.write(json.dumps(request, ensure_ascii=False).encode() + b"\n")
            await worker.stdin.drain()
            line = await asyncio.wait_for(worker.stdout.readline(), self.time_limit_s + _KILL_GRACE_S)
            if not line:
                raise ValueError("the chat template's worker process died rendering these messages (out of memory?)")
            reply = json.loads(line)
        except (asyncio.TimeoutError, asyncio.CancelledError, ValueError, OSError) as exc:
            # its reply, if one still comes, would answer the next request: the worker goes
            self._kill(worker)
            worker = None
            if self._closing and not isinstance(exc, asyncio.CancelledError):
                raise TemplateBusyError("the server is shutting down") from None
            if isinstance(exc, asyncio.TimeoutError):
                raise ValueError(f"the chat template ran longer than {self.time_limit_s:g} s") from None
            if isinstance(exc, OSError):
                raise ValueError(f"the chat template's worker process failed: {exc}") from None
            raise
        finally:
            self._idle.put_nowait(worker)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["text"]

    async def _spawn(self) -> asyncio.subprocess.Process:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-I", str(Path(__file__).resolve()), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=8 * self.max_chars + 65536)
        worker.stdin.write(json.dumps(self.config).encode() + b"\n")
        self._live.add(worker)
        return worker

    def _kill(self, worker: asyncio.subprocess.Process | None) -> None:
        if worker is None:
            return
        self._live.discard(worker)
        with contextlib.suppress(ProcessLookupError):
            worker.kill()


def _load_chat_template_module():
    path = Path(__file__).resolve().parents[1] / "engine" / "chat_template.py"
    spec = importlib.util.spec_from_file_location("light_moe_chat_template", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker_main() -> None:
    import resource

    module = _load_chat_template_module()
    config = json.loads(sys.stdin.readline())
    memory = config["memory_bytes"]
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    try:
        template, compile_error = module.ChatTemplate(config["source"], config["bos_token"], config["eos_token"]), None
    except ValueError as exc:
        template, compile_error = None, str(exc)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if template is None:
                raise ValueError(compile_error)
            reply = {"text": template.render(request["messages"], request["add_generation_prompt"],
                                             time_limit_s=config["time_limit_s"], max_chars=config["max_chars"])}
        except MemoryError:
            reply = {"error": f"the chat template ran out of memory (the limit is {memory} bytes)"}
        except Exception as exc:  # the template's own errors and limits: the request's answer, not the worker's end
            reply = {"error": str(exc) or type(exc).__name__}
        sys.stdout.write(json.dumps(reply, ensure_ascii=False) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _worker_main()
