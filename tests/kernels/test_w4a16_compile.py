"""CPU-only compile tests of the W4A16 grouped GEMM (sm_90a cubins), plus CPU checks of its weight layout."""

import pytest
import torch

cute = pytest.importorskip("cutlass.cute")

from cutlass import BFloat16, Int32  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from light_moe.kernels import w4a16_gemm, w4a16_plan  # noqa: E402
from light_moe.kernels import w4a16_layout as layout  # noqa: E402
from light_moe.kernels.tile_config import TileConfig  # noqa: E402
from light_moe.kernels.w4a16_gemm import W4A16GroupedGemmSm90, choose_w4a16_tile, supports  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402


def _rows(dtype, width, align=16):
    return make_fake_compact_tensor(dtype, (cute.sym_int32(), width), stride_order=(1, 0), assumed_align=align)


def _args(gated: bool, num_experts: int, hidden: int, inter: int, group_size: int):
    n_out, k_dim = (2 * inter, hidden) if gated else (hidden, inter)
    q_chunks = num_experts * (k_dim // layout.TILE_K) * (n_out // layout.ATOM_M) * 128
    meta_chunks = num_experts * (k_dim // group_size) * n_out // 4
    qweight = make_fake_compact_tensor(Int32, (q_chunks, 4), stride_order=(1, 0), assumed_align=16)
    meta = make_fake_compact_tensor(Int32, (meta_chunks, 4), stride_order=(1, 0), assumed_align=16)
    tokens = _rows(BFloat16, k_dim)
    gather_index = make_fake_compact_tensor(Int32, (cute.sym_int32(),), assumed_align=4)
    offsets = make_fake_compact_tensor(Int32, (num_experts + 1,), assumed_align=4)
    out = _rows(BFloat16, inter if gated else hidden)
    return n_out, k_dim, (qweight, meta, tokens, gather_index, offsets, out, 132, make_fake_stream())


# One compiled kernel serves zeros and no zeros (symmetric weights carry z = 8 in meta), so "with and without
# zeros" is a data difference; the cases vary projection, tile and group size instead.
CASES = {
    # name: (gated, E, H, I, group size, tile config)
    "up_decode_64x8_g128": (True, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=2)),
    "down_decode_64x8_g128": (False, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=2)),
    # split K over 4 consumer warpgroups (640 threads, 3 partial sums reduced through shared memory)
    "up_decode_64x8_g128_k4": (True, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=4)),
    "down_decode_64x8_g32_k4": (False, 8, 4096, 14336, 32, TileConfig(64, 8, k_split=4)),
    "down_decode_64x8_g128_k4_E64": (False, 64, 4096, 14336, 128, TileConfig(64, 8, k_split=4)),
    "up_64x32_g32_k4_E64": (True, 64, 1024, 768, 32, TileConfig(64, 32, k_split=4)),
    "up_decode_64x16_g128_k4": (True, 8, 4096, 14336, 128, TileConfig(64, 16, k_split=4)),
    "down_decode_64x8_g128_k4_48_stages": (False, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=4, stages=48)),
    # two k-tiles (one g = 128 group) per stage
    "up_decode_64x8_g128_k4_2kps": (True, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=4, k_tiles_per_stage=2)),
    "down_decode_64x16_g128_k4_2kps": (False, 8, 4096, 14336, 128,
                                       TileConfig(64, 16, k_split=4, k_tiles_per_stage=2)),
    "up_mid_128x32_g128_2kps": (True, 8, 4096, 14336, 128, TileConfig(128, 32, k_tiles_per_stage=2)),
    # 256 weight rows (two m64 atoms per consumer warpgroup) for the mid range: half the token bytes per weight byte
    "up_mid_256x32_g128": (True, 8, 4096, 14336, 128, TileConfig(256, 32)),
    "down_mid_256x64_g128_2kps": (False, 8, 4096, 14336, 128, TileConfig(256, 64, k_tiles_per_stage=2)),
    "down_mid_256x32_g32_E64": (False, 64, 1024, 768, 32, TileConfig(256, 32)),
    # split K over 128 rows: each K warpgroup takes both atoms (more bytes per k-tile's fixed work)
    "up_decode_128x8_g128_k4": (True, 8, 4096, 14336, 128, TileConfig(128, 8, k_split=4)),
    "down_decode_128x8_g128_k4_2kps": (False, 8, 4096, 14336, 128, TileConfig(128, 8, k_split=4, k_tiles_per_stage=2)),
    "up_decode_128x16_g32_k2_E64": (True, 64, 1024, 768, 32, TileConfig(128, 16, k_split=2)),
    "down_prefill_128x128_g128_2kps": (False, 8, 4096, 14336, 128,
                                       TileConfig(128, 128, "producer", k_tiles_per_stage=2)),
    "up_prefill_128x256_g128_producer_lag3": (True, 8, 4096, 14336, 128,
                                              TileConfig(128, 256, "producer", cp_async_lag=3)),
    "up_prefill_128x128_g128_producer": (True, 8, 4096, 14336, 128, TileConfig(128, 128, "producer")),
    "down_prefill_128x128_g128_producer": (False, 8, 4096, 14336, 128, TileConfig(128, 128, "producer")),
    # compute-bound tile (> 256 tokens per expert): 2 warpgroups x 64 rows x 256 tokens, a 128-register fp32
    # accumulator per thread, 5 stages of 32 KB token rows, 4 epilogue chunks of 64 tokens
    "up_prefill_128x256_g128_producer": (True, 8, 4096, 14336, 128, TileConfig(128, 256, "producer")),
    # k-block pipelined wgmma (opt-in): prefill, mid with two atoms per warpgroup, split-K decode, g = 32
    "down_prefill_128x256_g128_kblock": (False, 8, 4096, 14336, 128,
                                         TileConfig(128, 256, "producer", kblock_pipeline=True)),
    "up_mid_256x32_g128_2kps_kblock": (True, 8, 4096, 14336, 128,
                                       TileConfig(256, 32, k_tiles_per_stage=2, kblock_pipeline=True)),
    "down_decode_64x8_g128_k4_kblock": (False, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=4, kblock_pipeline=True)),
    "up_prefill_256x128_g128_producer": (True, 8, 4096, 14336, 128, TileConfig(256, 128, "producer")),
    # int4 atoms by one cp.async.bulk per k-tile (opt-in): decode split K, prefill with the producer fence,
    # two k-tiles per stage, g = 32
    "down_decode_64x8_g128_k4_bulk": (False, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=4, bulk_weights=True)),
    "up_prefill_256x128_g128_producer_bulk": (True, 8, 4096, 14336, 128,
                                              TileConfig(256, 128, "producer", kblock_pipeline=True,
                                                         bulk_weights=True)),
    "down_mid_256x32_g128_2kps_bulk": (False, 8, 4096, 14336, 128,
                                       TileConfig(256, 32, k_tiles_per_stage=2, bulk_weights=True)),
    "up_decode_128x8_g32_k4_E64_bulk": (True, 64, 1024, 768, 32, TileConfig(128, 8, k_split=4, bulk_weights=True)),
    "down_prefill_256x128_g32_E64": (False, 64, 1024, 768, 32, TileConfig(256, 128, "producer")),
    "up_mid_128x64_g32_E64_kblock": (True, 64, 1024, 768, 32, TileConfig(128, 64, kblock_pipeline=True)),
    "down_prefill_128x256_g128_producer": (False, 8, 4096, 14336, 128, TileConfig(128, 256, "producer")),
    "up_prefill_128x256_g32_E64": (True, 64, 1024, 768, 32, TileConfig(128, 256, "producer")),
    "up_mid_128x32_g32_E64": (True, 64, 1024, 768, 32, TileConfig(128, 32)),
    "down_mid_128x64_g64_E64": (False, 64, 1024, 768, 64, TileConfig(128, 64)),
    # tile_w = 64 beyond decode (choose_w4a16_tile falls back to it when n_out % 128): split K with a
    # 64 x 32 partial-sum exchange, g = 128 meta in every stage, 2 epilogue chunks of the gated output
    "up_64x32_g128_split_k_E64": (True, 64, 1024, 768, 128, TileConfig(64, 32, k_split=2)),
    # token rows by one TMA per k-tile (opt-in; the up projection's caller gathers x first): prefill with bulk
    # int4, 128 x 256, decode
    "up_prefill_256x128_g128_tma": (True, 8, 4096, 14336, 128,
                                    TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True, tma_tokens=True)),
    "down_prefill_256x128_g128_tma": (False, 8, 4096, 14336, 128,
                                      TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True, tma_tokens=True)),
    "down_prefill_128x256_g32_E64_tma": (False, 64, 1024, 768, 32, TileConfig(128, 256, tma_tokens=True)),
    "down_decode_64x8_g128_k4_tma": (False, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=4, tma_tokens=True)),
    # deferred group scale (opt-in): split-K decode (a group per k-tile of a warpgroup), one warpgroup over
    # two-k-tile groups (fold every other k-tile), two k-tiles per stage, two atoms, g = 64, 32 token columns
    "up_decode_64x8_g128_k4_deferred": (True, 8, 4096, 14336, 128, TileConfig(64, 8, k_split=4, deferred_scale=True)),
    "down_decode_64x8_g128_k1_deferred": (False, 8, 4096, 14336, 128,
                                          TileConfig(64, 8, k_split=1, deferred_scale=True)),
    "down_decode_128x8_g128_k4_2kps_deferred": (False, 8, 4096, 14336, 128,
                                                TileConfig(128, 8, k_split=4, k_tiles_per_stage=2,
                                                           deferred_scale=True)),
    "up_mid_128x32_g64_E64_deferred": (True, 64, 1024, 768, 64, TileConfig(128, 32, deferred_scale=True)),
    "down_decode_64x16_g128_k2_tma_deferred": (False, 8, 4096, 14336, 128,
                                               TileConfig(64, 16, k_split=2, tma_tokens=True, deferred_scale=True)),
    # the down projection's L2 prefetch before its wait (opt-in candidate): the decode tile of the table, and a
    # 256-row bulk-weight tile
    "down_decode_64x8_g128_k4_deferred_l2_prefetch": (False, 8, 4096, 14336, 128,
                                                      TileConfig(64, 8, k_split=4, deferred_scale=True,
                                                                 l2_prefetch=True)),
    "down_mid_256x32_g128_bulk_l2_prefetch": (False, 8, 4096, 14336, 128,
                                              TileConfig(256, 32, bulk_weights=True, l2_prefetch=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_w4a16_gemm_compiles(name, tmp_path):
    gated, num_experts, hidden, inter, group_size, config = CASES[name]
    n_out, k_dim, args = _args(gated, num_experts, hidden, inter, group_size)
    kernel = W4A16GroupedGemmSm90(
        gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, group_size=group_size, config=config
    )
    cubin, seconds = compile_sm90a(kernel, *args, dump_root=str(tmp_path))
    print(f"{name}: {seconds:.2f} s, stages={kernel.stages}, cubin {cubin}")


def test_w4a16_gemm_consumer_split(tmp_path):
    """TileConfig.k_split: tile_w = 64 splits K over 2 or 4 consumer warpgroups (meta in every stage);
    k_split = 1 keeps the one-warpgroup kernel, which must still compile."""
    gated, num_experts, hidden, inter, group_size, config = CASES["up_decode_64x8_g128"]
    n_out, k_dim, args = _args(gated, num_experts, hidden, inter, group_size)
    kw = dict(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, group_size=group_size)
    split = W4A16GroupedGemmSm90(**kw, config=config)
    assert (split.k_split, split.m_wg, split.n_consumer_wg, split.meta_stages) == (2, 1, 2, 1)
    assert split.red_words == 64 * 8 and split.threads == 384
    four = W4A16GroupedGemmSm90(**kw, config=TileConfig(64, 8, k_split=4))
    assert (four.k_split, four.m_wg, four.n_consumer_wg, four.meta_stages) == (4, 1, 4, 1)
    assert four.red_words == 3 * 64 * 8 and four.threads == 640
    # setmaxnreg: the consumers' increase must fit what the producer frees at the 96-register launch
    assert 128 * (96 - w4a16_gemm.PRODUCER_REGS) >= 4 * 128 * (w4a16_gemm.CONSUMER_REGS[4] - 96)
    wide = W4A16GroupedGemmSm90(**kw, config=TileConfig(128, 16))
    assert (wide.k_split, wide.m_wg, wide.n_consumer_wg, wide.meta_stages) == (1, 2, 2, 2)
    one = W4A16GroupedGemmSm90(**kw, config=TileConfig(64, 8, k_split=1))
    assert (one.k_split, one.n_consumer_wg, one.meta_stages, one.red_words) == (1, 1, 2, 0)
    compile_sm90a(one, *args, dump_root=str(tmp_path))


def test_k_split_config_checks():
    """k_split is validated by TileConfig, refused by the bf16 kernel and checked against the shape here."""
    from light_moe.kernels.grouped_gemm import GroupedGemmSm90

    with pytest.raises(ValueError, match="k_split"):
        TileConfig(64, 8, k_split=3)
    assert TileConfig(64, 8, k_split=2) != TileConfig(64, 8, k_split=4)  # distinct compile-cache keys
    ok, reason = GroupedGemmSm90.supports(
        gated=True, n_out=28672, k_dim=4096, num_experts=8, config=TileConfig(64, 8, k_split=2)
    )
    assert not ok and "k_split" in reason
    with pytest.raises(ValueError, match="k_split"):
        GroupedGemmSm90(gated=True, n_out=28672, k_dim=4096, num_experts=8, config=TileConfig(64, 8, k_split=4))
    kw = dict(gated=False, n_out=4096, num_experts=8, group_size=128)
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, k_dim=128 * 3, config=TileConfig(64, 8, k_split=4))
    assert not ok and "divide" in reason  # 6 k-tiles: k_split = 4 does not divide them
    assert W4A16GroupedGemmSm90.supports(**kw, k_dim=128 * 3, config=TileConfig(64, 8, k_split=2))[0]
    assert W4A16GroupedGemmSm90.supports(**kw, k_dim=14336, config=TileConfig(128, 16, k_split=2))[0]
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, k_dim=14336, config=TileConfig(256, 16, k_split=2))
    assert not ok and "split K" in reason
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, k_dim=14336, config=TileConfig(64, 64, k_split=4))
    assert not ok and "tile_t" in reason
    assert W4A16GroupedGemmSm90.supports(**kw, k_dim=14336, config=TileConfig(256, 64))[0]
    assert W4A16GroupedGemmSm90.supports(**kw, k_dim=14336, config=TileConfig(256, 128))[0]
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, k_dim=14336, config=TileConfig(256, 256))
    assert not ok and "tile_w" in reason  # two atoms x 256 columns per warpgroup: 256 accumulator registers
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, k_dim=14336, config=TileConfig(256, 32, k_split=2))
    assert not ok and "split K" in reason


