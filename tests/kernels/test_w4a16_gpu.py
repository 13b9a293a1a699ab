"""GPU tests of the W4A16 grouped GEMM against the dequantised reference, fresh random inputs, NaN-poisoned outputs.

Shape legend: T tokens, E experts, K top-k, H hidden, I intermediate, M = T * K routed rows, g group size.
Run on the H100: pytest -m gpu tests/kernels/test_w4a16_gpu.py -v
"""

import dataclasses

import pytest
import torch

from tests.kernels.gpu_helpers import rel_l2 as _rel_l2
from tests.kernels.gpu_helpers import replay_up_down_on_new_routing, w4a16_reference_down, w4a16_reference_up
from tests.kernels.gpu_helpers import routing as _routing

pytestmark = pytest.mark.gpu

TOKENS = (1, 2, 7, 64, 333, 4096)
EXPERTS_TOPK = ((8, 2), (64, 8))
HIDDEN, INTER = 1024, 768
GROUP = 128


def _quantized(num_experts, n_out, k_dim, group_size, with_zeros, device, generator):
    """Canonical W4A16 (light_moe/quant/w4a16.py format) with scales ~ 1 / sqrt(K) so outputs are O(1)."""
    q = torch.randint(0, 16, (num_experts, n_out, k_dim), device=device, dtype=torch.int32, generator=generator)
    qweight = torch.zeros(num_experts, n_out, k_dim // 8, device=device, dtype=torch.int32)
    for i in range(8):
        qweight |= q[..., i::8] << (4 * i)
    groups = (num_experts, n_out, k_dim // group_size)
    scales = ((torch.rand(groups, device=device, generator=generator) + 0.5) / (4 * k_dim**0.5)).bfloat16()
    zeros = None
    if with_zeros:
        zeros = torch.randint(0, 16, groups, device=device, dtype=torch.uint8, generator=generator)
    return qweight, scales, zeros


def _problem(num_tokens, num_experts, top_k, hidden, inter, group_size, with_zeros, seed):
    """(x, offsets, gather_index, canonical w13, canonical w2, prepared w13, prepared w2) of one MoE layer, fresh
    random inputs from `seed`."""
    from light_moe.kernels import w4a16_gemm as w4

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = _quantized(num_experts, 2 * inter, hidden, group_size, with_zeros, device, gen)
    w2 = _quantized(num_experts, hidden, inter, group_size, with_zeros, device, gen)
    offsets, gather_index, _ = _routing(num_tokens, num_experts, top_k, device, gen)
    w13p = w4.prepare_w4a16_weights(*w13, group_size, gated=True)
    w2p = w4.prepare_w4a16_weights(*w2, group_size, gated=False)
    return x, offsets, gather_index, w13, w2, w13p, w2p


def _check_case(num_tokens, num_experts, top_k, hidden, inter, group_size, with_zeros, seed, config=None):
    """Up then down (NaN-poisoned outputs) against the dequantised reference; config=None: the table's tile."""
    from light_moe.kernels import w4a16_gemm as w4

    x, offsets, gather_index, w13, w2, w13p, w2p = _problem(num_tokens, num_experts, top_k, hidden, inter,
                                                            group_size, with_zeros, seed)
    device = x.device
    num_rows = gather_index.shape[0]

    act = torch.full((num_rows, inter), float("nan"), device=device, dtype=torch.bfloat16)
    w4.w4a16_expert_up(x, gather_index, offsets, w13p, out=act, config=config)
    ref_act = w4a16_reference_up(x, gather_index, offsets, *w13, group_size)
    assert not act.isnan().any(), "w4a16_expert_up left rows unwritten"
    err_up = _rel_l2(act, ref_act)
    assert err_up < 1e-2, f"w4a16_expert_up rel L2 {err_up:.3e}"

    y = torch.full((num_rows, hidden), float("nan"), device=device, dtype=torch.bfloat16)
    w4.w4a16_expert_down(act, offsets, w2p, out=y, config=config)
    ref_y = w4a16_reference_down(act, offsets, *w2, group_size)
    assert not y.isnan().any(), "w4a16_expert_down left rows unwritten"
    err_down = _rel_l2(y, ref_y)
    assert err_down < 1e-2, f"w4a16_expert_down rel L2 {err_down:.3e}"
    return err_up, err_down


def _up_problem(num_tokens, hidden, inter, group_size, seed):
    """(x, gather_index, offsets, prepared w13 (with zeros), reference act) of an up projection, E = 8, top-2."""
    from light_moe.kernels import w4a16_gemm as w4

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = _quantized(8, 2 * inter, hidden, group_size, True, device, gen)
    offsets, gather_index, _ = _routing(num_tokens, 8, 2, device, gen)
    w13p = w4.prepare_w4a16_weights(*w13, group_size, gated=True)
    return x, gather_index, offsets, w13p, w4a16_reference_up(x, gather_index, offsets, *w13, group_size)


def test_prepared_layout_on_gpu():
    """prepare_w4a16_weights on CUDA tensors gives the same bytes as on the CPU (CPU tests pin the layout)."""
    from light_moe.kernels import w4a16_gemm as w4

    gen = torch.Generator(device="cuda").manual_seed(1)
    qweight, scales, zeros = _quantized(2, 256, 512, GROUP, True, torch.device("cuda"), gen)
    on_gpu = w4.prepare_w4a16_weights(qweight, scales, zeros, GROUP, gated=True)
    on_cpu = w4.prepare_w4a16_weights(qweight.cpu(), scales.cpu(), zeros.cpu(), GROUP, gated=True)
    assert torch.equal(on_gpu.qweight.cpu(), on_cpu.qweight) and torch.equal(on_gpu.meta.cpu(), on_cpu.meta)


@pytest.mark.parametrize("with_zeros", (False, True))
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_TOPK)
def test_w4a16_matches_reference(num_tokens, num_experts, top_k, with_zeros):
    _check_case(
        num_tokens,
        num_experts,
        top_k,
        HIDDEN,
        INTER,
        GROUP,
        with_zeros,
        seed=num_tokens * 1000 + num_experts + top_k + with_zeros,
    )


@pytest.mark.parametrize("group_size", (32, 64))
@pytest.mark.parametrize("num_tokens", (1, 333))
def test_w4a16_other_group_sizes(num_tokens, group_size):
    _check_case(num_tokens, 8, 2, HIDDEN, INTER, group_size, True, seed=group_size + num_tokens)


# (H, I): an odd number of k-tiles of 64 in the up projection's K (576 = 9, with 256-row tiles over 2I = 768), then
# in the down projection's (320 = 5, with 256-row tiles over H = 512); K only has to be a multiple of 64 and of g
ODD_K_SHAPES = ((576, 384), (512, 320))


@pytest.mark.parametrize("group_size", (32, 64))
@pytest.mark.parametrize("num_tokens", (1, 7, 333, 4096))
@pytest.mark.parametrize("hidden,inter", ODD_K_SHAPES)
def test_w4a16_odd_k_tiles(hidden, inter, num_tokens, group_size):
    """The table's tile at each T (split K falls back to 1: it must divide the k-tiles), then every table tile forced
    on the up projection with the odd K (gpt-oss-20b's H = I = 2880 is 45 k-tiles)."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    assert w4.supports(8, hidden, inter, group_size) == (True, "ok")
    _check_case(num_tokens, 8, 2, hidden, inter, group_size, True, seed=hidden + inter + num_tokens + group_size)
    x, gather_index, offsets, w13p, ref_act = _up_problem(num_tokens, hidden, inter, group_size, seed=3 + num_tokens)
    device = x.device
    for row in w4.W4A16_TILE_TABLE:
        tile_w, k_split = row.tile_w, row.k_split
        while (2 * inter) % tile_w:
            tile_w //= 2
        while (hidden // 64) % k_split:
            k_split //= 2
        wide = tile_w == 256  # the 256-row tiles' options, as choose_w4a16_tile sets them
        config = TileConfig(tile_w, row.tile_t, row.fence_mode, k_split, kblock_pipeline=row.kblock_pipeline and wide,
                            bulk_weights=row.bulk_weights and wide, tma_tokens=row.tma_tokens_up and wide,
                            deferred_scale=tile_w in row.deferred_scale_at and group_size >= 64)
        assert w4.W4A16GroupedGemmSm90.supports(gated=True, n_out=2 * inter, k_dim=hidden, num_experts=8,
                                                group_size=group_size, config=config)[0], config
        act = torch.full((gather_index.shape[0], inter), float("nan"), device=device, dtype=torch.bfloat16)
        w4.w4a16_expert_up(x, gather_index, offsets, w13p, out=act, config=config)
        assert not act.isnan().any(), f"tile {config} left rows unwritten"
        assert _rel_l2(act, ref_act) < 1e-2, f"tile {config}: rel L2 {_rel_l2(act, ref_act):.3e}"


@pytest.mark.parametrize("num_tokens", (1, 64, 4096))
def test_w4a16_mixtral_shape(num_tokens):
    _check_case(num_tokens, 8, 2, 4096, 14336, GROUP, False, seed=11 + num_tokens)


@pytest.mark.parametrize("num_tokens", (1, 7, 333, 4096))
def test_w4a16_every_tile_config(num_tokens):
    """Each row of W4A16_TILE_TABLE on the same data (the table picks by T; force every tile here)."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    x, gather_index, offsets, w13p, ref_act = _up_problem(num_tokens, HIDDEN, INTER, GROUP, seed=5 + num_tokens)
    device = x.device
    for row in w4.W4A16_TILE_TABLE:
        tile_w, tile_t = row.tile_w, row.tile_t
        act = torch.full((gather_index.shape[0], INTER), float("nan"), device=device, dtype=torch.bfloat16)
        config = TileConfig(tile_w, tile_t, row.fence_mode, row.k_split,
                            k_tiles_per_stage=2 if row.two_k_tiles_at_g128 and GROUP == 128 else 1,
                            kblock_pipeline=row.kblock_pipeline, bulk_weights=row.bulk_weights,
                            tma_tokens=row.tma_tokens_up, deferred_scale=tile_w in row.deferred_scale_at)
        w4.w4a16_expert_up(x, gather_index, offsets, w13p, out=act, config=config)
        assert not act.isnan().any(), f"tile {tile_w}x{tile_t} left rows unwritten"
        assert _rel_l2(act, ref_act) < 1e-2, f"tile {tile_w}x{tile_t}: rel L2 {_rel_l2(act, ref_act):.3e}"


@pytest.mark.parametrize("num_tokens", (1, 7, 64, 333))
def test_w4a16_opt_in_tiles(num_tokens):
    """Tiles not in the table yet: TileConfig.k_tiles_per_stage = 2 (one g = 128 group per stage) on decode,
    mid and prefill tiles, 256 weight rows (two atoms per consumer warpgroup), split K over 128-row tiles
    (each K warpgroup takes both atoms), a larger producer-fence lag, k-block pipelined wgmma, int4 weights by
    cp.async.bulk; up and down, against the dequantising reference."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(23 + num_tokens)
    x = torch.randn(num_tokens, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = _quantized(8, 2 * INTER, HIDDEN, 128, True, device, gen)
    w2 = _quantized(8, HIDDEN, INTER, 128, True, device, gen)
    offsets, gather_index, _ = _routing(num_tokens, 8, 2, device, gen)
    w13p = w4.prepare_w4a16_weights(*w13, 128, gated=True)
    w2p = w4.prepare_w4a16_weights(*w2, 128, gated=False)
    ref_act = w4a16_reference_up(x, gather_index, offsets, *w13, 128)
    act_in = torch.randn(gather_index.shape[0], INTER, device=device, dtype=torch.bfloat16, generator=gen)
    ref_y = w4a16_reference_down(act_in, offsets, *w2, 128)
    # the down projection's 12 k-tiles (I = 768) take k_split x k-tiles per stage = 4 at most: the others
    # run the up projection only (16 k-tiles)
    kernel = w4.W4A16GroupedGemmSm90
    for config in (TileConfig(64, 8, k_split=4, k_tiles_per_stage=2), TileConfig(64, 8, k_split=2, k_tiles_per_stage=2),
                   TileConfig(64, 16, k_split=2, k_tiles_per_stage=2), TileConfig(128, 32, k_tiles_per_stage=2),
                   TileConfig(128, 128, "producer", k_tiles_per_stage=2), TileConfig(256, 32),
                   TileConfig(256, 64, k_tiles_per_stage=2), TileConfig(128, 256, "producer", cp_async_lag=3),
                   TileConfig(128, 8, k_split=4), TileConfig(128, 16, k_split=2, k_tiles_per_stage=2),
                   TileConfig(128, 8, k_split=4, k_tiles_per_stage=2),
                   # k-block pipelined wgmma: prefill, mid (one and two atoms per warpgroup), split-K decode
                   TileConfig(128, 256, "producer", kblock_pipeline=True), TileConfig(128, 32, kblock_pipeline=True),
                   TileConfig(256, 32, k_tiles_per_stage=2, kblock_pipeline=True),
                   TileConfig(64, 8, k_split=4, kblock_pipeline=True),
                   TileConfig(64, 16, k_split=4, k_tiles_per_stage=2, kblock_pipeline=True),
                   # 256 x 128: the bf16 kernel's prefill shape (two atoms x 128 tokens per warpgroup)
                   TileConfig(256, 128, "producer"), TileConfig(256, 128, "consumer"),
                   # int4 atoms by cp.async.bulk (expect-tx on the full barrier): both fences, split K, 2 k-tiles
                   TileConfig(64, 8, k_split=4, bulk_weights=True), TileConfig(128, 8, k_split=4, bulk_weights=True),
                   TileConfig(256, 32, k_tiles_per_stage=2, bulk_weights=True),
                   TileConfig(256, 128, "consumer", kblock_pipeline=True, bulk_weights=True),
                   TileConfig(256, 128, "producer", cp_async_lag=2, bulk_weights=True)):
        assert kernel.supports(gated=True, n_out=2 * INTER, k_dim=HIDDEN, num_experts=8, group_size=128,
                               config=config)[0]
        act = torch.full_like(ref_act, float("nan"), dtype=torch.bfloat16)  # the references are float32
        w4.w4a16_expert_up(x, gather_index, offsets, w13p, out=act, config=config)
        assert not act.isnan().any() and _rel_l2(act, ref_act) < 1e-2, (config, _rel_l2(act, ref_act))
        if not kernel.supports(gated=False, n_out=HIDDEN, k_dim=INTER, num_experts=8, group_size=128, config=config)[0]:
            assert config.k_split * config.k_tiles_per_stage > 4
            continue
        y = torch.full_like(ref_y, float("nan"), dtype=torch.bfloat16)
        w4.w4a16_expert_down(act_in, offsets, w2p, out=y, config=config)
        assert not y.isnan().any() and _rel_l2(y, ref_y) < 1e-2, (config, _rel_l2(y, ref_y))
    # an out buffer of another dtype or shape is refused before any compile or launch
    with pytest.raises(ValueError, match="out"):
        w4.w4a16_expert_up(x, gather_index, offsets, w13p, out=torch.empty_like(ref_act, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        w4.w4a16_expert_down(act_in, offsets, w2p, out=torch.empty(1, HIDDEN, device=device, dtype=torch.bfloat16))


def _tma_configs():
    from light_moe.kernels.tile_config import TileConfig

    return (TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True, tma_tokens=True),
            TileConfig(128, 256, tma_tokens=True),
            TileConfig(128, 256, kblock_pipeline=True, bulk_weights=True, tma_tokens=True),
            TileConfig(256, 128, "producer", tma_tokens=True),  # the fence mode has nothing left to fence
            TileConfig(256, 32, bulk_weights=True, tma_tokens=True),
            TileConfig(64, 8, k_split=4, tma_tokens=True))


# (T, E, top-k, g, zeros, configs): every tile on Mixtral-like routing; g = 32 and 64 small experts (expert
# starts at any row, many partial last tiles) on the prefill tiles; ~20 compiles in all
TMA_CASES = [(t, 8, 2, 128, True, slice(None)) for t in (1, 7, 333, 4096)] + [
    (333, 8, 2, 32, False, slice(0, 2)), (333, 64, 8, 128, True, slice(0, 3)), (4096, 64, 8, 128, False, slice(0, 2))]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,group_size,with_zeros,which", TMA_CASES)
def test_w4a16_tma_token_rows(num_tokens, num_experts, top_k, group_size, with_zeros, which):
    """TileConfig.tma_tokens: token rows by one TMA per k-tile from the tile's first row (experts start at any row;
    a last tile reads rows of the next expert, or past M: zero-filled), no proxy fence; the up projection gathers
    x first. Prefill, mid and decode tiles, up and down against the dequantising reference with NaN-poisoned
    outputs."""
    from light_moe.kernels import w4a16_gemm as w4

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(41 + num_tokens + num_experts + group_size)
    x = torch.randn(num_tokens, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen)
    offsets, gather_index, _ = _routing(num_tokens, num_experts, top_k, device, gen)
    act_in = torch.randn(gather_index.shape[0], INTER, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = _quantized(num_experts, 2 * INTER, HIDDEN, group_size, with_zeros, device, gen)
    w2 = _quantized(num_experts, HIDDEN, INTER, group_size, with_zeros, device, gen)
    w13p = w4.prepare_w4a16_weights(*w13, group_size, gated=True)
    w2p = w4.prepare_w4a16_weights(*w2, group_size, gated=False)
    ref_act = w4a16_reference_up(x, gather_index, offsets, *w13, group_size)
    ref_y = w4a16_reference_down(act_in, offsets, *w2, group_size)
    for config in _tma_configs()[which]:
        act = torch.full_like(ref_act, float("nan"), dtype=torch.bfloat16)
        w4.w4a16_expert_up(x, gather_index, offsets, w13p, out=act, config=config)
        assert not act.isnan().any() and _rel_l2(act, ref_act) < 1e-2, (config, _rel_l2(act, ref_act))
        y = torch.full_like(ref_y, float("nan"), dtype=torch.bfloat16)
        w4.w4a16_expert_down(act_in, offsets, w2p, out=y, config=config)
        assert not y.isnan().any() and _rel_l2(y, ref_y) < 1e-2, (config, _rel_l2(y, ref_y))


@pytest.mark.parametrize("group_size", (32, 128))
def test_w4a16_t4096_selects_256x128(group_size):
    """T=4096 (1024 rows per expert) picks the compute-bound 256 x 128 tile for up (token rows by TMA) and down;
    check both."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    num_rows = 4096 * 2
    assert w4.choose_w4a16_tile(num_rows, 8, 2 * INTER, HIDDEN, gated=True) == TileConfig(
        256, 128, kblock_pipeline=True, bulk_weights=True, tma_tokens=True)
    assert w4.choose_w4a16_tile(num_rows, 8, HIDDEN, INTER) == TileConfig(256, 128, kblock_pipeline=True,
                                                                           bulk_weights=True)
    _check_case(4096, 8, 2, HIDDEN, INTER, group_size, True, seed=4096 + group_size)


