"""Bounded work for text inputs (issue 19): chat templates render under time and size limits whatever the
template does, are compiled once per tokenizer, and a long prompt is refused after tokenizing a bounded
prefix of it, never in full."""
import threading
import time

import pytest

from light_moe.engine.chat_template import ChatTemplate, TemplateLimitError
from light_moe.engine.tokenizer import PromptTooLongError, Tokenizer
from tests.tiny_models import save_tokenizer

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
LIMIT = 100_000

HOSTILE = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string times 4 GiB": "{{ 'x' * 4*1024**3 }}",
    "integer power": "{{ 7 ** 100000 }}",
    "integer squaring": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                        "{% endfor %}",
    "center filter": "{{ 'x'|center(10**9) }}",
    "join amplifies": "{{ range(100000)|join('x' * 1000) }}",
    "replace amplifies": "{% set big = 'y' * 50000 %}{{ big|replace('y', big) }}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "format a list": "{% set big = 'y' * 50000 %}{{ '{}'.format([big] * 1000) }}",
    "output grows": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "namespace doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                                 "{% endfor %}",
    "namespace doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                                 "{% endfor %}",
    "macro recursion": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
    "block capture": "{% set big = 'y' * 50000 %}{% set x %}{% for i in range(1000) %}{{ big }}{% endfor %}"
                     "{% endset %}{{ x }}",
    "printing a list": "{% set big = 'y' * 50000 %}{{ [big] * 1000 }}",
}


@pytest.mark.parametrize("source", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_templates_stop_at_a_limit(source):
    template = ChatTemplate(source, "<s>", "</s>")
    start = time.monotonic()
    with pytest.raises(TemplateLimitError):
        template.render(MESSAGES, time_limit_s=1.0, max_chars=LIMIT)
    assert time.monotonic() - start < 3.0


def test_ordinary_templates_render_as_before():
    source = ("{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' }}{{ m.content | trim }}{% if loop.last %}!"
              "{% endif %}{% endfor %}{{ messages|length }}{{ range(3)|list }}{{ 'a,b'.split(',') }}"
              "{{ '{:>3}'.format('x') }}{{ '%-3s|' % 'ab' }}{{ messages[-1]|tojson }}{{ bos_token }}")
    got = ChatTemplate(source, "<s>", "</s>").render(MESSAGES, max_chars=LIMIT)
    assert got == ("<|system|>Be terse.<|user|>hi!2[0, 1, 2]['a', 'b']  xab |"
                   '{"content": "hi", "role": "user"}<s>')
    with pytest.raises(ValueError, match="no system"):
        ChatTemplate("{{ raise_exception('no system') }}", None, None).render(MESSAGES)


def test_limits_are_per_render_and_per_thread():
    """A render that runs out of time in one thread does not cut short another thread's render."""
    template = ChatTemplate("{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}ok",
                            None, None)
    results = {}

    def render(name, limit):
        try:
            results[name] = template.render(MESSAGES, time_limit_s=limit)
        except TemplateLimitError:
            results[name] = "limit"

    threads = [threading.Thread(target=render, args=("short", 0.05)),
               threading.Thread(target=render, args=("long", 60.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"short": "limit", "long": "ok"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return Tokenizer(path)


def test_the_template_is_compiled_once(tokenizer):
    first = tokenizer.compiled_chat_template()
    assert tokenizer.compiled_chat_template() is first
    assert tokenizer.apply_chat_template(MESSAGES) == "<|system|>\nBe terse.\n<|user|>\nhi\n<|assistant|>\n"


def test_encode_bounded_refuses_long_text_without_tokenizing_it(tokenizer, monkeypatch):
    calls = []
    real = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, *a: calls.append(len(text)) or real(text, *a))
    with pytest.raises(PromptTooLongError, match="characters"):
        tokenizer.encode_bounded("x" * 8_000_000, 1024)
    assert calls == []  # refused on its length alone
    # dense text under the character bound: refused after a prefix of a few characters per allowed token
    text = "The quick brown fox " * (tokenizer.max_chars(1024) // 20)
    with pytest.raises(PromptTooLongError, match="more than 1024 tokens"):
        tokenizer.encode_bounded(text, 1024)
    assert calls and max(calls) <= 4 * 4096
    # under the limit: exactly encode()
    calls.clear()
    short = "def fibonacci(n): return n " * 20
    assert tokenizer.encode_bounded(short, 1024) == real(short)


def test_encode_bounded_never_refuses_a_text_that_fits(tokenizer):
    """Texts of long tokens (whitespace runs) spend many characters per token: the prefix probes must not
    mistake them for long prompts."""
    for text in [" " * 9000, "\n" * 9000, "x" * 9000, ("def f(x):\n" + " " * 64) * 100]:
        ids = tokenizer.encode(text)
        limit = len(ids) + 1
        if len(text) <= tokenizer.max_chars(limit):
            assert tokenizer.encode_bounded(text, limit) == ids
