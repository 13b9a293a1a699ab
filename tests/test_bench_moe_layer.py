"""The MoE-layer benchmark's accuracy columns (bench/moe_layer.py): the error is taken over the tokens both
routers route alike, and the tokens they route differently are counted with their gate-logit gap."""
import torch

from light_moe.bench.moe_layer import _routing_flips, _same_routing
from light_moe.ops import reference
from light_moe.ops.backend import ReferenceOps


class _FlipFirstToken(ReferenceOps):
    """A router that swaps token 0's second expert for its third (as a near-tie flip would)."""

    def router(self, x, gate_weight, top_k, renormalize, counts_out=None):
        weights, ids, counts = super().router(x, gate_weight, top_k, renormalize, counts_out)
        third = torch.nn.functional.linear(x[:1].float(), gate_weight.float()).topk(top_k + 1).indices[0, -1]
        ids = ids.clone()
        ids[0, -1] = third
        return weights, ids, counts


def test_same_routing_and_flips():
    gen = torch.Generator().manual_seed(0)
    x, gate = torch.randn(16, 32, generator=gen), torch.randn(8, 32, generator=gen)
    ids = reference.router(x, gate, 2, True)[1]
    same = _same_routing(ReferenceOps(), x, gate, 2, ids)
    assert same.all()
    assert _routing_flips(x, gate, 2, same) == {"tokens": 0, "max_logit_gap": None}
    same = _same_routing(_FlipFirstToken(), x, gate, 2, ids)
    assert same.tolist() == [False] + [True] * 15
    flips = _routing_flips(x, gate, 2, same)
    logits = (x[0] @ gate.T).topk(3).values
    assert flips["tokens"] == 1 and abs(flips["max_logit_gap"] - (logits[1] - logits[2]).item()) < 1e-5


def test_rounds_must_be_positive():
    """--rounds 0 would time nothing and report NaN for every case: refused before any GPU work."""
    import pytest

    from light_moe.bench.moe_layer import run_moe_layer_bench

    with pytest.raises(ValueError, match="rounds"):
        run_moe_layer_bench([1], rounds=0)
