"""The cache of compiled functions every kernel family keeps: one per static configuration.

A CuTe DSL function is compiled for the values it bakes into its code (dtypes, sizes such as H or E, the tile
config, flags); everything that varies per call (tokens, batch, sequence lengths) must stay a runtime argument,
or every new size would compile again (seconds each). So a key holds static values only, and a family's launch
wrapper asks `cache.get(key, make)`, where make() returns (jit function, arguments) to compile with once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable


def _cute_compile(jit_fn, *args):
    import cutlass.cute as cute

    return cute.compile(jit_fn, *args)


class CompileCache:
    """Compiled functions of one kernel family by static key; `seconds` records each compile's wall time."""

    def __init__(self, family: str, compile_fn: Callable | None = None):
        self.family = family
        self._compile = compile_fn or _cute_compile
        self._fns: dict[Hashable, Callable] = {}
        self.seconds: dict[Hashable, float] = {}

    def get(self, key: Hashable, make: Callable[[], tuple[Callable, tuple]]) -> Callable:
        """The function compiled for `key`; on a miss, make() gives (jit function, compile arguments)."""
        fn = self._fns.get(key)
        if fn is None:
            jit_fn, args = make()
            start = time.perf_counter()
            fn = self._fns[key] = self._compile(jit_fn, *args)
            self.seconds[key] = time.perf_counter() - start
        return fn

    def keys(self) -> list[Hashable]:
        return list(self._fns)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._fns

    def __len__(self) -> int:
        return len(self._fns)

    def clear(self) -> None:
        self._fns.clear()
        self.seconds.clear()

    def __repr__(self) -> str:
        return f"CompileCache({self.family!r}, {len(self)} compiled)"
