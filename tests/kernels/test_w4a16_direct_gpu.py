"""GPU tests of the direct W4A16 decode kernel (kernels/w4a16_direct.py) against the dequantised fp32 reference, fresh
random inputs, NaN-poisoned outputs; and against the wgmma kernel's deferred scale (the same dequant, another
summation order).

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows, g group size.
Run on the H100: pytest -m gpu tests/kernels/test_w4a16_direct_gpu.py -v
"""

import functools

import pytest
import torch

from tests.kernels.gpu_helpers import rel_l2, replay_up_down_on_new_routing, w4a16_reference_down, w4a16_reference_up
from tests.kernels.test_w4a16_gpu import _problem

pytestmark = pytest.mark.gpu

HIDDEN, INTER = 1024, 1024  # 16 k-tiles each way: every DIRECT_WARPS count splits them into whole g = 128 groups


def _config(warps: int, early: bool, stages: int = 0, stream_k: bool = False):
    from light_moe.kernels.tile_config import TileConfig

    return TileConfig(64, 8, stages=stages, direct_warps=warps, early_weights=early, stream_k=stream_k)


def _counters_left_zero(device):
    """Every stream-K launch must leave its arrival counters at zero (the next launch and graph replay start
    from them)."""
    from light_moe.kernels import w4a16_direct

    counters = w4a16_direct._workspaces[device][1]
    torch.cuda.synchronize()
    assert int(counters.abs().sum()) == 0, "stream-K counters not reset"


def _check(num_tokens, num_experts, top_k, hidden, inter, group_size, with_zeros, seed, up_config, down_config):
    from light_moe.kernels import w4a16_gemm as w4

    x, offsets, gather_index, w13, w2, w13p, w2p = _problem(num_tokens, num_experts, top_k, hidden, inter,
                                                             group_size, with_zeros, seed)
    rows = gather_index.shape[0]
    act = torch.full((rows, inter), float("nan"), device=x.device, dtype=torch.bfloat16)
    w4.w4a16_expert_up(x, gather_index, offsets, w13p, out=act, config=up_config)
    assert not act.isnan().any(), "the direct up projection left rows unwritten"
    err_up = rel_l2(act, w4a16_reference_up(x, gather_index, offsets, *w13, group_size))
    assert err_up < 1e-2, f"direct up rel L2 {err_up:.3e}"
    y = torch.full((rows, hidden), float("nan"), device=x.device, dtype=torch.bfloat16)
    w4.w4a16_expert_down(act, offsets, w2p, out=y, config=down_config)
    assert not y.isnan().any(), "the direct down projection left rows unwritten"
    err_down = rel_l2(y, w4a16_reference_down(act, offsets, *w2, group_size))
    assert err_down < 1e-2, f"direct down rel L2 {err_down:.3e}"
    return act, y


@pytest.mark.parametrize("with_zeros", (False, True))
@pytest.mark.parametrize("num_tokens", (1, 2, 7, 16, 64))  # 64: several 8-row units per expert
@pytest.mark.parametrize("num_experts,top_k", ((8, 2), (64, 8)))
def test_direct_matches_reference(num_tokens, num_experts, top_k, with_zeros):
    _check(num_tokens, num_experts, top_k, HIDDEN, INTER, 128, with_zeros, seed=num_tokens * 100 + num_experts,
           up_config=_config(8, False), down_config=_config(8, True))


@pytest.mark.parametrize("early", (False, True))
@pytest.mark.parametrize("group_size", (64, 128))
@pytest.mark.parametrize("warps", (2, 4, 8))
def test_direct_warps_groups_early(warps, group_size, early):
    """Every warp count (K split per CTA, ring depth from shared memory), g = 64 (a group per k-tile) and 128 (two),
    the down projection with and without its int4 before the dependency wait."""
    _check(5, 8, 2, HIDDEN, INTER, group_size, True, seed=warps * 10 + group_size + early,
           up_config=_config(warps, False), down_config=_config(warps, early))


