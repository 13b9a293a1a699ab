"""GPU tests of the grouped GEMM against ops/reference.py, on fresh random inputs with poisoned outputs.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows.
"""

import pytest
import torch

from light_moe.ops import reference
from tests.kernels.gpu_helpers import rel_l2 as _rel_l2
from tests.kernels.gpu_helpers import replay_up_down_on_new_routing
from tests.kernels.gpu_helpers import routing as _routing

pytestmark = pytest.mark.gpu

TOKENS = (1, 2, 7, 64, 333, 4096)
EXPERTS_TOPK = ((8, 2), (8, 8), (64, 2), (64, 8), (128, 2), (128, 8))
HIDDEN, INTER = 1024, 768


def _check_case(num_tokens, num_experts, top_k, hidden, inter, seed, config=None):
    from light_moe.kernels import grouped_gemm as gg

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = w13 / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, device=device, dtype=torch.bfloat16, generator=gen) / inter**0.5
    offsets, gather_index, _ = _routing(num_tokens, num_experts, top_k, device, gen)
    num_rows = gather_index.shape[0]
    w13p, w2p = gg.prepare_expert_weights(w13, w2)

    act = torch.full((num_rows, inter), float("nan"), device=device, dtype=torch.bfloat16)
    gg.expert_up(x, gather_index, offsets, w13p, out=act, config=config)
    ref_act = reference.expert_up(x.float(), gather_index, offsets, w13.float())
    assert not act.isnan().any(), "expert_up left rows unwritten"
    err_up = _rel_l2(act, ref_act)
    assert err_up < 1e-2, f"expert_up rel L2 {err_up:.3e}"

    y = torch.full((num_rows, hidden), float("nan"), device=device, dtype=torch.bfloat16)
    gg.expert_down(act, offsets, w2p, out=y, config=config)
    ref_y = reference.expert_down(act.float(), offsets, w2.float())
    assert not y.isnan().any(), "expert_down left rows unwritten"
    err_down = _rel_l2(y, ref_y)
    assert err_down < 1e-2, f"expert_down rel L2 {err_down:.3e}"
    return err_up, err_down


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_TOPK)
def test_grouped_gemm_matches_reference(num_tokens, num_experts, top_k):
    _check_case(num_tokens, num_experts, top_k, HIDDEN, INTER, seed=num_tokens * 1000 + num_experts + top_k)


@pytest.mark.parametrize("num_tokens", (1, 64, 1024, 4096))
def test_grouped_gemm_mixtral_shape(num_tokens):
    _check_case(num_tokens, 8, 2, 4096, 14336, seed=7 + num_tokens)


def _graph_replay_case(num_tokens: int, seed: int, config=None) -> None:
    """Capture up + down once; replay after changing routing and inputs in place (no host reads)."""
    from light_moe.kernels import grouped_gemm as gg

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    num_experts, top_k = 8, 2
    x = torch.randn(num_tokens, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen) / 32
    w2 = torch.randn(num_experts, HIDDEN, INTER, device=device, dtype=torch.bfloat16, generator=gen) / 28
    w13p, w2p = gg.prepare_expert_weights(w13, w2)
    offsets, gather_index, _ = _routing(num_tokens, num_experts, top_k, device, gen)
    act = torch.empty(num_tokens * top_k, INTER, device=device, dtype=torch.bfloat16)
    y = torch.empty(num_tokens * top_k, HIDDEN, device=device, dtype=torch.bfloat16)

    replay_up_down_on_new_routing(lambda x, g, o, out: gg.expert_up(x, g, o, w13p, out=out, config=config),
                                  lambda a, o, out: gg.expert_down(a, o, w2p, out=out, config=config),
                                  x, gather_index, offsets, act, y, top_k, gen)
    ref_act = reference.expert_up(x.float(), gather_index, offsets, w13.float())
    assert _rel_l2(act, ref_act) < 1e-2
    assert _rel_l2(y, reference.expert_down(act.float(), offsets, w2.float())) < 1e-2


def test_grouped_gemm_cuda_graph_replay():
    _graph_replay_case(64, seed=3)


@pytest.mark.parametrize("num_tokens", (7, 333, 4096))
def test_grouped_gemm_producer_fence_lag(num_tokens):
    """TileConfig.cp_async_lag > 1 (not in the table yet): the producer fences and signals each stage several
    stages after issuing its copies; the drain signals the rest."""
    from light_moe.kernels.tile_config import TileConfig

    for config in (TileConfig(256, 128, "producer", cp_async_lag=2), TileConfig(128, 64, "producer", cp_async_lag=3)):
        _check_case(num_tokens, 8, 2, 1024, 768, seed=31 + num_tokens, config=config)


def _cluster_configs():
    from light_moe.kernels.tile_config import TileConfig

    # TileConfig.cluster_t = 2: two CTAs per cluster share each weight tile (TMA multicast); consecutive token tiles
    return (TileConfig(256, 64, cluster_t=2), TileConfig(256, 128, "producer", cluster_t=2),
            TileConfig(128, 128, cluster_t=2))


@pytest.mark.parametrize("num_tokens", (1, 7, 64, 333, 1024, 4096))
@pytest.mark.parametrize("num_experts,top_k", ((8, 2), (64, 8)))
def test_grouped_gemm_cluster_pairs(num_tokens, num_experts, top_k):
    """Two-CTA clusters: every expert's last pair of token tiles may have an empty second tile (T = 1: always), whose
    CTA hands the multicast stages back without computing; an expert without tokens has no unit at all."""
    for config in _cluster_configs():
        _check_case(num_tokens, num_experts, top_k, HIDDEN, INTER, seed=53 + num_tokens + num_experts, config=config)


@pytest.mark.parametrize("num_tokens", (1024, 4096))
def test_grouped_gemm_cluster_pairs_mixtral_shape(num_tokens):
    for config in _cluster_configs()[:2]:
        _check_case(num_tokens, 8, 2, 4096, 14336, seed=59 + num_tokens, config=config)


def test_grouped_gemm_cluster_pairs_cuda_graph_replay():
    _graph_replay_case(333, seed=61, config=_cluster_configs()[0])