def test_tma_token_rows_config_checks():
    """TileConfig.tma_tokens: one k-tile per stage, refused by the bf16 kernel; it drops the proxy fence whatever
    the config's fence mode."""
    from light_moe.kernels.grouped_gemm import GroupedGemmSm90

    tma = TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True, tma_tokens=True)
    kw = dict(num_experts=8, group_size=128)
    assert W4A16GroupedGemmSm90.supports(gated=False, n_out=4096, k_dim=14336, **kw, config=tma)[0]
    assert W4A16GroupedGemmSm90.supports(gated=True, n_out=28672, k_dim=4096, **kw, config=tma)[0]
    ok, reason = W4A16GroupedGemmSm90.supports(gated=False, n_out=4096, k_dim=14336, **kw,
                                               config=TileConfig(256, 64, k_tiles_per_stage=2, tma_tokens=True))
    assert not ok and "one k-tile per stage" in reason
    ok, reason = GroupedGemmSm90.supports(gated=False, n_out=4096, k_dim=14336, num_experts=8,
                                          config=TileConfig(256, 128, tma_tokens=True))
    assert not ok and "tma_tokens" in reason
    for fence in ("consumer", "producer"):
        kernel = W4A16GroupedGemmSm90(gated=False, n_out=4096, k_dim=14336, **kw,
                                      config=TileConfig(256, 128, fence, tma_tokens=True))
        assert kernel.fence_mode == "none"


