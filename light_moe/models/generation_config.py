"""generation_config.json: the token ids a checkpoint adds to config.json's, read and validated with
config.json (loader.load_model_config), before any weight loads.

Only what the engine uses is read: eos_token_id (one id or a list; they stop generation together
with config.json's and the tokenizer's), bos_token_id and pad_token_id (checked for type only).
The sampling defaults (temperature, top_p, ...) are not applied: requests carry their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from light_moe.config import hf_int, hf_token_ids, read_json_object

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None


def read_generation_config(model_path: str | Path) -> GenerationConfig:
    """The model directory's generation_config.json (defaults when there is none); a file that is not
    a JSON object or holds a token id that is not a non-negative integer is an error naming it."""
    path = Path(model_path) / GENERATION_CONFIG
    if not path.is_file():
        return GenerationConfig()
    raw = read_json_object(path)
    source = str(path)
    return GenerationConfig(eos_token_ids=hf_token_ids(raw, "eos_token_id", source),
                            bos_token_id=hf_int(raw, "bos_token_id", None, source=source),
                            pad_token_id=hf_int(raw, "pad_token_id", None, source=source))
