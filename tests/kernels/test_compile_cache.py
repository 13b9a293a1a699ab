"""kernels/compile_cache.CompileCache: one compile per static key, and every kernel family keeps its compiled
functions in one (no family-private dict caches)."""
import importlib
import os

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import pytest  # noqa: E402

from light_moe.kernels.compile_cache import CompileCache  # noqa: E402

FAMILIES = ["combine", "decode_attention", "grouped_gemm", "prefill_attention", "rms_norm", "rope_kv", "router",
            "routing", "w4a16_gemm"]


def test_compiles_once_per_key():
    calls = []

    def fake_compile(jit_fn, *args):
        calls.append((jit_fn, args))
        return lambda *a: (jit_fn, a)

    cache = CompileCache("test", compile_fn=fake_compile)
    made = []

    def make(name):
        def build():
            made.append(name)
            return name, (1, 2)
        return build

    fn = cache.get(("bf16", 64), make("a"))
    assert fn(3) == ("a", (3,))
    assert cache.get(("bf16", 64), make("never")) is fn  # a hit builds nothing
    cache.get(("bf16", 128), make("b"))
    assert made == ["a", "b"] and calls == [("a", (1, 2)), ("b", (1, 2))]
    assert len(cache) == 2 and ("bf16", 64) in cache and set(cache.seconds) == {("bf16", 64), ("bf16", 128)}
    assert all(s >= 0 for s in cache.seconds.values())
    cache.clear()
    assert len(cache) == 0 and not cache.seconds


def test_a_failed_compile_caches_nothing():
    def failing(jit_fn, *args):
        raise RuntimeError("ptxas")

    cache = CompileCache("test", compile_fn=failing)
    with pytest.raises(RuntimeError):
        cache.get("k", lambda: ("fn", ()))
    assert "k" not in cache and not cache.seconds


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_uses_a_compile_cache(family):
    module = importlib.import_module(f"light_moe.kernels.{family}")
    assert isinstance(module._compiled, CompileCache) and module._compiled.family == family