def test_two_k_tiles_per_stage_config_checks():
    """k_tiles_per_stage = 2: one g = 128 group per stage (other groups refused), 2 x k_split must divide the
    k-tiles, stages twice the bytes; the bf16 kernel refuses it."""
    from light_moe.kernels.grouped_gemm import GroupedGemmSm90

    with pytest.raises(ValueError, match="k_tiles_per_stage"):
        TileConfig(64, 8, k_tiles_per_stage=3)
    kw = dict(gated=False, n_out=4096, k_dim=14336, num_experts=8)
    two = TileConfig(64, 8, k_split=4, k_tiles_per_stage=2)
    assert W4A16GroupedGemmSm90.supports(**kw, group_size=128, config=two)[0]
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, group_size=32, config=two)
    assert not ok and "k_tiles_per_stage" in reason
    ok, reason = W4A16GroupedGemmSm90.supports(gated=False, n_out=4096, k_dim=128 * 10, num_experts=8, group_size=128,
                                               config=two)  # 20 k-tiles: 2 x 4 does not divide them
    assert not ok and "k_tiles_per_stage" in reason
    one = TileConfig(64, 8, k_split=4)
    assert W4A16GroupedGemmSm90.stage_bytes(two, 128) == 2 * W4A16GroupedGemmSm90.stage_bytes(one, 128) - 64 * 4
    kernel = W4A16GroupedGemmSm90(**kw, group_size=128, config=two)
    assert (kernel.kps, kernel.meta_stages) == (2, 1)
    ok, reason = GroupedGemmSm90.supports(gated=False, n_out=4096, k_dim=14336, num_experts=8,
                                          config=TileConfig(64, 8, k_tiles_per_stage=2))
    assert not ok and "k_tiles_per_stage" in reason


