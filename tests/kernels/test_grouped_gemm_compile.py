"""CPU-only compile tests of the grouped GEMM: every variant (up, down, decode) must yield an sm_90a cubin."""

import re

import pytest

cute = pytest.importorskip("cutlass.cute")

from cutlass import BFloat16, Int32  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor  # noqa: E402

from light_moe.kernels.grouped_gemm import GroupedGemmSm90  # noqa: E402
from light_moe.kernels.tile_config import TileConfig, choose_tile_config  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402


def _rows(dtype, width, align=16):
    return make_fake_compact_tensor(dtype, (cute.sym_int32(), width), stride_order=(1, 0), assumed_align=align)


def _args(gated: bool, num_experts: int, hidden: int, inter: int):
    n_out, k_dim = (2 * inter, hidden) if gated else (hidden, inter)
    weights = make_fake_tensor(BFloat16, (n_out, k_dim, num_experts), (k_dim, 1, n_out * k_dim), assumed_align=16)
    tokens = _rows(BFloat16, k_dim)
    gather_index = make_fake_compact_tensor(Int32, (cute.sym_int32(),), assumed_align=4)
    offsets = make_fake_compact_tensor(Int32, (num_experts + 1,), assumed_align=4)
    out = _rows(BFloat16, inter if gated else hidden)
    return n_out, k_dim, (weights, tokens, gather_index, offsets, out, 132, make_fake_stream())


CASES = {
    # name: (gated, E, H, I, tile config); together they cover every row of tile_config.TILE_TABLE
    "up_prefill_256x128_producer_fence": (True, 8, 4096, 14336, TileConfig(256, 128, "producer")),
    "down_prefill_256x128_producer_fence": (False, 8, 4096, 14336, TileConfig(256, 128, "producer")),
    "up_prefill_256x128_producer_fence_lag2": (True, 8, 4096, 14336, TileConfig(256, 128, "producer", cp_async_lag=2)),
    "up_decode_64x8": (True, 8, 4096, 14336, TileConfig(64, 8)),
    "down_decode_64x8": (False, 8, 4096, 14336, TileConfig(64, 8)),
    "up_mid_256x64_E64": (True, 64, 1024, 768, TileConfig(256, 64)),
    "down_mid_128x32_E64": (False, 64, 1024, 768, TileConfig(128, 32)),
    "up_mid_128x64_E128": (True, 128, 1024, 768, TileConfig(128, 64)),
    "down_mid_128x128_E128": (False, 128, 1024, 768, TileConfig(128, 128)),
    # two-CTA clusters (TileConfig.cluster_t = 2: the weight tile multicast to both CTAs), opt-in
    "up_cluster2_256x64": (True, 8, 4096, 14336, TileConfig(256, 64, cluster_t=2)),
    "down_cluster2_256x128_producer_fence": (False, 8, 4096, 14336, TileConfig(256, 128, "producer", cluster_t=2)),
    "up_cluster2_128x128_E64": (True, 64, 1024, 768, TileConfig(128, 128, cluster_t=2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_grouped_gemm_compiles(name, tmp_path):
    gated, num_experts, hidden, inter, config = CASES[name]
    n_out, k_dim, args = _args(gated, num_experts, hidden, inter)
    kernel = GroupedGemmSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, config=config)
    cubin, seconds = compile_sm90a(kernel, *args, dump_root=str(tmp_path))
    print(f"{name}: {seconds:.2f} s, stages={kernel.stages}, cubin {cubin}")


def test_tile_heuristic_table():
    # Mixtral-8x7B top-2: decode -> 64-row weight tiles, 8 tokens; prefill -> 256 x 128, producer fence.
    assert choose_tile_config(2, 8, 28672) == TileConfig(64, 8)
    assert choose_tile_config(2 * 4096, 8, 28672) == TileConfig(256, 128, "producer")
    assert choose_tile_config(2 * 64, 8, 4096) == TileConfig(128, 32)
    assert choose_tile_config(2 * 1024, 8, 4096) == TileConfig(256, 64)
    assert choose_tile_config(8 * 4096, 128, 192) == TileConfig(64, 64)  # tile_w halves until it divides n_out


def _mbarrier_init_counts(ptx: str) -> set[int]:
    """The arrival counts of the kernel's mbarrier.init instructions (each takes a register set by a mov before it)."""
    movs = dict(re.findall(r"mov\.b32\s+(%r\d+), (\d+);", ptx))
    return {int(movs[reg]) for reg in re.findall(r"mbarrier\.init\.shared\.b64\s+\[[^\]]+\], (%r\d+);", ptx)}


def test_cluster_kernel_multicasts_the_weight_tile(tmp_path):
    """cluster_t = 2: each CTA's weight TMA is one multicast of half the tile's rows into the cluster, a consumer warp
    hands a stage back to both CTAs (remote mbarrier arrivals through mapa), the barriers are initialised before
    the cluster barrier lets anything reach them; without a cluster none of that appears."""
    n_out, k_dim, args = _args(True, 8, 4096, 14336)
    ptx = {}
    for cluster in (1, 2):
        kernel = GroupedGemmSm90(gated=True, n_out=n_out, k_dim=k_dim, num_experts=8,
                                 config=TileConfig(256, 64, cluster_t=cluster))
        ptx[cluster] = compile_sm90a_ptx(kernel, *args, dump_root=str(tmp_path / str(cluster)))
    tma = [line for line in ptx[2].splitlines() if "cp.async.bulk.tensor" in line]
    assert tma and all("multicast::cluster" in line for line in tma), tma
    assert "mapa.shared::cluster" in ptx[2] and "mbarrier.arrive.release.cta.shared::cluster" in ptx[2]
    init_fence, arrive, wait = (ptx[2].find(s) for s in ("fence.mbarrier_init", "barrier.cluster.arrive",
                                                        "barrier.cluster.wait"))
    assert 0 <= init_fence < arrive < wait, (init_fence, arrive, wait)
    # full barriers: expect-tx + 128 producer threads; empty: the consumer warps (2 warpgroups x 4) of every CTA
    assert _mbarrier_init_counts(ptx[1]) == {129, 8}
    assert _mbarrier_init_counts(ptx[2]) == {129, 16}
    for needle in ("multicast::cluster", "mapa", "barrier.cluster"):
        assert needle not in ptx[1], needle


def test_cluster_config_checks():
    assert not GroupedGemmSm90.supports(gated=True, n_out=28672, k_dim=4096, num_experts=8,
                                        config=TileConfig(64, 8, cluster_t=2))[0]
    assert GroupedGemmSm90.supports(gated=True, n_out=28672, k_dim=4096, num_experts=8,
                                    config=TileConfig(256, 64, cluster_t=2))[0]
    with pytest.raises(ValueError, match="cluster_t"):
        TileConfig(256, 64, cluster_t=4)
    # the W4A16 kernels have no cluster path: they refuse it rather than ignore it
    from light_moe.kernels.w4a16_plan import supports_config

    ok, reason = supports_config(gated=True, n_out=28672, k_dim=4096, num_experts=8, group_size=128,
                                 config=TileConfig(256, 64, cluster_t=2))
    assert not ok and "cluster" in reason
