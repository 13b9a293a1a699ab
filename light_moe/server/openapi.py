"""The OpenAPI schema at /openapi.json: request bodies, every response and its media type.

The routes read their bodies themselves (size and time limits, strict parsing: body.py, protocol.py), so
FastAPI cannot infer the schema from their signatures; it is assembled here from the pydantic request
models (the sampling bounds come from SamplingParams through them) plus the context window of the engine
being served, so that schema-driven clients and fuzzers (schemathesis, in tests/test_server_schema.py)
build valid requests and know each status they may get.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from light_moe.server.protocol import ChatCompletionRequest, CompletionRequest

_ERRORS = {
    "400": "invalid request: malformed or non-standard JSON, a wrong type or value, a prompt too long for the "
           "context window, an unsupported field, a chat template that refused the messages or passed its limits",
    "401": "missing or wrong API key (only with --api-key)",
    "404": "unknown model",
    "408": "the request body did not arrive in time",
    "413": "the request body is over --max-body-bytes",
    "429": "too many requests waiting (--max-waiting); see Retry-After",
    "500": "the request failed inside the engine (the engine and other requests go on)",
    "503": "the engine is not running or shutting down, or every chat template worker is busy",
}
_ROUTE_ERRORS = {
    ("/v1/completions", "post"): ("400", "401", "404", "408", "413", "429", "500", "503"),
    ("/v1/chat/completions", "post"): ("400", "401", "404", "408", "413", "429", "500", "503"),
    ("/v1/models", "get"): ("401",),
    ("/health", "get"): ("503",),
    ("/metrics", "get"): (),
}
_NULLABLE_STRING = {"type": ["string", "null"]}
_FINISH_REASON = {"type": ["string", "null"], "enum": ["stop", "length", "abort", "capacity", None]}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {**{k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
                         "prompt_tokens_details": {"type": "object", "required": ["cached_tokens"],
                                                   "properties": {"cached_tokens": {"type": "integer"}}}}}


def _object(required: list[str], **properties) -> dict:
    return {"type": "object", "required": required, "properties": properties}


_SCHEMAS = {
    "ErrorResponse": _object(["error"], error=_object(
        ["message", "type", "param", "code"], message={"type": "string"}, type={"type": "string"},
        param=_NULLABLE_STRING, code=_NULLABLE_STRING)),
    "CompletionResponse": _object(
        ["id", "object", "created", "model", "choices"], id={"type": "string"}, object={"const": "text_completion"},
        created={"type": "integer"}, model={"type": "string"},
        choices={"type": "array", "items": _object(["index", "text", "finish_reason"], index={"type": "integer"},
                                                   text={"type": "string"}, logprobs={"type": ["object", "null"]},
                                                   finish_reason=_FINISH_REASON)},
        usage={"anyOf": [_USAGE, {"type": "null"}]}),
    "ChatCompletionResponse": _object(
        ["id", "object", "created", "model", "choices"], id={"type": "string"}, object={"const": "chat.completion"},
        created={"type": "integer"}, model={"type": "string"},
        choices={"type": "array", "items": _object(
            ["index", "message", "finish_reason"], index={"type": "integer"},
            message=_object(["role", "content"], role={"const": "assistant"}, content={"type": "string"}),
            logprobs={"type": ["object", "null"]}, finish_reason=_FINISH_REASON)},
        usage={"anyOf": [_USAGE, {"type": "null"}]}),
    "ModelList": _object(["object", "data"], object={"const": "list"}, data={"type": "array", "items": _object(
        ["id", "object", "created", "owned_by", "max_model_len"], id={"type": "string"}, object={"const": "model"},
        created={"type": "integer"}, owned_by={"type": "string"}, max_model_len={"type": "integer"})}),
    "Health": _object(["status"], status={"const": "ok"}),
}
# with stream: true, server-sent events: one per chunk (its data a JSON chunk, or an error body), then
# 'data: [DONE]'; the schema is that of one event
_STREAM = {"text/event-stream": {"schema": _object(["data"], data={"type": "string"}, event={"type": "string"})}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict:
    return {"application/json": {"schema": _ref(name)}}


def _request_schema(model, components: dict, model_name: str, max_tokens: int, vocab_size: int) -> dict:
    """The request model's schema, with what only the served engine knows: its name, context, vocabulary."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    properties = schema["properties"]
    properties["model"]["anyOf"] = [{"const": model_name}, {"type": "null"}]
    for field in ("max_tokens", "max_completion_tokens"):
        if field in properties:
            properties[field]["maximum"] = max_tokens
    if "prompt" in properties:  # one non-empty prompt: text, token ids, or a batch of exactly one of those
        token_ids = {"type": "array", "minItems": 1,
                     "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
        text = {"type": "string", "minLength": 1}
        properties["prompt"] = {"anyOf": [text, token_ids, {"type": "array", "items": text, "minItems": 1,
                                                             "maxItems": 1},
                                          {"type": "array", "items": token_ids, "minItems": 1, "maxItems": 1}]}
    return schema


def build_openapi(app: FastAPI, model_name: str, max_model_len: int, vocab_size: int, api_key: bool) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(_SCHEMAS)
    max_tokens = max(max_model_len - 1, 1)  # at least one prompt token
    for name, model in (("CompletionRequest", CompletionRequest), ("ChatCompletionRequest", ChatCompletionRequest)):
        components[name] = _request_schema(model, components, model_name, max_tokens, vocab_size)
    ok = {
        ("/v1/completions", "post"): {**_json("CompletionResponse"), **_STREAM},
        ("/v1/chat/completions", "post"): {**_json("ChatCompletionResponse"), **_STREAM},
        ("/v1/models", "get"): _json("ModelList"),
        ("/health", "get"): _json("Health"),
        ("/metrics", "get"): {"text/plain": {"schema": {"type": "string"}}},
    }
    bodies = {("/v1/completions", "post"): "CompletionRequest",
              ("/v1/chat/completions", "post"): "ChatCompletionRequest"}
    for (path, method), errors in _ROUTE_ERRORS.items():
        operation = schema["paths"][path][method]
        responses = {"200": {"description": "OK", "content": ok[(path, method)]}}
        for status in errors:
            if status == "401" and not api_key:
                continue
            responses[status] = {"description": _ERRORS[status], "content": _json("ErrorResponse")}
        operation["responses"] = responses
        if (path, method) in bodies:
            operation["requestBody"] = {"required": True, "content": _json(bodies[(path, method)])}
        if api_key and path.startswith("/v1/"):
            operation["security"] = [{"bearer": []}]
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return schema