def test_deferred_scale_config_checks():
    """deferred_scale needs at most one group per k-tile (g >= 64) and whole-k-tile wgmma; its kernel keeps the
    thread and stage counts of the same tile without it."""
    kw = dict(gated=False, n_out=4096, k_dim=14336, num_experts=8)
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, group_size=32, config=TileConfig(64, 8, k_split=4,
                                                                                       deferred_scale=True))
    assert not ok and "deferred_scale" in reason
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, group_size=128, config=TileConfig(
        64, 8, k_split=4, kblock_pipeline=True, deferred_scale=True))
    assert not ok and "k-block" in reason
    for g in (64, 128):
        config = TileConfig(64, 8, k_split=4, deferred_scale=True)
        assert W4A16GroupedGemmSm90.supports(**kw, group_size=g, config=config) == (True, "ok")
        on = W4A16GroupedGemmSm90(**kw, group_size=g, config=config)
        off = W4A16GroupedGemmSm90(**kw, group_size=g, config=TileConfig(64, 8, k_split=4))
        assert (on.threads, on.stages, on.deferred_scale) == (off.threads, off.stages, True)


def test_l2_prefetch_only_in_the_down_projection(tmp_path):
    """TileConfig.l2_prefetch reads the expert list before griddepcontrol.wait: safe only where that list is not
    the previous kernel's output, the down projection; the up projection's kernel ignores the flag."""
    config = TileConfig(64, 8, k_split=4, l2_prefetch=True)
    kw = dict(num_experts=8, group_size=128, config=config)
    up = W4A16GroupedGemmSm90(gated=True, n_out=2 * 14336, k_dim=4096, **kw)
    down = W4A16GroupedGemmSm90(gated=False, n_out=4096, k_dim=14336, **kw)
    assert (up.l2_prefetch, down.l2_prefetch) == (False, True)
    # its PTX has the prefetch; the same kernel without the flag has none
    on_ptx = compile_sm90a_ptx(down, *_args(False, 8, 4096, 14336, 128)[2], dump_root=str(tmp_path / "on"))
    off = W4A16GroupedGemmSm90(gated=False, n_out=4096, k_dim=14336, num_experts=8, group_size=128,
                               config=TileConfig(64, 8, k_split=4))
    off_ptx = compile_sm90a_ptx(off, *_args(False, 8, 4096, 14336, 128)[2], dump_root=str(tmp_path / "off"))
    assert "cp.async.bulk.prefetch.L2.global" in on_ptx and "cp.async.bulk.prefetch.L2.global" not in off_ptx
    # the prefetch comes before the grid-dependency wait, and the wait is still there
    assert on_ptx.index("cp.async.bulk.prefetch.L2.global") < on_ptx.index("griddepcontrol.wait")


