"""OpenAI API schemas: the requests we accept and the errors we answer with.

Requests are validated strictly (a string where a number belongs is a 400, not a silent cast)
and unknown fields are ignored, as OpenAI does. Fields OpenAI defines that the engine cannot
honour (n > 1, presence/frequency penalties, logit_bias, tools, echo, suffix, best_of > 1) are
refused with a 400 naming the field instead of being silently ignored. Responses are built
as plain dicts in app.py: they are written once per token and need no validation.

The sampling fields' bounds are SamplingParams's (sampling_params.py, the one place that checks
them, for the Python API too); here they only annotate the OpenAPI schema (_bounds).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from light_moe import sampling_params as bounds
from light_moe.sampling_params import SamplingParams

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _whole_number(value):
    """JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees); 16.5 stays a float, and fails."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole_number)]
MAX_LOGPROBS = 20


def _bounds(low=None, high=None, exclusive_low=None, **extra) -> Any:
    """A Field whose bounds appear in the OpenAPI schema only: SamplingParams checks them."""
    schema = {k: v for k, v in (("minimum", low), ("maximum", high), ("exclusiveMinimum", exclusive_low))
              if v is not None}
    return Field(None, json_schema_extra={**schema, **extra})


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int = Field(1, json_schema_extra={"minimum": 1, "maximum": 1})
    temperature: float | None = _bounds(0, bounds.MAX_TEMPERATURE)
    top_p: float | None = _bounds(None, 1, exclusive_low=0)
    seed: Int | None = _bounds(bounds.MIN_SEED, bounds.MAX_SEED)
    stop: str | list[str] | None = _bounds(maxItems=bounds.MAX_STOP_STRINGS, maxLength=bounds.MAX_STOP_STRING_CHARS)
    presence_penalty: float | None = _bounds(0, 0)
    frequency_penalty: float | None = _bounds(0, 0)
    logit_bias: dict[str, float] | None = _bounds(maxProperties=0)
    user: str | None = None
    # extras beyond OpenAI's API, named as vLLM names them
    top_k: Int | None = _bounds(-1, bounds.MAX_TOP_K)
    min_p: float | None = _bounds(0, 1)
    repetition_penalty: float | None = _bounds(bounds.MIN_REPETITION_PENALTY, bounds.MAX_REPETITION_PENALTY)
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = _bounds(maxItems=bounds.MAX_STOP_TOKEN_IDS,
                                               items={"type": "integer", "minimum": 0, "maximum": bounds.MAX_INT32})

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0 is accepted), got {value}; "
                               "use repetition_penalty instead", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def sampling_params(self, max_tokens: int, logprobs: bool) -> SamplingParams:
        """Build the engine's SamplingParams; its ValueError becomes a 400 naming the field."""
        kwargs: dict[str, Any] = dict(max_tokens=max_tokens, logprobs=logprobs, ignore_eos=self.ignore_eos)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                     "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            message = str(exc)
            field = message.split(" ", 1)[0]
            raise APIError(400, message, param=field if field in kwargs else None) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[Int] | list[str] | list[list[Int]]
    max_tokens: Int | None = _bounds(1)  # the app adds the context window as the maximum
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, json_schema_extra={"enum": [False]})  # the schema says what check_supported refuses
    suffix: str | None = _bounds(maxLength=0)
    best_of: Int | None = _bounds(1, 1)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, f"best_of must be 1, got {self.best_of}", param="best_of")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request: a string or a list of token ids (a batch of one is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} prompts; send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        return prompt


class TextContent(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # Both reach the chat template verbatim: free text there could spell special tokens (a role of
    # "user|>\n<|system") and forge turns, so they are restricted.
    role: Literal[CHAT_ROLES]
    content: str | list[TextContent] | None = None
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = _bounds(1)
    max_completion_tokens: Int | None = _bounds(1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = _bounds(maxItems=0)

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise APIError(400, "tools (function calling) are not supported", param="tools")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _is_union_tag(loc_part: str | int) -> bool:
    """pydantic names the union member that failed in the error location ('str', 'list[int]')."""
    return isinstance(loc_part, str) and (loc_part in _UNION_TAGS or "[" in loc_part)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "none"})


def parse_request(model: type[_Strict], payload: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its top-level field."""
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        # For a union field pydantic reports one error per member; the deepest is the most specific
        # (stop=["a", 3] -> "stop.1: Input should be a valid string", not "stop: ... valid string").
        first_field = exc.errors()[0]["loc"][:1]
        error = max((e for e in exc.errors() if e["loc"][:1] == first_field), key=lambda e: len(e["loc"]))
        loc = error["loc"]
        field = str(loc[0]) if loc else None
        if field == "prompt" and error["type"] != "missing":
            message = "prompt must be a string or a list of token ids"
        else:
            path = ".".join(str(p) for p in loc if not _is_union_tag(p))
            message = f"{path}: {error['msg']}" if path else error["msg"]
            if error["type"] != "missing":
                message += f" (got {error['input']!r:.60})"
        raise APIError(400, message, param=field) from None
