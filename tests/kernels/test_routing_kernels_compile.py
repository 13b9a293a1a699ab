"""CPU-only compile tests of the routing-side kernels (router, routing metadata, combine) for sm_90a.

Each case traces, lowers and assembles one static configuration (T stays dynamic) and checks that a
non-empty sm_90a cubin was written. Run with -s to see the compile time of each case.
"""
import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import combine, router, routing  # noqa: E402
from tests.kernels.compile_check import compile_sm90a  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (dtype, H, E, K, renormalize, T used to pick the tile regime)
ROUTER_CASES = {
    "bf16_H4096_E8_K2_decode": (BF16, 4096, 8, 2, True, 16),
    "bf16_H4096_E8_K2_prefill": (BF16, 4096, 8, 2, True, 16384),
    "bf16_H2048_E128_K8_decode_split": (BF16, 2048, 128, 8, True, 16),
    "bf16_H2048_E128_K8_prefill": (BF16, 2048, 128, 8, True, 4096),
    "bf16_H7168_E256_K8_prefill": (BF16, 7168, 256, 8, False, 16384),
    "bf16_H2048_E60_K4_decode_split": (BF16, 2048, 60, 4, False, 16),  # E not a multiple of 8
    "fp16_H2880_E32_K4_prefill": (FP16, 2880, 32, 4, True, 16384),  # H not a multiple of the unroll
    "fp32_H4096_E64_K2_decode_split": (FP32, 4096, 64, 2, False, 16),  # 3xTF32 path
}

ROUTING_CASES = {
    "E8_K2_single_cta": (8, 2, True),
    "E8_K2_multi_cta": (8, 2, False),
    "E256_K8_multi_cta": (256, 8, False),
    "E60_K6_single_cta": (60, 6, True),
    "E1_K1_single_cta": (1, 1, True),
}

COMBINE_CASES = {
    "bf16_H4096_K2": (BF16, 4096, 2),
    "bf16_H2880_K8": (BF16, 2880, 8),
    "fp16_H2048_K4": (FP16, 2048, 4),
    "fp32_H4096_K2": (FP32, 4096, 2),
}


def _report(name, seconds, cubin):
    print(f"\n{name}: compiled in {seconds:.2f} s -> {cubin.rsplit('/', 1)[-1][:60]}...")


@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_router_compiles(name, tmp_path):
    dtype, hidden, experts, top_k, renorm, tokens = ROUTER_CASES[name]
    assert router.supports(dtype, hidden, experts, top_k)[0]
    tile = router.choose_tile(experts, tokens, hidden * dtype.itemsize)
    jit_fn, args = router.make_compile_args(dtype, hidden, experts, top_k, renorm, tile, make_fake_stream())
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"router {name} {tile}", seconds, cubin)


def test_router_single_cta_compiles(tmp_path):
    """Decode (T <= one fused CTA's tokens): the kernel stores every count itself (no memset launch)."""
    tile = router.choose_tile(8, 1, 4096 * 2)
    assert not tile.split and tile.tokens >= 1
    jit_fn, args = router.make_compile_args(BF16, 4096, 8, 2, True, tile, make_fake_stream(), single_cta=True)
    assert jit_fn.single_cta
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"router single CTA {tile}", seconds, cubin)
    split = router.choose_tile(128, 1, 2048 * 2)
    assert split.split and not router.RouterKernel("bf16", 2048, 128, 8, True, split, single_cta=True).single_cta


