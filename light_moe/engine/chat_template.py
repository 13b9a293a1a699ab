"""Chat templates compiled once and rendered with bounded work: ChatTemplate(source, bos, eos).render(messages).

A chat template is code that came with the checkpoint, and its input (the messages) comes from clients.
jinja2's immutable sandbox already keeps it from reaching attributes or mutating data; _BoundedSandbox
also bounds what one render may cost:
  - time: every call, filter, attribute or item access, intercepted operator, `~` concatenation, output
    value and range() step checks the render's deadline (nested range loops end when the time is up);
  - size: operators, `~`, str.format, filters, block captures and output values refuse to build a string,
    list or integer beyond the render's limit, before building it where its size is known ahead
    ('x' * 4 * 1024**3 allocates nothing);
  - output: the rendered text is counted as it is generated.
Loops over lists the template did not build with range() are bounded by their data. The server renders in
worker processes it can kill and whose memory is capped (server/template_worker.py): the in-sandbox limits
give clear errors for the usual cases, the process for whatever they miss.

This module imports nothing from light_moe (only jinja2): the template worker loads it by path, without the
package and torch behind it.
"""
from __future__ import annotations

import functools
import itertools
import re
import string
import threading
import time

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

DEFAULT_TEMPLATE_TIME_LIMIT_S = 10.0
DEFAULT_TEMPLATE_MAX_CHARS = 8 * 1024 * 1024
_MAX_INT_BITS = 4096  # templates count and index; they never need larger numbers
_MAX_NESTING = 32


class TemplateLimitError(ValueError):
    """A chat template went past a limit: time, output size, or the size of a value it built."""


