"""GPU tests of the fused up + down W4A16 decode kernel (kernels/w4a16_fused.py): against the dequantised fp32
reference and bit for bit against the direct kernel's two launches on the same tile (the same per-unit code and
summation order), fresh random inputs, NaN-poisoned outputs; its counters back at zero after every launch.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows, g group size.
Run on the H100: pytest -m gpu tests/kernels/test_w4a16_fused_gpu.py -v
"""

import pytest
import torch

from tests.kernels.gpu_helpers import rel_l2, replay_up_down_on_new_routing, w4a16_reference_down, w4a16_reference_up
from tests.kernels.test_w4a16_gpu import _problem

pytestmark = pytest.mark.gpu


def _counters_left_zero(device):
    from light_moe.kernels import w4a16_fused

    torch.cuda.synchronize()
    counters = w4a16_fused._workspaces[device][0]
    assert int(counters.abs().sum()) == 0, f"counters not reset: {counters.tolist()}"


def _check(num_tokens, num_experts, top_k, hidden, inter, group_size, seed, warps=None):
    from light_moe.kernels import w4a16_fused
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    x, offsets, gather_index, w13, w2, w13p, w2p = _problem(num_tokens, num_experts, top_k, hidden, inter,
                                                             group_size, True, seed)
    rows = gather_index.shape[0]
    config = w4a16_fused.fused_config(rows, w13p, w2p) if warps is None else TileConfig(64, 8, direct_warps=warps)
    assert config is not None
    act = torch.full((rows, inter), float("nan"), device=x.device, dtype=torch.bfloat16)
    y = torch.full((rows, hidden), float("nan"), device=x.device, dtype=torch.bfloat16)
    w4a16_fused.w4a16_fused_experts(x, gather_index, offsets, w13p, w2p, act=act, y=y, config=config)
    assert not act.isnan().any() and not y.isnan().any(), "the fused kernel left rows unwritten"
    assert rel_l2(act, w4a16_reference_up(x, gather_index, offsets, *w13, group_size)) < 1e-2
    assert rel_l2(y, w4a16_reference_down(act, offsets, *w2, group_size)) < 1e-2
    # the direct kernel's two launches on the same tile: the same bits
    act_d = w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=config)
    y_d = w4.w4a16_expert_down(act_d, offsets, w2p, config=config)
    assert torch.equal(act, act_d) and torch.equal(y, y_d)
    _counters_left_zero(x.device)
    return x, offsets, gather_index, w13p, w2p, act, y, config


@pytest.mark.parametrize("num_tokens", (1, 2, 4, 16))
def test_fused_mixtral_shape(num_tokens):
    """Mixtral's layer (H 4096, I 14336, E 8, top-2): 896 up units and 128 down units at T = 1, more from T = 2."""
    _check(num_tokens, 8, 2, 4096, 14336, 128, seed=23 + num_tokens)


@pytest.mark.parametrize("num_tokens", (1, 3, 7, 16))
@pytest.mark.parametrize("warps", (2, 4, 8))
def test_fused_small_shapes(num_tokens, warps):
    """E 64, top-8, H = I = 1024 (16 k-tiles: rings cut to the warps' k-tiles), experts without rows, 2 / 4 / 8
    warps; g = 64 at 8 warps (2 k-tiles each, one group per k-tile)."""
    group_size = 64 if warps == 8 else 128
    _check(num_tokens, 64, 8, 1024, 1024, group_size, seed=29 + num_tokens + warps, warps=warps)


def test_fused_repeated_launches_and_graph_replay():
    """Launched again and again (every launch leaves its counters at zero), then captured once and replayed on new
    routing and new x: the replay reads the device-side routing and starts from zero counters."""
    from light_moe.kernels import w4a16_fused

    x, offsets, gather_index, w13p, w2p, act, y, config = _check(4, 8, 2, 1024, 1024, 128, seed=31, warps=4)
    for _ in range(5):
        a2, y2 = w4a16_fused.w4a16_fused_experts(x, gather_index, offsets, w13p, w2p, config=config)
        assert torch.equal(a2, act) and torch.equal(y2, y)
    _counters_left_zero(x.device)

    def up(x, g, o, out):  # the replay helper's two calls: the fused launch in the first, nothing in the second
        w4a16_fused.w4a16_fused_experts(x, g, o, w13p, w2p, act=out, y=y, config=config)

    def down(a, o, out):
        pass

    gen = torch.Generator(device=x.device).manual_seed(37)
    replay_up_down_on_new_routing(up, down, x, gather_index, offsets, act, y, 2, gen)
    from light_moe.kernels import w4a16_gemm as w4

    act_d = w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=config)
    assert torch.equal(act, act_d)
    assert torch.equal(y, w4.w4a16_expert_down(act_d, offsets, w2p, config=config))
    _counters_left_zero(x.device)