@pytest.mark.parametrize("config", ((128, 128, "producer"), (128, 256, "producer"), (256, 128, "consumer")))
@pytest.mark.parametrize("num_tokens", (333, 4096))
def test_w4a16_large_tiles_down(num_tokens, config):
    """Down projection forced onto each large tile (partial last token tiles at T=333, skewed sizes)."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(17 + num_tokens)
    w2 = _quantized(8, HIDDEN, INTER, GROUP, True, device, gen)
    offsets, _, _ = _routing(num_tokens, 8, 2, device, gen)
    act = torch.randn(num_tokens * 2, INTER, device=device, dtype=torch.bfloat16, generator=gen)
    w2p = w4.prepare_w4a16_weights(*w2, GROUP, gated=False)
    y = torch.full((num_tokens * 2, HIDDEN), float("nan"), device=device, dtype=torch.bfloat16)
    w4.w4a16_expert_down(act, offsets, w2p, out=y, config=TileConfig(*config))
    assert not y.isnan().any(), f"tile {config} left rows unwritten"
    err = _rel_l2(y, w4a16_reference_down(act, offsets, *w2, GROUP))
    assert err < 1e-2, f"tile {config}: rel L2 {err:.3e}"


def test_w4a16_cuda_graph_replay():
    """Capture up + down once; replay after changing routing and inputs in place (no host reads)."""
    from light_moe.kernels import w4a16_gemm as w4

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(3)
    num_tokens, num_experts, top_k = 64, 8, 2
    x = torch.randn(num_tokens, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = _quantized(num_experts, 2 * INTER, HIDDEN, GROUP, True, device, gen)
    w2 = _quantized(num_experts, HIDDEN, INTER, GROUP, True, device, gen)
    w13p = w4.prepare_w4a16_weights(*w13, GROUP, gated=True)
    w2p = w4.prepare_w4a16_weights(*w2, GROUP, gated=False)
    offsets, gather_index, _ = _routing(num_tokens, num_experts, top_k, device, gen)
    act = torch.empty(num_tokens * top_k, INTER, device=device, dtype=torch.bfloat16)
    y = torch.empty(num_tokens * top_k, HIDDEN, device=device, dtype=torch.bfloat16)

    replay_up_down_on_new_routing(lambda x, g, o, out: w4.w4a16_expert_up(x, g, o, w13p, out=out),
                                  lambda a, o, out: w4.w4a16_expert_down(a, o, w2p, out=out),
                                  x, gather_index, offsets, act, y, top_k, gen)
    assert _rel_l2(act, w4a16_reference_up(x, gather_index, offsets, *w13, GROUP)) < 1e-2
    assert _rel_l2(y, w4a16_reference_down(act, offsets, *w2, GROUP)) < 1e-2


@pytest.mark.parametrize("k_split", (1, 2, 4))
@pytest.mark.parametrize("num_tokens", (1, 7, 64))
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_TOPK)
def test_w4a16_split_k(num_experts, top_k, num_tokens, k_split):
    """tile_w = 64 forced with k_split 1, 2 and 4 consumer warpgroups along K (up and down, NaN-poisoned
    outputs): the split-K partial sums must add up to the dequantised reference. T=64 with E=8 gives 16
    routed rows per expert: 2 token tiles of 8 per expert and weight tile, so every CTA runs several tiles
    (the per-warpgroup pipeline phases and the s_red reuse across tiles)."""
    from light_moe.kernels.tile_config import TileConfig

    _check_case(num_tokens, num_experts, top_k, HIDDEN, INTER, GROUP, True,
                seed=31 + num_tokens + num_experts + k_split, config=TileConfig(64, 8, "consumer", k_split))


@pytest.mark.parametrize("group_size", (32, 128))
@pytest.mark.parametrize("num_tokens", (1, 64))
def test_w4a16_split_k4_mixtral_shape(num_tokens, group_size):
    """k_split = 4 on the Mixtral shape (64 and 224 k-tiles per tile): up and down against the reference."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(41 + num_tokens + group_size)
    hidden, inter = 4096, 14336
    x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w13 = _quantized(8, 2 * inter, hidden, group_size, True, device, gen)
    w2 = _quantized(8, hidden, inter, group_size, True, device, gen)
    offsets, gather_index, _ = _routing(num_tokens, 8, 2, device, gen)
    num_rows = gather_index.shape[0]
    config = TileConfig(64, 8, "consumer", 4)
    act = torch.full((num_rows, inter), float("nan"), device=device, dtype=torch.bfloat16)
    w4.w4a16_expert_up(x, gather_index, offsets, w4.prepare_w4a16_weights(*w13, group_size, gated=True),
                       out=act, config=config)
    assert not act.isnan().any()
    assert _rel_l2(act, w4a16_reference_up(x, gather_index, offsets, *w13, group_size)) < 1e-2
    y = torch.full((num_rows, hidden), float("nan"), device=device, dtype=torch.bfloat16)
    w4.w4a16_expert_down(act, offsets, w4.prepare_w4a16_weights(*w2, group_size, gated=False), out=y, config=config)
    assert not y.isnan().any()
    assert _rel_l2(y, w4a16_reference_down(act, offsets, *w2, group_size)) < 1e-2


@pytest.mark.parametrize("tile", ((64, 16, 4), (64, 32, 4), (64, 32, 2), (128, 32, 1)))
@pytest.mark.parametrize("num_tokens", (7, 64, 200))
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_TOPK)
def test_w4a16_decode_tiles(num_experts, top_k, num_tokens, tile):
    """The decode-sized tiles with more tokens per tile (16 and 32 columns) and split K: up and down
    against the dequantised reference (NaN-poisoned outputs), where the kernel accepts the config."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    config = TileConfig(tile[0], tile[1], "consumer", tile[2])
    for gated, n_out, k_dim in ((True, 2 * INTER, HIDDEN), (False, HIDDEN, INTER)):
        ok, why = w4.W4A16GroupedGemmSm90.supports(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts,
                                                   group_size=GROUP, config=config)
        if not ok:
            pytest.skip(f"{config}: {why}")
    _check_case(num_tokens, num_experts, top_k, HIDDEN, INTER, GROUP, True,
                seed=53 + num_tokens + num_experts + tile[1] + tile[2], config=config)


DEFERRED_TILES = ((64, 8, 4, 1), (64, 8, 2, 1), (64, 8, 1, 1), (128, 8, 4, 2), (64, 16, 4, 1), (128, 32, 1, 1),
                  (256, 32, 1, 2))


@pytest.mark.parametrize("group_size", (64, 128))
@pytest.mark.parametrize("num_tokens", (1, 7, 64, 333))
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_TOPK)
def test_w4a16_deferred_scale(num_experts, top_k, num_tokens, group_size):
    """TileConfig.deferred_scale (exact q - z in A, one fp32 accumulator per group folded with its scale): split K
    1 / 2 / 4 (a fold per k-tile, or per two), two k-tiles per stage, 16 and 32 token columns, two atoms per
    warpgroup; g = 64 and 128 with zero points; up and down against the dequantising reference, NaN-poisoned.
    T = 64 and 333 give each CTA several tiles (the group accumulator must restart with every tile)."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    ran = 0
    for tile_w, tile_t, k_split, kps in DEFERRED_TILES:
        config = TileConfig(tile_w, tile_t, "consumer", k_split, k_tiles_per_stage=kps, deferred_scale=True)
        if not all(w4.W4A16GroupedGemmSm90.supports(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts,
                                                    group_size=group_size, config=config)[0]
                   for gated, n_out, k_dim in ((True, 2 * INTER, HIDDEN), (False, HIDDEN, INTER))):
            continue
        _check_case(num_tokens, num_experts, top_k, HIDDEN, INTER, group_size, True,
                    seed=71 + num_tokens + num_experts + tile_t + k_split, config=config)
        ran += 1
    assert ran >= 4, f"only {ran} deferred-scale tiles accepted"


@pytest.mark.parametrize("num_tokens", (1, 16, 64))
def test_w4a16_deferred_scale_mixtral_shape(num_tokens):
    """The decode tiles with the deferred scale on the Mixtral shape (64 and 224 k-tiles per tile, g = 128,
    symmetric): 64 x 8 and 128 x 8 with split K 4, up and down against the reference."""
    from light_moe.kernels.tile_config import TileConfig

    for config in (TileConfig(64, 8, "consumer", 4, deferred_scale=True),
                   TileConfig(128, 8, "consumer", 4, k_tiles_per_stage=2, deferred_scale=True)):
        _check_case(num_tokens, 8, 2, 4096, 14336, 128, False, seed=83 + num_tokens, config=config)


@pytest.mark.parametrize("num_tokens", (1, 7, 64, 333))
def test_w4a16_l2_prefetch(num_tokens):
    """TileConfig.l2_prefetch (the down projection prefetches its first stages into L2 before its wait, a hint):
    up then down against the reference, NaN-poisoned; and the down output bit for bit that of the same tile
    without the prefetch (run right after an up GEMM, as in the layer: the expert list it reads early is the
    router's, not the up GEMM's)."""
    from light_moe.kernels import w4a16_gemm as w4
    from light_moe.kernels.tile_config import TileConfig

    for config in (TileConfig(64, 8, "consumer", 4, deferred_scale=True, l2_prefetch=True),
                   TileConfig(256, 32, "consumer", bulk_weights=True, l2_prefetch=True)):
        _check_case(num_tokens, 8, 2, HIDDEN, INTER, 128, True, seed=97 + num_tokens, config=config)
        x, gather_index, offsets, w13p, _ = _up_problem(num_tokens, HIDDEN, INTER, 128, seed=101 + num_tokens)
        gen = torch.Generator(device="cuda").manual_seed(103 + num_tokens)
        w2p = w4.prepare_w4a16_weights(*_quantized(8, HIDDEN, INTER, 128, True, torch.device("cuda"), gen), 128,
                                       gated=False)
        act = w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=config)
        with_prefetch = w4.w4a16_expert_down(act, offsets, w2p, config=config)
        act2 = w4.w4a16_expert_up(x, gather_index, offsets, w13p, config=config)
        without = w4.w4a16_expert_down(act2, offsets, w2p, config=dataclasses.replace(config, l2_prefetch=False))
        assert torch.equal(with_prefetch, without), "the L2 prefetch changed the down projection's output"