@pytest.mark.parametrize("num_tokens", (1, 3, 16, 64))
@pytest.mark.parametrize("warps", (2, 4, 8))
def test_direct_stream_k_matches_reference(warps, num_tokens):
    """Stream-K: at 2 and 4 warps a unit of H = I = 1024 is 4 and 2 steps, so units are shared between CTAs (at 8,
    one step each, never); E 64 / top-8 at 64 tokens gives several 8-row units per expert. Equal to the
    whole-unit schedule up to summation order; the counters end at zero."""
    from light_moe.kernels import w4a16_gemm as w4

    for num_experts, top_k in ((8, 2), (64, 8)):
        seed = warps * 1000 + num_tokens * 10 + num_experts
        act, y = _check(num_tokens, num_experts, top_k, HIDDEN, INTER, 128, True, seed,
                        up_config=_config(warps, False, stream_k=True), down_config=_config(warps, True, stream_k=True))
        _counters_left_zero(act.device)
        x, offsets, gather_index, _, _, w13p, w2p = _problem(num_tokens, num_experts, top_k, HIDDEN, INTER, 128, True,
                                                              seed)
        act_whole = w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=_config(warps, False))
        y_whole = w4.w4a16_expert_down(act, offsets, w2p, config=_config(warps, True))
        assert rel_l2(act, act_whole) < 2e-3 and rel_l2(y, y_whole) < 2e-3


@pytest.mark.parametrize("stages", (2, 3))
def test_direct_shallow_rings(stages):
    """The shallowest rings (2: one k-tile in flight per warp), where the ring wraps every step or two."""
    _check(3, 8, 2, HIDDEN, INTER, 128, True, seed=stages, up_config=_config(4, False, stages),
           down_config=_config(4, True, stages))


@pytest.mark.parametrize("stream_k", (False, True))
@pytest.mark.parametrize("num_tokens", (1, 4, 16))
def test_direct_mixtral_shape(num_tokens, stream_k):
    """Mixtral's projections (H 4096, I 14336: 64 and 224 k-tiles), the shapes the kernel is for, with direct_tile's
    configs (whole units, and stream-K: at T = 1 896 up units of 4 steps and 128 down units of 14, shared between
    CTAs); equal to the wgmma kernel's deferred scale up to summation order."""
    import dataclasses

    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig, direct_tile

    hidden, inter = 4096, 14336
    x, offsets, gather_index, w13, w2, w13p, w2p = _problem(num_tokens, 8, 2, hidden, inter, 128, True, seed=7)
    up_cfg = dataclasses.replace(direct_tile(hidden, 128, gated=True), stream_k=stream_k)
    down_cfg = dataclasses.replace(direct_tile(inter, 128, gated=False), stream_k=stream_k)
    assert up_cfg.direct_warps == 8 and down_cfg.direct_warps == 8 and down_cfg.early_weights
    act, y = _check(num_tokens, 8, 2, hidden, inter, 128, True, 7, up_cfg, down_cfg)
    if stream_k:
        _counters_left_zero(act.device)
    act_w = w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=TileConfig(64, 8, k_split=4, deferred_scale=True))
    y_w = w4.w4a16_expert_down(act, offsets, w2p, config=TileConfig(64, 8, k_split=4, deferred_scale=True))
    assert rel_l2(act, act_w) < 5e-3 and rel_l2(y, y_w) < 5e-3


@pytest.mark.parametrize("stream_k", (False, True))
def test_direct_graph_replay_new_routing(stream_k):
    """Captured once, replayed on new routing and new x: the kernels read the replay's device-side routing (the
    down projection's early int4 included); stream-K at 2 warps (shared units) leaves its counters at zero."""
    from light_moe.kernels import w4a16_gemm as w4

    x, offsets, gather_index, w13, w2, w13p, w2p = _problem(4, 8, 2, HIDDEN, INTER, 128, True, seed=11)
    rows = gather_index.shape[0]
    act = torch.empty(rows, INTER, device=x.device, dtype=torch.bfloat16)
    y = torch.empty(rows, HIDDEN, device=x.device, dtype=torch.bfloat16)
    warps = 2 if stream_k else 8
    up = functools.partial(w4.w4a16_expert_up, w13=w13p, config=_config(warps, False, stream_k=stream_k))
    down = functools.partial(w4.w4a16_expert_down, w2=w2p, config=_config(warps, True, stream_k=stream_k))
    gen = torch.Generator(device=x.device).manual_seed(12)
    replay_up_down_on_new_routing(up, down, x, gather_index, offsets, act, y, 2, gen)
    assert not act.isnan().any() and not y.isnan().any()
    assert rel_l2(act, w4a16_reference_up(x, gather_index, offsets, *w13, 128)) < 1e-2
    assert rel_l2(y, w4a16_reference_down(act, offsets, *w2, 128)) < 1e-2
    if stream_k:
        _counters_left_zero(x.device)