def _text_size(value, limit: int, depth: int = 0) -> int:
    """About len(str(value)), from a walk that stops once past `limit` (containers count their items)."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, dict):
        items = itertools.chain.from_iterable(value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    elif isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 3 + 2
    else:
        return 32
    if depth > _MAX_NESTING:
        return limit + 1
    total = 2
    for item in items:
        total += _text_size(item, limit - total, depth + 1) + 2
        if total > limit:
            break
    return total


def _length(value) -> int | None:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else None


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d+))?")


class _Budget(threading.local):
    """One render's limits; thread-local, so renders in other threads keep their own."""

    deadline = float("inf")
    time_limit_s = DEFAULT_TEMPLATE_TIME_LIMIT_S
    max_chars = DEFAULT_TEMPLATE_MAX_CHARS


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` compiles to a join of its parts; the parts pass environment.checked_parts first."""

    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"{func_name}(environment.checked_parts((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **options) -> None:
        super().__init__(finalize=self._finalize, **options)
        self.budget = _Budget()
        self.globals.pop("lipsum", None)  # lipsum(n=10**6) generates text in a loop no hook sees
        self.globals["range"] = self._range
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    # ---- the checks ----
    def tick(self) -> None:
        if time.monotonic() > self.budget.deadline:
            raise TemplateLimitError(f"the chat template ran longer than {self.budget.time_limit_s:g} s")

    def refuse_over(self, size: int, what: str) -> None:
        if size > self.budget.max_chars:
            raise TemplateLimitError(f"the chat template builds a value of {size} items with {what}; the limit "
                                     f"is {self.budget.max_chars}")

    def check_value(self, value, what: str) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
            raise TemplateLimitError(f"the chat template builds an integer of over {_MAX_INT_BITS} bits with {what}")
        length = _length(value)
        if length is not None:
            self.refuse_over(length, what)

    def text_size(self, value) -> int:
        return _text_size(value, self.budget.max_chars)

    # ---- jinja2's hooks ----
    def _finalize(self, value):
        """Every {{ value }} of the output: its text must fit before str() builds it."""
        self.tick()
        self.refuse_over(self.text_size(value), "an output expression")
        return value

    def checked_parts(self, parts: tuple) -> tuple:
        self.tick()
        self.refuse_over(sum(self.text_size(p) for p in parts), "'~'")
        return parts

    def concat(self, pieces) -> str:  # block captures ({% set x %}...{% endset %}) and macro bodies
        pieces = list(pieces)
        self.refuse_over(sum(len(p) for p in pieces), "a block")
        return "".join(pieces)

    def call_binop(self, context, op: str, left, right):
        self.tick()
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if _length(seq) is not None and isinstance(n, int):
                    self.refuse_over(_length(seq) * max(n, 0), "'*'")
            if isinstance(left, int) and isinstance(right, int):
                self.check_value(1 << (left.bit_length() + right.bit_length()), "'*'")
        elif op == "+" and _length(left) is not None and _length(right) is not None:
            self.refuse_over(_length(left) + _length(right), "'+'")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(left.bit_length() - 1, 0) * right > _MAX_INT_BITS:
                raise TemplateLimitError(f"the chat template raises an integer past {_MAX_INT_BITS} bits")
        elif op == "%" and isinstance(left, str):
            widths = sum(int(w or 0) + int(p or 0) for w, p in _PERCENT_FIELD.findall(left))
            self.refuse_over(len(left) + widths + self.text_size(right), "'%'")
        result = super().call_binop(context, op, left, right)
        self.check_value(result, f"'{op}'")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        __self.tick()
        for arg in itertools.chain(args, kwargs.values()):  # macro recursion cannot grow its arguments
            __self.check_value(arg, "a call's argument")
        result = super().call(__context, __obj, *args, **kwargs)
        __self.check_value(result, "a call")
        return result

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        """str.format / format_map: the widths in the format and the arguments' text must fit."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapper)
        def bounded(*args, **kwargs):
            self.tick()
            fields = list(string.Formatter().parse(fmt))
            widths = sum(int(d) for _, _, spec, _ in fields if spec for d in re.findall(r"\d+", spec))
            arguments = list(args) + list(kwargs.values())
            biggest = max((self.text_size(a) for a in arguments), default=0)
            self.refuse_over(len(fmt) + widths + biggest * sum(1 for f in fields if f[1] is not None), "format")
            return wrapper(*args, **kwargs)

        return bounded

    def _range(self, *args):
        return _TickingRange(safe_range(*args), self.tick)  # safe_range: at most MAX_RANGE items

    def _bounded_filter(self, name: str, f):
        first_param = 2 if hasattr(f, "jinja_pass_arg") else 1  # after the context / environment it is passed

        @functools.wraps(f)
        def bounded(*args, **kwargs):
            self.tick()
            params = list(args[first_param:]) + list(kwargs.values())
            for arg in params:
                if isinstance(arg, int) and not isinstance(arg, bool) and arg > self.budget.max_chars:
                    raise TemplateLimitError(f"the chat template passes {arg} to the filter '{name}'; the limit "
                                             f"is {self.budget.max_chars}")
            if len(args) >= first_param:  # the filtered value's text, and what join / replace multiply it by
                value = args[first_param - 1]
                grow = sum(self.text_size(p) for p in params if isinstance(p, str))
                items = len(value) if name in ("join", "replace") and hasattr(value, "__len__") else 1
                self.refuse_over(self.text_size(value) + grow * items, f"the filter '{name}'")
            result = f(*args, **kwargs)
            self.check_value(result, f"the filter '{name}'")
            return result

        return bounded


class _TickingRange:
    """range() for templates: iterating it checks the render's deadline, so nested loops end in time."""

    def __init__(self, values: range, tick):
        self._values, self._tick = values, tick

    def __iter__(self):
        for i, value in enumerate(self._values):
            if i % 256 == 0:
                self._tick()
            yield value

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, index):
        return self._values[index]

    def __contains__(self, value) -> bool:
        return value in self._values

    def __reversed__(self):
        return iter(_TickingRange(self._values[::-1], self._tick))


class ChatTemplate:
    """A chat template compiled once; render() runs it under a time limit and an output-size limit."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        self.env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        self.env.globals["raise_exception"] = raise_exception
        try:
            self.template = self.env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template does not compile: {exc}") from exc
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, *,
               time_limit_s: float = DEFAULT_TEMPLATE_TIME_LIMIT_S,
               max_chars: int = DEFAULT_TEMPLATE_MAX_CHARS) -> str:
        """The prompt text. TemplateLimitError past time_limit_s or max_chars (output characters, or the size
        of any value the template builds); ValueError for messages the template refuses (its
        raise_exception, a sandbox refusal, a type error)."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        budget = self.env.budget
        budget.deadline = time.monotonic() + time_limit_s
        budget.time_limit_s, budget.max_chars = time_limit_s, max_chars
        pieces, size = [], 0
        try:
            for piece in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=self.bos_token, eos_token=self.eos_token):
                size += len(piece)
                if size > max_chars:
                    raise TemplateLimitError(f"the chat template's output is over {max_chars} characters")
                pieces.append(piece)
        except TemplateLimitError:
            raise
        except jinja2.TemplateError as exc:  # raise_exception(...) in the template, a sandbox refusal
            raise ValueError(str(exc)) from exc
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            budget.deadline = float("inf")
        return "".join(pieces)
