"""Tokenizer: the HF `tokenizers` fast tokenizer from tokenizer.json, special tokens and the chat
template from tokenizer_config.json, rendered with jinja2 the way transformers renders it.
No dependency on transformers at run time.

Bounded work, whatever the input (issue 19):
  - encode_bounded(text, max_tokens) refuses a text longer than max_tokens tokens could spell (characters
    per token are bounded by the vocabulary's longest token) before tokenizing anything, and tokenizes a
    long text in growing prefixes, stopping as soon as one is over max_tokens, so the work follows the
    context window, not the size of the text (encode holds the GIL: a megabyte-sized prompt would stall
    every thread of the server).
  - The chat template is compiled once per tokenizer and rendered in a sandbox that bounds time, output
    size and the size of what its operators build (engine/chat_template.py).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tokenizers import Tokenizer as FastTokenizer

from light_moe.engine.chat_template import DEFAULT_TEMPLATE_MAX_CHARS, DEFAULT_TEMPLATE_TIME_LIMIT_S, ChatTemplate

# A prefix cut inside a word (or a special token's text) may tokenize to a few more tokens than the same
# characters do inside the whole text: a prefix must exceed the limit by this much to prove the text does.
_PREFIX_SLACK_TOKENS = 32
# Normalizers may shrink text (NFKC composes characters): allow this many characters per vocabulary character.
_NORMALIZER_SHRINK = 4


class PromptTooLongError(ValueError):
    """The text is known to have more tokens than allowed, without having been tokenized in full."""


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
        # Upper bound of the characters one token stands for: the vocabulary's longest entry (a byte-level or
        # metaspace entry has a character per byte or character it decodes to; byte-fallback entries, longer
        # than their byte, only loosen the bound), times the shrink a normalizer may apply.
        longest = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        shrink = _NORMALIZER_SHRINK if self._tok.normalizer is not None else 1
        self.max_chars_per_token = max(longest, 1) * shrink
        self._compiled: ChatTemplate | None = None
        self._compile_lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def max_chars(self, max_tokens: int) -> int:
        """The most characters a text of max_tokens tokens can have."""
        return max_tokens * self.max_chars_per_token

    def encode_bounded(self, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        """encode(text), or PromptTooLongError once the text is known to have more than max_tokens tokens.

        The work is bounded by max_tokens: a text with more characters than max_tokens tokens can spell is
        refused untokenized; a longer text than a few characters per token is tokenized in prefixes growing
        4x, and refused as soon as one prefix is clearly over the limit. A result may still be a little over
        max_tokens (the caller checks the exact count)."""
        limit = self.max_chars(max_tokens)
        if len(text) > limit:
            raise PromptTooLongError(
                f"has {len(text)} characters, more than {max_tokens} tokens can hold (at most "
                f"{self.max_chars_per_token} characters per token with this tokenizer)")
        size = max(4 * max_tokens, 4096)
        while size < len(text):
            cut = text.rfind(" ", size - 256, size)  # at a word boundary where there is one nearby
            probe = self.encode(text[:cut if cut > 0 else size], add_special_tokens)
            if len(probe) > max_tokens + _PREFIX_SLACK_TOKENS:
                raise PromptTooLongError(f"has more than {max_tokens} tokens (its first {size} characters alone "
                                         f"are {len(probe)} tokens)")
            size *= 4
        return self.encode(text, add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def compiled_chat_template(self) -> ChatTemplate:
        """This tokenizer's chat template, compiled on first use (once: renders only run it)."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; send a plain prompt instead")
        with self._compile_lock:
            if self._compiled is None:
                self._compiled = ChatTemplate(self.chat_template, self.bos_token, self.eos_token)
        return self._compiled

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            time_limit_s: float = DEFAULT_TEMPLATE_TIME_LIMIT_S,
                            max_chars: int = DEFAULT_TEMPLATE_MAX_CHARS) -> str:
        return self.compiled_chat_template().render(messages, add_generation_prompt, time_limit_s=time_limit_s,
                                                    max_chars=max_chars)


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

    def update(self, output_ids: list[int], end: int | None = None) -> str:
        """Take in output_ids[:end] (all of them without end)."""
        end = len(output_ids) if end is None else end
        prefix_text = self.tokenizer.decode(output_ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(output_ids[self.prefix_offset:end])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.text += delta
        self.prefix_offset, self.read_offset = self.read_offset, end
        return delta
