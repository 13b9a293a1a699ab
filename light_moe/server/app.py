"""The OpenAI-compatible HTTP API: build_app(engine, ...) -> FastAPI application.

    POST /v1/completions, POST /v1/chat/completions  (stream: true -> server-sent events, [DONE])
    GET  /v1/models, GET /health, GET /metrics

A request is read (size-limited), parsed strictly, tokenized and checked against the context
window here, so every bad input is a 4xx before anything is queued; then it goes to the
engine thread (engine_loop.py). A client that goes away has its request aborted: streams
when the ASGI server reports the disconnect (or a send fails), non-streamed requests by
listening for http.disconnect while the engine works.

Default max_tokens when the request leaves it out: 16 for /v1/completions (OpenAI's legacy
default), and the whole remaining context for /v1/chat/completions (as vLLM does).
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from light_moe.engine.outputs import RequestOutput
from light_moe.server.engine_loop import EngineDeadError, EngineLoop, QueueFullError, RequestStream
from light_moe.server.metrics import ServerMetrics
from light_moe.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from light_moe.server.serve import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING

DEFAULT_COMPLETION_MAX_TOKENS = 16
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


class ServerState:
    """What the routes share: the engine loop, the names, the limits."""

    def __init__(self, engine, served_model_name: str | None, api_key: str | None, max_waiting: int | None,
                 max_body_bytes: int, expert_sync_interval_s: float):
        self.engine = engine
        self.model_name = served_model_name or engine.model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = ServerMetrics(self.model_name, expert_sync_interval_s)
        self.loop = EngineLoop(engine, self.metrics, max_waiting)
        self.created = int(time.time())


def build_app(engine, *, served_model_name: str | None = None, api_key: str | None = None,
              max_waiting: int | None = DEFAULT_MAX_WAITING, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              expert_sync_interval_s: float = 1.0, engine_shutdown_timeout_s: float = 10.0) -> FastAPI:
    """An app serving `engine`. Its engine thread starts and stops with the app's lifespan."""
    state = ServerState(engine, served_model_name, api_key, max_waiting, max_body_bytes, expert_sync_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(state.loop.shutdown, engine_shutdown_timeout_s)

    app = FastAPI(title="Light-MoE", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(_CountRequests, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            raise APIError(503, "the engine is not running", type="service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
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
        body = parse_request(CompletionRequest, await _read_json(request, state.max_body_bytes))
        _check_model(state, body.model)
        body.check_supported()
        prompt = body.single_prompt()
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        _check_max_tokens(max_tokens, "max_tokens")
        params = body.sampling_params(max_tokens, logprobs=body.logprobs is not None)
        prompt_ids = await _validate(engine, prompt, params, "prompt")
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
        body = parse_request(ChatCompletionRequest, await _read_json(request, state.max_body_bytes))
        _check_model(state, body.model)
        body.check_supported()
        messages = [m.as_template_input() for m in body.messages]
        prompt_ids = await asyncio.to_thread(_chat_prompt, engine, messages)
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


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body has {length} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")


def _check_max_tokens(value: int, field: str) -> None:
    if value <= 0:
        raise APIError(400, f"{field} must be at least 1, got {value}", param=field)


def _chat_prompt(engine, messages: list[dict]) -> list[int]:
    try:
        return engine.apply_chat_template(messages)
    except Exception as exc:  # a template may raise anything (jinja errors, raise_exception)
        raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages") from None


async def _validate(engine, prompt, params, prompt_field: str, max_tokens_field: str = "max_tokens") -> list[int]:
    """Tokenize and check against the context window and vocabulary (engine.validate only reads the
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
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except EngineDeadError as exc:
            yield f"data: {json.dumps(APIError(503, str(exc), type='service_unavailable').body())}\n\n"
        yield "data: [DONE]\n\n"

    def on_close():
        if not stream.finished:
            state.loop.abort(stream.request_id)

    return _SSEResponse(events(), on_close)


# ---- response bodies ----------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
        return self._body([choice], _usage(self.prompt_tokens, len(final.token_ids)))

    async def chunks(self, stream: RequestStream, include_usage: bool):
        completion_tokens = 0
        async for output in stream:
            completion_tokens = len(output.token_ids) or completion_tokens + len(output.delta_token_ids)
            wants_logprobs = self.logprobs is not None and output.delta_token_ids
            if output.delta_text or output.finished or wants_logprobs:
                choice = {"index": 0, "text": output.delta_text,
                          "logprobs": self._logprobs(output.delta_token_ids, output.logprobs),
                          "finish_reason": output.finish_reason}
                yield self._body([choice], None)
        if include_usage:
            yield self._body([], _usage(self.prompt_tokens, completion_tokens))


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

    def _chunk(self, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.state.model_name, "usage": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def response(self, final: RequestOutput) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": final.text},
                  "logprobs": self._logprobs(final.token_ids, final.logprobs), "finish_reason": final.finish_reason}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.state.model_name,
                "choices": [choice], "usage": _usage(self.prompt_tokens, len(final.token_ids))}

    async def chunks(self, stream: RequestStream, include_usage: bool):
        yield self._chunk({"role": "assistant", "content": ""})
        completion_tokens = 0
        async for output in stream:
            completion_tokens = len(output.token_ids) or completion_tokens + len(output.delta_token_ids)
            wants_logprobs = self.logprobs and output.delta_token_ids
            if output.delta_text or output.finished or wants_logprobs:
                delta = {"content": output.delta_text} if output.delta_text or not output.finished else {}
                yield self._chunk(delta, self._logprobs(output.delta_token_ids, output.logprobs),
                                  output.finish_reason)
        if include_usage:
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(self.prompt_tokens, completion_tokens)
            yield usage_chunk


class DrainingServer(uvicorn.Server):
    """uvicorn, but shutdown starts the engine loop's drain before waiting for connections to close:
    in-flight requests may finish for `drain_timeout` seconds, then end with finish_reason "abort"
    (streams) or a 503 (non-streamed), so their connections close without uvicorn cancelling the
    handlers (which it would log as tracebacks)."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, drain_timeout: float):
        super().__init__(config)
        self.engine_loop = engine_loop
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        self.engine_loop.drain(self.drain_timeout)
        await super().shutdown(sockets)


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
            self.metrics.http_requests.labels(route=route, status=str(status)).inc()
