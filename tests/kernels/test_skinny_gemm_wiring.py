"""CPU checks of how dense linear layers reach the skinny GEMM (kernels/skinny_gemm.py): DenseLinear (the attention's
q/k/v and o projections) is an nn.Linear whose matmul is ops.dense_linear; the reference runs F.linear; CuteOps hands
steps of up to skinny_max_rows rows (16 by default, at most 64) of bf16 weights on CUDA to the kernel and keeps longer
steps, CPU tensors and what the kernel cannot take on F.linear, logging only the latter. The kernel itself is
checked on the GPU in test_skinny_gemm_gpu.py.

Shape legend: M token rows, N out features, K in features.
"""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("cutlass")

from light_moe.kernels import skinny_gemm  # noqa: E402
from light_moe.layers.linear import DenseLinear, QuantizedLinear  # noqa: E402
from light_moe.ops.backend import ReferenceOps  # noqa: E402
from light_moe.ops.cute_backend import CuteOps  # noqa: E402
from light_moe.quant.scheme import W4A16Config  # noqa: E402

BF16 = torch.bfloat16
N, K = 192, 256


class _PretendCuda(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device: enough for CuteOps' routing decision, never for a kernel."""

    @property
    def is_cuda(self):
        return True


def _cuda_like(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_PretendCuda, t)


def _problem(m, dtype=BF16, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, w, b


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []

    def fake(x, weight, bias=None, out=None):
        calls.append((x, weight, bias))
        return torch.full((*x.shape[:-1], weight.shape[0]), 7.0, dtype=x.dtype)

    monkeypatch.setattr(skinny_gemm, "skinny_linear", fake)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_reference_is_f_linear(bias):
    x, w, b = _problem(5, torch.float32, bias)
    assert torch.equal(ReferenceOps().dense_linear(x, w, b), F.linear(x, w, b))


def test_cpu_tensors_stay_on_f_linear_silently(kernel_calls, caplog):
    x, w, b = _problem(1)
    with caplog.at_level(logging.WARNING):
        got = CuteOps(skinny_gemm=True).dense_linear(x, w, b)
    assert torch.equal(got, F.linear(x, w, b)) and not kernel_calls and not caplog.text


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_rows_go_to_the_kernel(m, bias, kernel_calls):
    x, w, b = _problem(m, bias=bias)
    x, w = _cuda_like(x), _cuda_like(w)
    got = CuteOps(skinny_gemm=True).dense_linear(x, w, b)
    assert len(kernel_calls) == 1 and kernel_calls[0][1] is w and kernel_calls[0][2] is b
    assert torch.equal(kernel_calls[0][0], x) and (got == 7.0).all()


def test_the_kernel_is_on_by_default(kernel_calls, caplog):
    """On by default since its GPU tests passed on an H100 (session 13; BENCHMARKS.md): EngineArgs, EngineConfig,
    select_backend and CuteOps all default to the kernel; --no-skinny-gemm (CuteOps(skinny_gemm=False)) keeps
    decode rows on F.linear, silently; the option reaches the backend."""
    from light_moe.config import EngineConfig
    from light_moe.engine.args import EngineArgs
    from light_moe.ops.select import select_backend

    x, w, b = _problem(1)
    with caplog.at_level(logging.WARNING):
        got = CuteOps(skinny_gemm=False).dense_linear(_cuda_like(x), _cuda_like(w), b)
    assert not kernel_calls and not caplog.text and torch.equal(got, F.linear(x, w, b))
    CuteOps().dense_linear(_cuda_like(x), _cuda_like(w), b)
    assert len(kernel_calls) == 1
    assert EngineArgs(model="m").skinny_gemm is True and EngineConfig.skinny_gemm is True
    assert EngineArgs.from_cli_args(_parsed(["--no-skinny-gemm"])).skinny_gemm is False
    assert EngineArgs.from_cli_args(_parsed([])).skinny_gemm is True
    assert select_backend("reference", torch.device("cpu"), skinny_gemm=True)[0].name == "reference"


def _parsed(flags):
    import argparse

    from light_moe.engine.args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return parser.parse_args(["--model", "m", *flags])


def test_a_strided_x_is_made_contiguous_first(kernel_calls):
    x, w, b = _problem(4)
    wide = _cuda_like(torch.cat([x, x], dim=1))[:, :K]  # rows 2K apart
    CuteOps(skinny_gemm=True).dense_linear(wide, _cuda_like(w), b)
    sent = kernel_calls[0][0]
    assert sent.is_contiguous() and torch.equal(sent, x)


@pytest.mark.parametrize("max_rows", [16, 64])
def test_rows_past_the_threshold_stay_on_f_linear_silently(kernel_calls, caplog, max_rows):
    ops = CuteOps(skinny_gemm=True, skinny_max_rows=max_rows)
    x, w, b = _problem(max_rows)
    ops.dense_linear(_cuda_like(x), _cuda_like(w), b)
    assert len(kernel_calls) == 1  # at the threshold: the kernel
    x, w, b = _problem(max_rows + 1)
    with caplog.at_level(logging.WARNING):
        got = ops.dense_linear(_cuda_like(x), _cuda_like(w), b)
    assert len(kernel_calls) == 1 and not caplog.text
    assert torch.equal(got, F.linear(x, w, b))


def test_the_threshold_is_checked():
    with pytest.raises(ValueError, match="skinny_gemm_max_rows"):
        CuteOps(skinny_max_rows=65)
    with pytest.raises(ValueError, match="skinny_gemm_max_rows"):
        CuteOps(skinny_max_rows=0)


@pytest.mark.parametrize("case,reason", [
    ("fp16", "dtype torch.float16 unsupported"),
    ("n_not_64", "N=100"),
    ("transposed_weight", "not a contiguous"),
    ("strided_bias", "bias torch.bfloat16: not contiguous"),
])
def test_what_the_kernel_cannot_take_falls_back_with_a_reason(case, reason, kernel_calls, caplog):
    x, w, b = _problem(2, torch.float16 if case == "fp16" else BF16)
    if case == "n_not_64":
        w, b = w[:100], b[:100]
    elif case == "transposed_weight":
        w = w.t().contiguous().t()
    elif case == "strided_bias":
        b = torch.stack([b, b], dim=1)[:, 0]
    with caplog.at_level(logging.WARNING):
        got = CuteOps(skinny_gemm=True).dense_linear(_cuda_like(x), _cuda_like(w), b)
    assert not kernel_calls
    assert "skinny linear unavailable" in caplog.text and reason in caplog.text
    assert torch.equal(got, F.linear(x, w, b))


class _Recording(ReferenceOps):
    def __init__(self):
        self.calls = []

    def dense_linear(self, x, weight, bias=None):
        self.calls.append((weight, bias))
        return super().dense_linear(x, weight, bias)


def test_dense_linear_is_an_nn_linear_on_the_ops():
    ops = _Recording()
    layer = DenseLinear(K, N, True, ops, dtype=torch.float32)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, K)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert ops.calls == [(layer.weight, layer.bias)]
    quantized = QuantizedLinear.like(layer, W4A16Config(group_size=64), ops)  # Attention.use_quantized_projections
    assert (quantized.in_features, quantized.out_features, quantized.bias is not None) == (K, N, True)


def test_attention_projections_run_on_the_ops():
    from light_moe.config import ModelConfig
    from light_moe.layers.attention import Attention
    from light_moe.layers.rotary import RotaryEmbedding

    cfg = ModelConfig(architecture="test", vocab_size=16, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=1e4, num_experts=2,
                      top_k=1, moe_intermediate_size=32, norm_topk_prob=True, moe_layers=(0,), qkv_bias=True)
    ops = _Recording()
    rotary = RotaryEmbedding(16, 32, 1e4)
    attn = Attention(cfg, rotary, ops)
    assert isinstance(attn.qkv_proj, DenseLinear) and isinstance(attn.o_proj, DenseLinear)
    x = torch.randn(5, 64)
    attn(x, torch.arange(5), None, None)
    assert [w.shape for w, _ in ops.calls] == [(128, 64), (64, 64)]
    assert ops.calls[0][1] is attn.qkv_proj.bias and ops.calls[1][1] is None


@pytest.mark.parametrize("family", ["deepseek_v2_lite", "deepseek_v3", "qwen2_moe"])
def test_mla_dense_mlp_and_shared_expert_projections_run_on_the_ops(family, tmp_path):
    """DeepSeek's MLA projections (q or q_a / q_b, kv_a, o; not kv_b, whose weight the absorbed decode reads), the
    dense MLP layers and the shared experts are DenseLinear: a forward hands every one of their weights to
    ops.dense_linear, so the CuTe backend runs their decode rows on the skinny GEMM."""
    from light_moe.layers.mla import MLAttention
    from light_moe.layers.mlp import SwiGLUMLP
    from light_moe.models.loader import build_model
    from tests.tiny_models import make_tiny_checkpoint

    ops = _Recording()
    model = build_model(make_tiny_checkpoint(family, tmp_path), ops, torch.float32, torch.device("cpu"), progress=False)
    want = set()
    for module in model.modules():
        if isinstance(module, MLAttention):
            assert not isinstance(module.kv_b_proj, DenseLinear)
            want |= {id(m.weight) for m in (getattr(module, "q_proj", None), getattr(module, "q_a_proj", None),
                                             getattr(module, "q_b_proj", None), module.kv_a_proj_with_mqa,
                                             module.o_proj) if m is not None}
        if isinstance(module, SwiGLUMLP):
            want |= {id(m.weight) for m in (module.gate_proj, module.up_proj, module.down_proj)}
    assert want, f"{family}: no MLA or dense MLP modules"
    with torch.no_grad():
        model.model(torch.tensor([1, 2, 3]), torch.arange(3), None, None)
    assert want <= {id(w) for w, _ in ops.calls}
