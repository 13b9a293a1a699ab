"""Per-request sampling parameters, validated once at construction: the one place where every bound lives.

The Python API and the HTTP server both build a SamplingParams, so a value the engine cannot handle is
refused here (ValueError naming the field; the server answers 400) and never reaches the engine thread.
Every numeric field is bounded, both for meaning (top_p in (0, 1]) and for the engine's sake: integers
must fit int32/int64 tensors and floats must be finite. docs/server.md lists the same bounds.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field

MAX_INT32 = 2**31 - 1
# Below this a positive temperature samples greedily: logits / t overflow float32 long before t reaches 0
# (t = 1e-38 is 0 or a denormal on the device), and the distribution is a one-hot to float precision anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
# top_k above the vocabulary means "no top-k filter"; the sampler clamps it to the vocabulary.
MAX_TOP_K = MAX_INT32
# A tiny penalty multiplies logits by up to 1 / penalty: keep them finite in float32.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# torch.Generator.manual_seed accepts [-2**63, 2**64).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
# Stop strings are searched in the text after every token: their number and length bound that work.
MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS = 16, 256
MAX_STOP_TOKEN_IDS = 256


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)  # int, or numpy's integers; never a float
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r:.40}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return value


def _check_real(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler and of the stop logic.

    temperature 0 means greedy (as does any temperature below MIN_SAMPLING_TEMPERATURE). top_k 0 (or -1)
    and top_p 1 and min_p 0 disable those filters. seed makes the request's sampling reproducible on its
    own, whatever else is in the batch: each seeded request owns a torch.Generator.

    Bounds (ValueError otherwise): max_tokens in [1, 2**31 - 1] (the engine also checks it against the
    context window); temperature in [0, 100]; top_k -1, 0 or [1, 2**31 - 1]; top_p in (0, 1]; min_p in
    [0, 1]; repetition_penalty in [0.01, 100]; seed in [-2**63, 2**64 - 1]; at most 16 non-empty stop
    strings of at most 256 characters; at most 256 stop_token_ids in [0, 2**31 - 1].
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    include_stop_str_in_output: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_tokens", _check_int("max_tokens", self.max_tokens, 1, MAX_INT32))
        temperature = _check_real("temperature", self.temperature)
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        object.__setattr__(self, "temperature", temperature)
        if self.top_k is None:
            raise ValueError("top_k must be -1, 0 (disabled) or positive, got None")
        object.__setattr__(self, "top_k", _check_int("top_k", self.top_k, -1, MAX_TOP_K))
        top_p = _check_real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "top_p", top_p)
        min_p = _check_real("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        object.__setattr__(self, "min_p", min_p)
        penalty = _check_real("repetition_penalty", self.repetition_penalty)
        if not MIN_REPETITION_PENALTY <= penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                             f"{MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty!r}")
        object.__setattr__(self, "repetition_penalty", penalty)
        if self.seed is not None:
            object.__setattr__(self, "seed", _check_int("seed", self.seed, MIN_SEED, MAX_SEED))
        self._normalize_stops()
        for name in ("ignore_eos", "logprobs", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")

    def _normalize_stops(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r:.40}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got one of "
                                 f"{len(s)}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids or ())
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        ids = tuple(_check_int("stop_token_ids", token_id, 0, MAX_INT32) for token_id in ids)
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE
