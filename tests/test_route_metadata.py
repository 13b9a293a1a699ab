"""MoEOps.route(): a backend whose router also computes the routing metadata (the CuTe router's single CTA
at decode) hands it to experts(), which then skips routing_metadata; the MoE block passes it only when the
dispatcher kept the rows as they were. Checked on the CPU with the reference ops standing in for the kernel."""
import pytest
import torch

from light_moe.config import ModelConfig
from light_moe.layers.moe import MoEBlock
from light_moe.ops import reference
from light_moe.ops.backend import ReferenceOps

E, H, INTER, K = 4, 32, 48, 2


class _RouterWithMetadata(ReferenceOps):
    """route() returns the reference metadata of its ids; counts how often experts() computes its own."""

    def __init__(self, with_metadata: bool):
        self.with_metadata = with_metadata
        self.computed = 0

    def route(self, x, gate_weight, top_k, renormalize, counts_out=None):
        weights, ids, counts, _ = super().route(x, gate_weight, top_k, renormalize, counts_out)
        meta = reference.routing_metadata(ids, gate_weight.shape[0]) if self.with_metadata else None
        return weights, ids, counts, meta

    def routing_metadata(self, topk_ids, num_experts):
        self.computed += 1
        return super().routing_metadata(topk_ids, num_experts)


def _block(ops):
    cfg = ModelConfig(architecture="test", vocab_size=16, hidden_size=H, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=H // 2, max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=1e4,
                      num_experts=E, top_k=K, moe_intermediate_size=INTER, norm_topk_prob=True, moe_layers=(0,))
    block = MoEBlock(cfg, ops, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(3)
    block.gate.weight.data = torch.randn(E, H, generator=gen)
    block.experts.w13.data = torch.randn(E, 2 * INTER, H, generator=gen) / H**0.5
    block.experts.w2.data = torch.randn(E, H, INTER, generator=gen) / INTER**0.5
    block.prepare()
    return block


def test_block_uses_the_router_metadata_and_gives_the_same_output():
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(4))
    plain_ops, fused_ops = _RouterWithMetadata(False), _RouterWithMetadata(True)
    plain, fused = _block(plain_ops)(x), _block(fused_ops)(x)
    assert plain_ops.computed == 1 and fused_ops.computed == 0  # the metadata came from route()
    assert torch.equal(plain, fused)
    # moe_forward goes the same way
    block = _block(fused_ops)
    w13, w2 = block.prepared
    out = fused_ops.moe_forward(x, block.gate.weight, w13, w2, K, True)
    assert fused_ops.computed == 0 and torch.allclose(out, plain, atol=1e-6)


def test_router_metadata_is_refused_for_padded_rows():
    ops = _RouterWithMetadata(True)
    x = torch.randn(3, H)
    weights, ids, _, meta = ops.route(x, torch.randn(E, H), K, True)
    w13, w2 = torch.randn(E, 2 * INTER, H), torch.randn(E, H, INTER)
    with pytest.raises(ValueError, match="padded"):
        ops.experts(x, weights, ids, w13, w2, padded=True, metadata=meta)
