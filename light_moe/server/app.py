"""The OpenAI-compatible HTTP API: build_app(engine, ...) -> FastAPI application.

    POST /v1/completions, POST /v1/chat/completions  (stream: true -> server-sent events, [DONE])
    GET  /v1/models, GET /health, GET /metrics

A request is read (size- and time-limited: body.py), parsed strictly (protocol.py; the sampling
bounds are SamplingParams's), its chat template rendered in a worker process (template_worker.py),
tokenized with work bounded by the context window, and checked against it here, so every bad input
is a 4xx before anything is queued; then it goes to the engine thread (engine_loop.py), or to the
engine-core process of a split server (engine_client.py, engine_core.py; docs/server.md). A request
that fails inside the engine is a 500 for it alone. A client that goes away has its request
aborted: streams when the ASGI server reports the disconnect (or a send fails), non-streamed
requests by listening for http.disconnect while the engine works; one that leaves while still
uploading its body is counted as 499. docs/server.md lists every bound and its status.

Default max_tokens when the request leaves it out: 16 for /v1/completions (OpenAI's legacy
default), and the whole remaining context for /v1/chat/completions (as vLLM does).
"""
from __future__ import annotations

import asyncio
import gc
import json
import secrets
import signal
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from light_moe.engine.outputs import RequestOutput
from light_moe.engine.tokenizer import PromptTooLongError
from light_moe.server.body import read_json
from light_moe.server.engine_client import EngineCoreClient, EngineProcessLoop
from light_moe.server.engine_loop import (
    EngineDeadError,
    EngineLoop,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from light_moe.server.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_WAITING,
    DEFAULT_TEMPLATE_MEMORY_BYTES,
    DEFAULT_TEMPLATE_TIME_LIMIT_S,
    DEFAULT_TEMPLATE_WORKERS,
)
from light_moe.server.metrics import ServerMetrics
from light_moe.server.openapi import build_openapi
from light_moe.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from light_moe.server.sse import ChatChunks, CompletionChunks
from light_moe.server.template_worker import TemplateBusyError, TemplateRenderer

DEFAULT_COMPLETION_MAX_TOKENS = 16
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