@pytest.mark.parametrize("dtype,experts,top_k", [(BF16, 8, 2), (torch.float32, 16, 4), (BF16, 1, 1)])
def test_router_with_metadata_compiles(dtype, experts, top_k, tmp_path):
    """The single fused CTA can also write expert_offsets, gather_index and reverse_index (routing.py's
    metadata, one launch fewer at decode); only where one fused CTA covers T (E <= 16, T <= its tokens)."""
    hidden = 4096
    tile = router.choose_tile(experts, 1, hidden * dtype.itemsize)
    assert router.metadata_fusable(experts, 1, hidden * dtype.itemsize)
    assert router.metadata_fusable(experts, tile.tokens, hidden * dtype.itemsize)
    assert not router.metadata_fusable(experts, tile.tokens + 1, hidden * dtype.itemsize)
    assert not router.metadata_fusable(experts, 0, hidden * dtype.itemsize)
    jit_fn, args = router.make_compile_args(dtype, hidden, experts, top_k, True, tile, make_fake_stream(),
                                            single_cta=True, metadata=True)
    assert jit_fn.metadata and jit_fn.single_cta
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"router + metadata E={experts} K={top_k} {tile}", seconds, cubin)
    # a split tile (E > 16 at decode) or several CTAs cannot: each CTA sees only its tokens' counts
    split = router.choose_tile(128, 1, 2048 * 2)
    assert not router.metadata_fusable(128, 1, 2048 * 2)
    with pytest.raises(ValueError, match="one fused CTA"):
        router.RouterKernel("bf16", 2048, 128, 8, True, split, single_cta=True, metadata=True)
    with pytest.raises(ValueError, match="one fused CTA"):
        router.RouterKernel("bf16", hidden, experts, top_k, True, tile, single_cta=False, metadata=True)


@pytest.mark.parametrize("name", list(ROUTING_CASES))
def test_routing_metadata_compiles(name, tmp_path):
    experts, top_k, single = ROUTING_CASES[name]
    jit_fn, args = routing.make_compile_args(experts, top_k, single, make_fake_stream())
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"routing_metadata {name}", seconds, cubin)


@pytest.mark.parametrize("name", list(COMBINE_CASES))
def test_combine_compiles(name, tmp_path):
    dtype, hidden, top_k = COMBINE_CASES[name]
    jit_fn, args = combine.make_compile_args(dtype, hidden, top_k, make_fake_stream())
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"combine {name}", seconds, cubin)


def test_supports_reasons():
    assert router.supports(BF16, 4096, 257, 2) == (False, "num_experts=257 outside [1, 256]")
    assert not router.supports(BF16, 4096, 8, 9)[0]
    assert not router.supports(BF16, 4100, 8, 2)[0]  # rows must be multiples of 64 bytes
    assert not router.supports(torch.int8, 4096, 8, 2)[0]
    assert router.supports(FP32, 16, 8, 2)[0]
    assert not routing.supports(300, 2)[0]
    assert routing.supports(256, 8)[0]
    assert not combine.supports(BF16, 4092, 2)[0]
    assert combine.supports(FP32, 4, 2)[0]


@pytest.mark.parametrize("experts", [1, 8, 16, 60, 64, 128, 256])
@pytest.mark.parametrize("tokens", [1, 256, 1024, 4096])
@pytest.mark.parametrize("row_bytes", [2048, 4096, 5760, 14336])
def test_router_tiles_cover_all_experts(experts, tokens, row_bytes):
    tile = router.choose_tile(experts, tokens, row_bytes)
    assert tile.eg * tile.ng * tile.ntw * 8 >= experts > (tile.eg - 1) * tile.ng * tile.ntw * 8
    assert (row_bytes // 64) % tile.hs == 0
    assert 1 <= tile.warps <= 32
    if tile.hs > 1:  # H is only sliced while the grid stays within two waves
        assert -(-tokens // tile.tokens) * tile.eg * tile.hs <= 2 * router.SM_COUNT


def test_router_rejects_a_tile_short_of_the_experts():
    # one 8-expert mma tile per warp and no expert groups: experts 8..15 would never be scored (session 16's wide
    # decode CTA candidate did this at E = 16 and picked wrong experts on the GPU)
    with pytest.raises(ValueError, match="covers 8 experts"):
        router.RouterKernel("bf16", 4096, 16, 4, True, router.RouterTile(1, 1, 16, 4, 1, 2))
    router.RouterKernel("bf16", 4096, 16, 4, True, router.RouterTile(1, 1, 16, 1, 2, 2))  # the default tile


def test_routing_workspace_is_host_sized():
    assert routing.workspace_size(routing.SINGLE_CTA_MAX_ROWS, 256) == 0
    assert routing.workspace_size(routing.SINGLE_CTA_MAX_ROWS + 1, 8) == 3 * 8
