"""Reading a request body: size-limited, time-limited, strict JSON, valid Unicode.

    413  over max_body_bytes (Content-Length, or counted while reading a chunked body)
    408  the whole body did not arrive within body_timeout_s (a stalled upload holds no connection forever)
    400  not JSON; JSON's non-standard constants (NaN, Infinity, -Infinity), which Python's json accepts;
         a string with a lone surrogate ("\\ud800"), which is not Unicode and which the tokenizer would
         refuse with its own internals in the message
    ClientDisconnect (starlette's) when the client goes away mid-upload: the app answers it with 499,
    which nobody reads but the request counter records.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import Request

from light_moe.server.protocol import APIError


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _first_surrogate(value, path: str = "") -> tuple[str, str] | None:
    """(where, which) of the first lone surrogate in a decoded JSON value, or None."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return where or "the body", f"\\u{ord(item[exc.start]):04x}"
        elif isinstance(item, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in item.items())
            for key in item:
                if isinstance(key, str) and not key.isascii():
                    stack.append((key, where or "the body"))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


async def read_json(request: Request, max_bytes: int, timeout_s: float):
    """The decoded JSON body, or an APIError (400 / 408 / 413); ClientDisconnect if the client leaves."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"the request body has {length} bytes; the limit is {max_bytes}", code="request_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"the request body is over the limit of {max_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    try:
        payload = json.loads(raw, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    # A lone surrogate can only come from a \u escape or from bytes outside ASCII (UTF-8's surrogate bytes, or a
    # body json.loads reads as UTF-16 / UTF-32, which only NUL bytes make it do): most bodies have none of them,
    # and need no walk over every string they hold.
    suspect = not raw.isascii() or b"\\u" in raw or b"\x00" in raw
    bad = _first_surrogate(payload) if suspect else None
    if bad is not None:
        where, which = bad
        field = where.split(".")[0].split("[")[0] if where != "the body" else None
        raise APIError(400, f"{where} holds a lone surrogate ({which}), which is not valid Unicode", param=field)
    return payload