class ServerState:
    """What the routes share: the engine loop, the names, the limits."""

    def __init__(self, engine, served_model_name: str | None, api_key: str | None, max_waiting: int | None,
                 max_body_bytes: int, body_timeout_s: float, expert_sync_interval_s: float,
                 templates: TemplateRenderer | None, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.model_name = served_model_name or engine.model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics if metrics is not None else ServerMetrics(self.model_name, expert_sync_interval_s)
        if isinstance(engine, EngineCoreClient):  # the engine in a process of its own (engine_client.py)
            self.loop = EngineProcessLoop(engine, self.metrics, max_waiting, expert_sync_interval_s)
        else:  # the engine in this process, driven by a thread (engine_loop.py)
            self.loop = EngineLoop(engine, self.metrics, max_waiting)
        self.templates = templates
        self.created = int(time.time())


def build_app(engine, *, served_model_name: str | None = None, api_key: str | None = None,
              max_waiting: int | None = DEFAULT_MAX_WAITING, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, expert_sync_interval_s: float = 1.0,
              engine_shutdown_timeout_s: float = 10.0, template_workers: int = DEFAULT_TEMPLATE_WORKERS,
              template_time_limit_s: float = DEFAULT_TEMPLATE_TIME_LIMIT_S,
              template_memory_bytes: int = DEFAULT_TEMPLATE_MEMORY_BYTES,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """An app serving `engine`: a LightMoEEngine, driven by a thread of this process, or an EngineCoreClient (the
    engine in an engine-core process, engine_client.py). Its engine loop and chat template workers start and stop
    with the app's lifespan; the engine itself (or its process) is the caller's to shut down. metrics: where the
    app's metrics go (default: a ServerMetrics of its own; one of several API processes passes its
    SharedServerMetrics, metrics_shared.py)."""
    tokenizer = engine.tokenizer
    templates = None
    if tokenizer.chat_template:
        # a rendered prompt longer than the context window could spell is refused by the worker itself
        templates = TemplateRenderer(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                                     num_workers=template_workers, time_limit_s=template_time_limit_s,
                                     max_chars=tokenizer.max_chars(engine.max_model_len),
                                     memory_bytes=template_memory_bytes)
    state = ServerState(engine, served_model_name, api_key, max_waiting, max_body_bytes, body_timeout_s,
                        expert_sync_interval_s, templates, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start(asyncio.get_running_loop())
        if templates is not None:
            await templates.start()
        # Everything built so far (torch's and the tokenizer's modules, the engine, the app) lives as long as the
        # server: frozen, the collector stops walking it again in every full collection, which the requests'
        # allocations trigger every few hundred requests (docs/server.md, "API process CPU cost"). Collected first,
        # so no garbage is frozen with it; unfrozen at shutdown, for a process that goes on without the server.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            if templates is not None:
                await templates.close()
            await asyncio.to_thread(state.loop.shutdown, engine_shutdown_timeout_s)

    app = FastAPI(title="Light-MoE", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(_CountRequests, metrics=state.metrics)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, state.model_name, engine.max_model_len,
                                               engine.model_config.vocab_size, api_key is not None)
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)  # nobody reads it; the request counter records it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            raise APIError(503, "the engine is not running", type="service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorize)])

    @v1.get("/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "light-moe",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        body = parse_request(CompletionRequest, await read_json(request, state.max_body_bytes, state.body_timeout_s))
        _check_model(state, body.model)
        body.check_supported()
        prompt = body.single_prompt()
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        _check_max_tokens(max_tokens, "max_tokens")
        params = body.sampling_params(max_tokens, logprobs=body.logprobs is not None)
        prompt_ids = await _tokenize(engine, prompt, "prompt", add_special_tokens=True)
        await _validate(engine, prompt_ids, params, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await _submit(state, request_id, prompt_ids, params, arrival, body.stream)
        view = _CompletionView(state, request_id, len(prompt_ids), body.logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(state, stream, view.chunks(stream, include_usage))
        final = await _final_output(state, stream, request)
        return view.response(final) if final is not None else Response(status_code=499)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        body = parse_request(ChatCompletionRequest,
                             await read_json(request, state.max_body_bytes, state.body_timeout_s))
        _check_model(state, body.model)
        body.check_supported()
        text = await _render_chat(state, [m.as_template_input() for m in body.messages])
        prompt_ids = await _tokenize(engine, text, "messages", add_special_tokens=False)  # the template has any BOS
        max_tokens = body.requested_max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = max(engine.max_model_len - len(prompt_ids), 1)  # too long a prompt: validate says so
        _check_max_tokens(max_tokens, field)
        params = body.sampling_params(max_tokens, logprobs=body.logprobs)
        await _validate(engine, prompt_ids, params, "messages", max_tokens_field=field)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await _submit(state, request_id, prompt_ids, params, arrival, body.stream)
        view = _ChatView(state, request_id, len(prompt_ids), body.logprobs, body.top_logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(state, stream, view.chunks(stream, include_usage))
        final = await _final_output(state, stream, request)
        return view.response(final) if final is not None else Response(status_code=499)

    app.include_router(v1)
    return app


# ---- request handling ---------------------------------------------------------------------------
async def _authorize(request: Request) -> None:
    key = request.app.state.server.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")


def _check_max_tokens(value: int, field: str) -> None:
    if value <= 0:
        raise APIError(400, f"{field} must be at least 1, got {value}", param=field)


async def _render_chat(state: ServerState, messages: list[dict]) -> str:
    if state.templates is None:
        raise APIError(400, "this model has no chat template; send a plain prompt to /v1/completions",
                       param="messages")
    try:
        return await state.templates.render(messages)
    except TemplateBusyError as exc:
        raise APIError(503, str(exc), type="service_unavailable", headers={"Retry-After": "1"}) from None
    except ValueError as exc:  # the template's raise_exception, its errors, its limits
        raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages",
                       code="chat_template_error") from None


async def _tokenize(engine, prompt: str | list[int], field: str, add_special_tokens: bool) -> list[int]:
    """Token ids of a prompt, with work bounded by the context window however long the text is; off the
    event loop (tokenizing holds the GIL, but only for as long as a context window's worth takes)."""
    window = engine.max_model_len
    if isinstance(prompt, list):
        if len(prompt) >= window:
            raise APIError(400, f"{field} has {len(prompt)} tokens; the context window is {window}", param=field)
        return prompt
    if not prompt:
        raise APIError(400, f"{field} is empty", param=field)
    try:
        return await asyncio.to_thread(engine.tokenizer.encode_bounded, prompt, window, add_special_tokens)
    except PromptTooLongError as exc:
        raise APIError(400, f"{field} {exc}; the context window is {window} tokens", param=field) from None


async def _validate(engine, prompt, params, prompt_field: str, max_tokens_field: str = "max_tokens") -> list[int]:
    """Check token ids against the context window and the vocabulary (engine.validate only reads the
    tokenizer and the config, so it is safe beside the engine thread)."""
    try:
        _, ids = await asyncio.to_thread(engine.validate, prompt, params)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        param = max_tokens_field if "max_tokens" in message else prompt_field
        raise APIError(400, message.replace("max_tokens", max_tokens_field), param=param) from None
    return ids


async def _submit(state: ServerState, request_id: str, prompt_ids: list[int], params, arrival: float,
                  stream_deltas: bool) -> RequestStream:
    try:
        return await state.loop.submit(request_id, prompt_ids, params, arrival, stream_deltas)
    except QueueFullError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type="service_unavailable") from None
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param="prompt") from None
    except Exception as exc:
        raise APIError(500, f"the engine could not take the request: {exc}", type="server_error") from None


async def _final_output(state: ServerState, stream: RequestStream, request: Request) -> RequestOutput | None:
    """The finished output, or None when the client disconnected first (the request is aborted)."""

    async def until_finished() -> RequestOutput:
        async for output in stream:
            if output.finished:
                return output
        raise RuntimeError("the request stream ended without a finished output")

    async def until_disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result = asyncio.ensure_future(until_finished())
    gone = asyncio.ensure_future(until_disconnected())
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result.done():
            try:
                final = result.result()
            except EngineDeadError as exc:
                raise APIError(503, str(exc), type="service_unavailable") from None
            except RequestFailedError as exc:
                raise APIError(500, str(exc), type="server_error") from None
            if final.finish_reason == "abort":  # only the server aborts a request whose client is still here
                raise APIError(503, "the server is shutting down; the request was aborted before it finished",
                               type="service_unavailable")
            return final
        return None
    finally:
        result.cancel()
        gone.cancel()
        if not stream.finished:
            state.loop.abort(stream.request_id)


class _SSEResponse(StreamingResponse):
    """A stream that aborts its request however it ends early: a disconnect the ASGI server reports
    (the body iterator is cancelled), a failed send (ASGI spec 2.4), or cancellation at shutdown."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(state: ServerState, stream: RequestStream, chunks) -> _SSEResponse:
    async def events():
        try:
            async for chunk in chunks:  # JSON text (sse.py)
                yield f"data: {chunk}\n\n"
        except EngineDeadError as exc:
            yield f"data: {json.dumps(APIError(503, str(exc), type='service_unavailable').body())}\n\n"
        except RequestFailedError as exc:
            yield f"data: {json.dumps(APIError(500, str(exc), type='server_error').body())}\n\n"
        yield "data: [DONE]\n\n"

    def on_close():
        if not stream.finished:
            state.loop.abort(stream.request_id)

    return _SSEResponse(events(), on_close)


# ---- response bodies ----------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    # cached_tokens: prompt tokens served from the prefix cache, where OpenAI reports them
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _token_strings(state: ServerState, token_ids: list[int]) -> list[str]:
    return [state.engine.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


class _CompletionView:
    """/v1/completions bodies. logprobs: the chosen tokens' logprobs; top_logprobs lists only the
    chosen token, since the engine does not compute the other candidates."""

    def __init__(self, state: ServerState, request_id: str, prompt_tokens: int, logprobs: int | None):
        self.state, self.id, self.prompt_tokens, self.logprobs = state, request_id, prompt_tokens, logprobs
        self.created = int(time.time())
        self.text_offset = 0

    def _logprobs(self, token_ids: list[int], logprobs: list[float] | None) -> dict | None:
        if self.logprobs is None or logprobs is None:
            return None
        tokens = _token_strings(self.state, token_ids)
        values = logprobs[len(logprobs) - len(token_ids):]
        offsets = []
        for token in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(token)
        top = [{t: v} for t, v in zip(tokens, values)] if self.logprobs > 0 else None
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}

    def _body(self, choices: list, usage: dict | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.state.model_name, "choices": choices, "usage": usage}

    def response(self, final: RequestOutput) -> dict:
        choice = {"index": 0, "text": final.text, "logprobs": self._logprobs(final.token_ids, final.logprobs),
                  "finish_reason": final.finish_reason}
        return self._body([choice], _usage(self.prompt_tokens, len(final.token_ids), final.num_cached_tokens))

    async def chunks(self, stream: RequestStream, include_usage: bool):
        """The stream's chunks as JSON text (sse.CompletionChunks): _body's dicts, one choice or the usage."""
        encoded = CompletionChunks(self.id, self.created, self.state.model_name)
        completion_tokens = cached_tokens = 0
        async for output in stream:
            completion_tokens = len(output.token_ids) or completion_tokens + len(output.delta_token_ids)
            cached_tokens = output.num_cached_tokens
            wants_logprobs = self.logprobs is not None and output.delta_token_ids
            if output.delta_text or output.finished or wants_logprobs:
                yield encoded.choice(output.delta_text, self._logprobs(output.delta_token_ids, output.logprobs),
                                     output.finish_reason)
        if include_usage:
            yield encoded.usage(_usage(self.prompt_tokens, completion_tokens, cached_tokens))


class _ChatView:
    """/v1/chat/completions bodies. logprobs: the chosen tokens' logprobs; top_logprobs (if asked)
    lists only the chosen token, since the engine does not compute the other candidates."""

    def __init__(self, state: ServerState, request_id: str, prompt_tokens: int, logprobs: bool,
                 top_logprobs: int | None):
        self.state, self.id, self.prompt_tokens = state, request_id, prompt_tokens
        self.logprobs, self.top_logprobs = logprobs, top_logprobs or 0
        self.created = int(time.time())

    def _logprobs(self, token_ids: list[int], logprobs: list[float] | None) -> dict | None:
        if not self.logprobs or logprobs is None:
            return None
        values = logprobs[len(logprobs) - len(token_ids):]
        content = []
        for token, value in zip(_token_strings(self.state, token_ids), values):
            entry = {"token": token, "logprob": value, "bytes": list(token.encode())}
            entry["top_logprobs"] = [dict(entry)] if self.top_logprobs > 0 else []
            content.append(entry)
        return {"content": content}

    def response(self, final: RequestOutput) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": final.text},
                  "logprobs": self._logprobs(final.token_ids, final.logprobs), "finish_reason": final.finish_reason}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.state.model_name,
                "choices": [choice],
                "usage": _usage(self.prompt_tokens, len(final.token_ids), final.num_cached_tokens)}

    async def chunks(self, stream: RequestStream, include_usage: bool):
        """The stream's chunks as JSON text (sse.ChatChunks): the role, the deltas, the usage (no choices)."""
        encoded = ChatChunks(self.id, self.created, self.state.model_name)
        yield encoded.role()
        completion_tokens = cached_tokens = 0
        async for output in stream:
            completion_tokens = len(output.token_ids) or completion_tokens + len(output.delta_token_ids)
            cached_tokens = output.num_cached_tokens
            wants_logprobs = self.logprobs and output.delta_token_ids
            if output.delta_text or output.finished or wants_logprobs:
                text = output.delta_text if output.delta_text or not output.finished else None
                yield encoded.content(text, self._logprobs(output.delta_token_ids, output.logprobs),
                                      output.finish_reason)
        if include_usage:
            yield encoded.usage(_usage(self.prompt_tokens, completion_tokens, cached_tokens))


class DrainingServer(uvicorn.Server):
    """uvicorn, but shutdown starts the engine loop's drain before waiting for connections to close:
    in-flight requests may finish for `drain_timeout` seconds, then end with finish_reason "abort"
    (streams) or a 503 (non-streamed), so their connections close without uvicorn cancelling the
    handlers (which it would log as tracebacks). Chat template renders still running get a 503 at once."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, drain_timeout: float,
                 templates: TemplateRenderer | None = None):
        super().__init__(config)
        self.engine_loop = engine_loop
        self.drain_timeout = drain_timeout
        self.templates = templates
        self._hurried = False

    async def shutdown(self, sockets=None) -> None:
        self.engine_loop.drain(self.drain_timeout)
        if self.templates is not None:  # a render has not reached the engine yet: 503 rather than wait for it
            self.templates.abort()
        await super().shutdown(sockets)

    def handle_exit(self, sig, frame) -> None:
        """A second SIGINT during the drain aborts the in-flight requests now, and the shutdown goes on as
        before: streams still end with their last chunk and [DONE], non-streamed requests with a 503
        (uvicorn's own force-exit would cancel the handlers mid-response). A third one forces uvicorn out."""
        if self.should_exit and sig == signal.SIGINT and not self._hurried:
            self._hurried = True
            self.engine_loop.drain(0.0)
            return
        super().handle_exit(sig, frame)


class _CountRequests:
    """ASGI middleware: light_moe_http_requests_total{route,status} for the /v1 routes. (Pure ASGI,
    not BaseHTTPMiddleware, which would buffer streams and hide client disconnects.)"""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.count_http_request(route, str(status))