def test_explicit_pipeline_stages():
    """TileConfig.stages sets the W4A16 pipeline depth (beyond MAX_STAGES when it fits), is refused where it
    does not fit, and by the bf16 kernel; 0 keeps the automatic depth."""
    from light_moe.kernels.grouped_gemm import GroupedGemmSm90

    with pytest.raises(ValueError, match="stages"):
        TileConfig(64, 8, stages=-1)
    kw = dict(gated=False, n_out=4096, k_dim=14336, num_experts=8, group_size=128)
    auto = W4A16GroupedGemmSm90(**kw, config=TileConfig(64, 8, k_split=4))
    deep = W4A16GroupedGemmSm90(**kw, config=TileConfig(64, 8, k_split=4, stages=48))
    shallow = W4A16GroupedGemmSm90(**kw, config=TileConfig(64, 8, k_split=4, stages=8))
    assert (auto.stages, deep.stages, shallow.stages) == (w4a16_plan.MAX_STAGES, 48, 8)
    assert W4A16GroupedGemmSm90(**kw, config=TileConfig(128, 32)).stages <= w4a16_plan.MAX_STAGES
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, config=TileConfig(128, 256, "producer", stages=40))
    assert not ok and "do not fit" in reason
    ok, reason = GroupedGemmSm90.supports(gated=False, n_out=4096, k_dim=14336, num_experts=8,
                                          config=TileConfig(64, 8, stages=8))
    assert not ok and "stages" in reason


