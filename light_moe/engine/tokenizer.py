"""Tokenizer: the HF `tokenizers` fast tokenizer from tokenizer.json, special tokens and the chat
template from tokenizer_config.json, rendered with jinja2 the way transformers renders it.
No dependency on transformers at run time."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} is missing: Light-MoE needs a fast tokenizer (tokenizer.json)")
        try:
            self._tok = FastTokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise ValueError(f"{tok_file} could not be read: {exc}") from exc
        cfg_file = path / "tokenizer_config.json"
        cfg = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from exc
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = cfg.get("chat_template")
        template_file = path / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template = template_file.read_text()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; send a plain prompt instead")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class IncrementalDetokenizer:
    """Text of the generated tokens so far, grown by increments that never split a UTF-8 character.

    Each update decodes only a short window of recent tokens, not the whole output (which made
    detokenisation O(n^2) per request and the largest host cost of a batch-64 decode step): the
    text a new token adds is decode(ids[prefix:]) minus decode(ids[prefix:read]), where `prefix`
    trails `read` by the tokens of the previous increment, so decoders whose output for a token
    depends on its left neighbour (leading-space rules, characters split over byte tokens) see
    that context. This is the scheme vLLM uses. A window ending in U+FFFD (an incomplete
    character) or adding no text is held until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def update(self, output_ids: list[int]) -> str:
        prefix_text = self.tokenizer.decode(output_ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(output_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.text += delta
        self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
        return delta
