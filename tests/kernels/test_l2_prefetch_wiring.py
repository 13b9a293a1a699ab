"""CPU checks of how the L2 prefetch hint (ops.prefetch_weights, kernels/l2_prefetch.py) is reached: the sites
EngineConfig.l2_prefetch names, steps of up to L2_PREFETCH_MAX_ROWS rows, CUDA tensors only; the reference never
launches anything; a tensor the kernel cannot take is skipped with one log line; a model's forward calls it with
the o_proj weight before rotary + attention and the q/k/v weight before the input norm. The kernel itself is
checked on the GPU (test_l2_prefetch_gpu.py) and through the engine (tests/test_cute_engine_gpu.py)."""
import logging

import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.kernels import l2_prefetch  # noqa: E402
from light_moe.ops.backend import L2_PREFETCH_SITES, ReferenceOps  # noqa: E402
from light_moe.ops.cute_backend import L2_PREFETCH_MAX_ROWS, CuteOps  # noqa: E402
from tests.kernels.test_skinny_gemm_wiring import _cuda_like  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    calls = []
    monkeypatch.setattr(l2_prefetch, "l2_prefetch", lambda tensors: calls.append(list(tensors)))
    monkeypatch.setattr(l2_prefetch, "supports", lambda tensors: (True, "ok"))
    return calls


def test_sites_rows_and_devices(launches):
    w = _cuda_like(torch.zeros(64, 64, dtype=torch.bfloat16))
    ops = CuteOps(l2_prefetch="o_proj")
    ops.prefetch_weights([w], 1, "o_proj")
    ops.prefetch_weights([w], L2_PREFETCH_MAX_ROWS, "o_proj")
    ops.prefetch_weights([w], 1, "qkv")  # not a site of "o_proj"
    ops.prefetch_weights([w], L2_PREFETCH_MAX_ROWS + 1, "o_proj")  # a long prefill: compute-bound
    ops.prefetch_weights([torch.zeros(4)], 1, "o_proj")  # CPU
    ops.prefetch_weights([None, torch.zeros(0)], 1, "o_proj")  # nothing to fetch
    assert len(launches) == 2 and all(c[0] is w for c in launches)
    CuteOps(l2_prefetch="all").prefetch_weights([w], 3, "qkv")
    assert len(launches) == 3
    CuteOps().prefetch_weights([w], 1, "o_proj")  # default: none
    ReferenceOps().prefetch_weights([w], 1, "o_proj")
    assert len(launches) == 3
    assert set(L2_PREFETCH_SITES) == {"none", "o_proj", "all"}
    with pytest.raises(ValueError, match="l2_prefetch must be one of"):
        CuteOps(l2_prefetch="everything")


def test_unsupported_tensor_is_skipped_with_a_log(monkeypatch, caplog):
    launched = []
    monkeypatch.setattr(l2_prefetch, "l2_prefetch", lambda tensors: launched.append(tensors))
    odd = _cuda_like(torch.zeros(7, dtype=torch.bfloat16))  # 14 bytes: not a multiple of 16
    with caplog.at_level(logging.WARNING):
        CuteOps(l2_prefetch="all").prefetch_weights([odd], 1, "o_proj")
    assert not launched and "L2 prefetch" in caplog.text


def test_model_forward_hints_o_proj_then_qkv(tmp_path):
    """A tiny Mixtral on the reference ops, prefetch_weights recorded: per layer the q/k/v weight (before the input
    norm), then the o_proj weight (before rotary + attention), with the step's row count."""
    from light_moe import LightMoEEngine, SamplingParams
    from tests.tiny_models import make_tiny_checkpoint

    engine = LightMoEEngine(make_tiny_checkpoint("mixtral", tmp_path), dtype="float32", device="cpu",
                            show_progress=False, kv_cache_memory_bytes=8 << 20)
    seen = []
    engine.ops.prefetch_weights = lambda tensors, rows, site: seen.append((site, tensors[0].data_ptr(), rows))
    engine.generate_outputs([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=2, temperature=0.0))
    del engine.ops.prefetch_weights
    layers = engine.model.model.layers
    want_step = [pair for layer in layers for pair in (("qkv", layer.self_attn.qkv_proj.weight.data_ptr()),
                                                        ("o_proj", layer.self_attn.o_proj.weight.data_ptr()))]
    assert [(s, p) for s, p, _ in seen] == want_step * 2  # prefill, one decode step
    assert [rows for *_, rows in seen] == [5] * 2 * len(layers) + [1] * 2 * len(layers)