def _canonical(num_experts, n_out, k_dim, group_size, with_zeros, generator):
    q = torch.randint(0, 16, (num_experts, n_out, k_dim), dtype=torch.int32, generator=generator)
    qweight = torch.zeros(num_experts, n_out, k_dim // 8, dtype=torch.int32)
    for i in range(8):
        qweight |= q[..., i::8] << (4 * i)
    scales = (torch.rand(num_experts, n_out, k_dim // group_size, generator=generator) * 0.02 + 1e-3).bfloat16()
    zeros = None
    if with_zeros:
        zeros = torch.randint(0, 16, scales.shape, dtype=torch.uint8, generator=generator)
    return q, qweight, scales, zeros


@pytest.mark.parametrize("gated", (False, True))
@pytest.mark.parametrize("group_size", (32, 64, 128))
@pytest.mark.parametrize("with_zeros", (False, True))
def test_prepared_layout_round_trip(gated, group_size, with_zeros):
    """The packed fragment order + the emulated lop3/fma dequant reproduce bf16((q - z) * s) exactly."""
    gen = torch.Generator().manual_seed(group_size + 2 * gated + with_zeros)
    _, qweight, scales, zeros = _canonical(3, 128, 256, group_size, with_zeros, gen)
    prepared = layout.prepare_w4a16_weights(qweight, scales, zeros, group_size, gated)
    assert prepared.qweight.shape == (3, 256 // 64, 128 // 64, 128, 4)
    assert prepared.meta.shape == (3, 256 // group_size, 128)
    ref = layout.dequantize_reference(qweight, scales, zeros, group_size).bfloat16().float()
    assert torch.equal(layout.unpack_prepared(prepared), ref)


def test_fragment_order_of_one_thread():
    """Thread t = 32 w + 4 g + q, k16 block kb: word kb holds rows 16 w + g (+8), columns 2 q (+1, +8, +9)."""
    q = torch.zeros(1, 64, 128, dtype=torch.int32)
    w, g, qq, kb = 2, 5, 3, 1
    r, c = 16 * w + g, 16 * kb + 2 * qq
    values = {
        (r, c): 1,
        (r, c + 1): 2,
        (r + 8, c): 3,
        (r + 8, c + 1): 4,
        (r, c + 8): 5,
        (r, c + 9): 6,
        (r + 8, c + 8): 7,
        (r + 8, c + 9): 8,
    }
    for (row, col), v in values.items():
        q[0, row, col] = v
    qweight = torch.zeros(1, 64, 16, dtype=torch.int32)
    for i in range(8):
        qweight |= q[..., i::8] << (4 * i)
    scales = torch.ones(1, 64, 1, dtype=torch.bfloat16)
    prepared = layout.prepare_w4a16_weights(qweight, scales, None, 128, gated=False)
    word = int(prepared.qweight[0, 0, 0, 32 * w + 4 * g + qq, kb]) & 0xFFFFFFFF
    # bf16x2 register i = (value 2i, value 2i + 1) = nibbles (i, i + 4)
    for i in range(4):
        assert (word >> (4 * i)) & 0xF == 2 * i + 1
        assert (word >> (4 * (i + 4))) & 0xF == 2 * i + 2


def test_supports_and_tiles():
    assert supports(8, 4096, 14336, 128) == (True, "ok")
    assert not supports(8, 4096, 14336, 100)[0]
    assert not supports(8, 4096, 14300, 128)[0]
    assert supports(8, 4096, 14336 + 64, 64) == (True, "ok")  # 225 k-tiles: odd, split K falls back to 1
    assert not supports(8, 4096, 14336 + 64, 128)[0]  # g = 128 does not divide I
    # split K over 128 rows only where its tiles fill the last wave of 132 SMs to >= 90%
    assert choose_w4a16_tile(2, 8, 28672, 4096) == TileConfig(64, 8, k_split=4)  # T=1 up: 448 tiles, 85%
    assert choose_w4a16_tile(2, 8, 4096, 14336) == TileConfig(64, 8, k_split=4)  # T=1 down: 64 tiles
    assert choose_w4a16_tile(2 * 4, 8, 28672, 4096) == TileConfig(128, 8, k_split=4)  # 4 experts: 896 tiles
    assert choose_w4a16_tile(2 * 4, 8, 4096, 14336) == TileConfig(128, 8, k_split=4)  # 128 tiles, 97%
    assert choose_w4a16_tile(2 * 4, 8, 4096, 14336, num_sms=114) == TileConfig(64, 8, k_split=4)  # 2 waves, 56%
    assert choose_w4a16_tile(2 * 16, 8, 28672, 4096) == TileConfig(128, 8, k_split=4)  # 4 per expert
    assert choose_w4a16_tile(2 * 32, 8, 28672, 4096) == TileConfig(256, 32, bulk_weights=True)  # 8 per expert
    assert choose_w4a16_tile(2 * 64, 8, 28672, 4096) == TileConfig(256, 32, bulk_weights=True)  # 16 per expert
    assert choose_w4a16_tile(2 * 128, 8, 28672, 4096) == TileConfig(256, 64, bulk_weights=True)  # 32 per expert
    # g = 128 weights take two k-tiles (one group) per stage there; other group sizes cannot
    assert choose_w4a16_tile(2 * 128, 8, 28672, 4096, group_size=128) == TileConfig(256, 64, k_tiles_per_stage=2,
                                                                                    bulk_weights=True)
    assert choose_w4a16_tile(2 * 128, 8, 28672, 4096, group_size=32) == TileConfig(256, 64, bulk_weights=True)
    assert choose_w4a16_tile(2 * 256, 8, 28672, 4096, group_size=128).k_tiles_per_stage == 1
    # the deferred group scale where it was measured to win (64-row decode tiles, the 256 x 32 tile), g >= 64 known
    for g in (64, 128):
        assert choose_w4a16_tile(2, 8, 28672, 4096, group_size=g) == TileConfig(64, 8, k_split=4, deferred_scale=True)
        assert choose_w4a16_tile(2, 8, 4096, 14336, group_size=g) == TileConfig(64, 8, k_split=4, deferred_scale=True)
        assert choose_w4a16_tile(2 * 4, 8, 28672, 4096, group_size=g) == TileConfig(128, 8, k_split=4)
        assert choose_w4a16_tile(2 * 64, 8, 28672, 4096, group_size=g) == TileConfig(256, 32, bulk_weights=True,
                                                                                      deferred_scale=True)
        assert not choose_w4a16_tile(2 * 128, 8, 28672, 4096, group_size=g).deferred_scale
    assert choose_w4a16_tile(2, 8, 28672, 4096, group_size=32) == TileConfig(64, 8, k_split=4)  # two groups a k-tile
    assert choose_w4a16_tile(2 * 64, 8, 28672, 4096, group_size=32) == TileConfig(256, 32, bulk_weights=True)
    # 64 per expert: the k-block pipeline and int4 by cp.async.bulk
    assert choose_w4a16_tile(2 * 256, 8, 28672, 4096) == TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True)
    assert choose_w4a16_tile(2 * 256, 8, 384, 4096) == TileConfig(128, 128)  # no k-block pipeline at 128 rows
    assert choose_w4a16_tile(2, 8, 2816, 2048) == TileConfig(64, 8, k_split=4)
    assert choose_w4a16_tile(2, 60, 2048, 1408) == TileConfig(64, 8, k_split=2)  # Qwen2-MoE down: 22 k-tiles
    assert choose_w4a16_tile(2 * 64, 8, 320, 4096) == TileConfig(64, 32, k_split=2)  # 256 and 128 do not divide 320
    assert choose_w4a16_tile(2 * 64, 8, 384, 4096) == TileConfig(128, 32)  # 256 does not divide 384
    prefill = TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True)
    assert choose_w4a16_tile(2 * 1024, 8, 28672, 4096) == prefill  # 256 per expert
    assert choose_w4a16_tile(2 * 4096, 8, 28672, 4096) == prefill
    # the up projection takes its token rows by TMA there (x gathered first); only with 256 rows
    prefill_up = TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True, tma_tokens=True)
    assert choose_w4a16_tile(2 * 1024, 8, 28672, 4096, gated=True) == prefill_up
    assert choose_w4a16_tile(2 * 1024, 8, 4096, 14336, gated=False) == prefill
    assert choose_w4a16_tile(2 * 256, 8, 384, 4096, gated=True) == TileConfig(128, 128)
    assert choose_w4a16_tile(2 * 128, 8, 28672, 4096, gated=True) == TileConfig(256, 64, bulk_weights=True)
    # every table row, on every shape the families use, is one the kernel accepts
    for num_rows in (1, 2, 8, 64, 128, 512, 2048, 8192, 32768):
        for num_experts, n_out, k_dim in ((8, 28672, 4096), (8, 4096, 14336), (60, 2816, 2048), (60, 2048, 1408),
                                          (128, 1536, 2048), (128, 2048, 768), (64, 2048, 2048), (64, 2048, 1024)):
            for group_size in (32, 64, 128):
                for gated in (False, True):
                    config = choose_w4a16_tile(num_rows, num_experts, n_out, k_dim, group_size=group_size, gated=gated)
                    ok, why = W4A16GroupedGemmSm90.supports(gated=gated, n_out=n_out, k_dim=k_dim,
                                                            num_experts=num_experts, group_size=group_size,
                                                            config=config)
                    assert ok, (num_rows, num_experts, n_out, k_dim, group_size, gated, config, why)
    for gated, n_out, k_dim in ((True, 28672, 4096), (False, 4096, 14336)):
        for group_size in (32, 128):
            kernel = W4A16GroupedGemmSm90(
                gated=gated, n_out=n_out, k_dim=k_dim, num_experts=8, group_size=group_size,
                config=TileConfig(128, 256, "producer"),
            )  # fmt: skip
            assert kernel.stages >= 4 and kernel.epi_t == 64
            kernel = W4A16GroupedGemmSm90(
                gated=gated, n_out=n_out, k_dim=k_dim, num_experts=8, group_size=group_size,
                config=TileConfig(256, 128),
            )  # fmt: skip
            assert kernel.stages >= 4
    ok, reason = W4A16GroupedGemmSm90.supports(
        gated=True, n_out=28672, k_dim=4096, num_experts=8, group_size=128, config=TileConfig(256, 256)
    )
    assert not ok and "tile_w" in reason


def test_bench_tile_specs():
    """`bench.w4a16_experts --configs` specs: tile_w x tile_t x k_split [x k-tiles per stage], fence suffix,
    sN stages; without a suffix the fence of the table row with that tile."""
    from light_moe.bench.w4a16_experts import _parse_config
    from light_moe.kernels.w4a16_gemm import W4A16_TILE_TABLE as table

    assert _parse_config("64x8x4", table) == TileConfig(64, 8, "consumer", 4)
    assert _parse_config("64x8x2p", table) == TileConfig(64, 8, "producer", 2)
    assert _parse_config("64x8x4s40", table) == TileConfig(64, 8, "consumer", 4, stages=40)
    assert _parse_config("64x8x4x2", table) == TileConfig(64, 8, "consumer", 4, k_tiles_per_stage=2)
    assert _parse_config("64x8x4x2ns16", table) == TileConfig(64, 8, "none", 4, stages=16, k_tiles_per_stage=2)
    assert _parse_config("256x128b", table) == TileConfig(256, 128, "consumer", kblock_pipeline=True)  # table fence
    assert _parse_config("128x128", table) == TileConfig(128, 128, "consumer")  # not in the table: consumer
    assert _parse_config("128x256x1pl3", table) == TileConfig(128, 256, "producer", cp_async_lag=3)
    assert _parse_config("128x256x1pb", table) == TileConfig(128, 256, "producer", kblock_pipeline=True)
    assert _parse_config("256x128x1cbw", table) == TileConfig(256, 128, "consumer", kblock_pipeline=True,
                                                              bulk_weights=True)
    assert _parse_config("64x8x4w", table) == TileConfig(64, 8, "consumer", 4, bulk_weights=True)
    assert _parse_config("64x8x4x2b", table) == TileConfig(64, 8, "consumer", 4, k_tiles_per_stage=2,
                                                          kblock_pipeline=True)
    assert _parse_config("64x8x4d", table) == TileConfig(64, 8, "consumer", 4, deferred_scale=True)
    assert _parse_config("64x8x4x2td", table) == TileConfig(64, 8, "consumer", 4, k_tiles_per_stage=2, tma_tokens=True,
                                                           deferred_scale=True)
    with pytest.raises(ValueError, match="tile spec"):
        _parse_config("64x8x4q", table)
    with pytest.raises(ValueError, match="cp_async_lag"):
        TileConfig(64, 8, cp_async_lag=0)
    kw = dict(gated=True, n_out=28672, k_dim=4096, num_experts=8, group_size=128)
    stages = W4A16GroupedGemmSm90(**kw, config=TileConfig(128, 256, "producer")).stages
    ok, reason = W4A16GroupedGemmSm90.supports(**kw, config=TileConfig(128, 256, "producer", cp_async_lag=stages))
    assert not ok and "cp_async_lag" in reason


def test_w4a16_experts_round_robin_alternates_and_takes_medians():
    """bench.w4a16_experts --rounds: every variant once per round, reverse order on odd rounds, so a drift
    (a clock falling over the run) lands on all variants alike; medians, min and max per variant."""
    from light_moe.bench.w4a16_experts import round_robin

    calls, clock = [], iter(range(100))
    times = round_robin({"a": "A", "b": "B", "c": "C"}, 3, lambda fn: calls.append(fn) or 10.0 * next(clock))
    assert calls == ["A", "B", "C", "C", "B", "A", "A", "B", "C"]
    # a: samples 0, 50, 60; b: 10, 40, 70; c: 20, 30, 80
    assert times["a"] == dict(median=50.0, min=0.0, max=60.0)
    assert times["b"] == dict(median=40.0, min=10.0, max=70.0)
    assert times["c"] == dict(median=30.0, min=20.0, max=80.0)
