"""CPU checks of how the CuTe backend hands W4A16 experts to the W4A16 kernel: quantized experts
in the canonical format are repacked into the kernel layout, and that layout, decoded the way the
kernel decodes it, is exactly the canonical dequantised weight; what the kernel cannot take
(act-order, non-bf16 scales) stays on the reference. The kernel itself is checked on the GPU in
test_w4a16_gpu.py."""
import dataclasses

import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.kernels.w4a16_layout import W4A16Weights, unpack_prepared  # noqa: E402
from light_moe.ops.cute_backend import CuteOps  # noqa: E402
from light_moe.quant.scheme import W4A16Config  # noqa: E402
from light_moe.quant.w4a16 import QuantizedWeight, rtn_quantize  # noqa: E402

E, H, INTER = 2, 128, 128


def quantized_experts(symmetric: bool, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, generator=gen).to(dtype)
    w2 = torch.randn(E, H, INTER, generator=gen).to(dtype)
    scheme = W4A16Config(group_size=64, symmetric=symmetric)
    return rtn_quantize(w13, scheme), rtn_quantize(w2, scheme)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantized_experts_are_repacked_exactly(symmetric):
    q13, q2 = quantized_experts(symmetric)
    p13, p2 = CuteOps().prepare_expert_weights(q13, q2)
    assert isinstance(p13, W4A16Weights) and isinstance(p2, W4A16Weights)
    assert p13.shape == (E, 2 * INTER, H) and p2.shape == (E, H, INTER)
    assert torch.equal(unpack_prepared(p13), q13.dequantize().float())
    assert torch.equal(unpack_prepared(p2), q2.dequantize().float())


def test_what_the_kernel_cannot_take_stays_on_the_reference():
    q13, q2 = quantized_experts(True)
    perm = torch.stack([torch.randperm(H) for _ in range(E)]).to(torch.int32)
    act_order = dataclasses.replace(q13, perm=perm)
    p13, p2 = CuteOps().prepare_expert_weights(act_order, q2)
    assert isinstance(p13, QuantizedWeight) and isinstance(p2, QuantizedWeight)
    f13, f2 = quantized_experts(True, dtype=torch.float32)  # float32 scales: not the kernel's bf16
    p13, p2 = CuteOps().prepare_expert_weights(f13, f2)
    assert isinstance(p13, QuantizedWeight)


def test_one_process_keeps_only_the_kernel_layout():
    """The canonical experts are freed once the backend holds its own copy (no doubled memory)."""
    from light_moe.config import ModelConfig
    from light_moe.layers.moe import MoEBlock

    cfg = ModelConfig(architecture="test", vocab_size=16, hidden_size=H, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=H // 2, max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=1e4,
                      num_experts=E, top_k=1, moe_intermediate_size=INTER, norm_topk_prob=True, moe_layers=(0,))
    block = MoEBlock(cfg, CuteOps(), torch.bfloat16, "cpu")
    block.use_quantized_experts(W4A16Config(group_size=64))
    q13, q2 = quantized_experts(True)
    block.experts.load("w13", q13)
    block.experts.load("w2", q2)
    block.prepare()
    assert isinstance(block.prepared[0], W4A16Weights)
    assert torch.equal(unpack_prepared(block.prepared[0]), q13.dequantize().float())
    assert block.canonical_released and all(buffer.numel() == 0 for buffer in block.experts.buffers())