@pytest.mark.parametrize("warps,stream_k", ((8, False), (2, True), (4, True)))
def test_direct_repeatable(warps, stream_k):
    """The same inputs give the same bits (fixed partial-sum order; stream-K's finisher adds the sharers in CTA
    order whoever finishes last)."""
    from light_moe.kernels import w4a16_gemm as w4

    x, offsets, gather_index, _, w2, w13p, w2p = _problem(7, 8, 2, HIDDEN, INTER, 128, True, seed=13)
    up_cfg, down_cfg = _config(warps, False, stream_k=stream_k), _config(warps, True, stream_k=stream_k)
    first = w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=up_cfg)
    for _ in range(3):
        assert torch.equal(first, w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=up_cfg))
    y1 = w4.w4a16_expert_down(first, offsets, w2p, config=down_cfg)
    for _ in range(3):
        assert torch.equal(y1, w4.w4a16_expert_down(first, offsets, w2p, config=down_cfg))


@pytest.mark.parametrize("fraction", (1 / 3, 1.0))
@pytest.mark.parametrize("num_tokens", (1, 2, 4, 16))
def test_direct_up_prefetch_of_the_down_weights_changes_nothing(num_tokens, fraction):
    """next_weights (the down weights' L2 prefetch from the up kernel's early CTAs) is a hint: on the Mixtral shape,
    with the engine's tile choice for the down projection (wgmma split-K at T = 1, direct from T = 2 or 4 on) and at
    fraction 1 (capped by PREFETCH_MAX_BYTES), up and down give bit-identical results to the same tiles without it,
    also when replayed from a CUDA graph; the prefetch kernel really ran (its compile key is cached)."""
    from light_moe.kernels import w4a16_gemm as w4

    hidden, inter = 4096, 14336
    x, offsets, gather_index, w13, w2, w13p, w2p = _problem(num_tokens, 8, 2, hidden, inter, 128, True, seed=17)
    rows = gather_index.shape[0]
    up = functools.partial(w4.w4a16_expert_up, decode_kernel="direct")
    down = functools.partial(w4.w4a16_expert_down, decode_kernel="direct")
    act = up(x, gather_index, offsets, w13p)
    y = down(act, offsets, w2p)
    assert rel_l2(act, w4a16_reference_up(x, gather_index, offsets, *w13, 128)) < 1e-2
    act_p = torch.full((rows, inter), float("nan"), device=x.device, dtype=torch.bfloat16)
    up(x, gather_index, offsets, w13p, out=act_p, next_weights=w2p, prefetch_fraction=fraction)
    assert torch.equal(act, act_p)
    assert torch.equal(y, down(act_p, offsets, w2p))
    assert any(len(key) > 6 and type(key[-1]).__name__ == "NextPrefetch" for key in w4._compiled.keys()), \
        "no launch took the prefetch kernel"
    y_p = torch.empty_like(y)

    def step():
        up(x, gather_index, offsets, w13p, out=act_p, next_weights=w2p, prefetch_fraction=fraction)
        down(act_p, offsets, w2p, out=y_p)

    graph = torch.cuda.CUDAGraph()
    step()  # compiled and warm outside the capture
    with torch.cuda.graph(graph):
        step()
    act_p.fill_(float("nan"))
    y_p.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(act, act_p) and torch.equal(y, y_p)
