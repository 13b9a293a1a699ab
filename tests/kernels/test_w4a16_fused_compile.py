"""CPU tests of the fused up + down W4A16 decode kernel (kernels/w4a16_fused.py): sm_90a compiles, the PTX has the
pieces its protocol needs, its refusals. GPU tests: tests/kernels/test_w4a16_fused_gpu.py."""

import pytest

cute = pytest.importorskip("cutlass.cute")

from cutlass import Int32  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor  # noqa: E402

from light_moe.kernels import w4a16_fused as fused  # noqa: E402
from light_moe.kernels.tile_config import TileConfig, direct_tile  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402
from tests.kernels.test_w4a16_compile import _args as _gemm_args  # noqa: E402


def _args(num_experts: int, hidden: int, inter: int, group_size: int):
    """(q13, m13, q2, m2, x, gather_index, expert_offsets, act, y, SMs, stream, counters)."""
    _, _, up = _gemm_args(True, num_experts, hidden, inter, group_size)
    _, _, down = _gemm_args(False, num_experts, hidden, inter, group_size)
    q13, m13, x, gather_index, offsets, act, sms, stream = up
    q2, m2, act_in, _, _, y, _, _ = down
    counters = make_fake_compact_tensor(Int32, (fused.fused_counters(num_experts),), assumed_align=4)
    return (q13, m13, q2, m2, x, gather_index, offsets, act, y, sms, stream, counters)


CASES = {
    # name: (E, H, I, g, config)
    "mixtral_w8_g128": (8, 4096, 14336, 128, TileConfig(64, 8, direct_warps=8)),
    "mixtral_w4_g64": (8, 4096, 14336, 64, TileConfig(64, 8, direct_warps=4)),
    "e64_w8_g128": (64, 1024, 1024, 128, TileConfig(64, 8, direct_warps=8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_compiles(name, tmp_path):
    num_experts, hidden, inter, group_size, config = CASES[name]
    kernel = fused.make_fused_kernel(hidden, inter, num_experts, group_size, config)
    cubin, seconds = compile_sm90a(kernel, *_args(num_experts, hidden, inter, group_size), dump_root=str(tmp_path))
    print(f"{name}: {seconds:.2f} s, ring {kernel.ring}, cubin {cubin}")


def test_fused_ptx_protocol(tmp_path):
    """Tickets and counts by acq_rel atomics, the dependency spin by ld.acquire, the down rows by cp.async.cg only
    (no .ca: another SM wrote them in this launch), both projections' mma (16 per k-tile, per group of 2 k-tiles in
    each projection's loop), griddepcontrol.wait before the first global load, no local memory."""
    num_experts, hidden, inter, group_size, config = CASES["mixtral_w8_g128"]
    kernel = fused.make_fused_kernel(hidden, inter, num_experts, group_size, config)
    ptx = compile_sm90a_ptx(kernel, *_args(num_experts, hidden, inter, group_size), dump_root=str(tmp_path))
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert "atom.global.acq_rel.add.u32" in ptx  # scope .gpu: the default
    assert "ld.acquire.gpu.global.b32" in ptx and "nanosleep.u32" in ptx  # the dependency poll backs off
    assert "cp.async.cg.shared.global" in ptx and "cp.async.ca.shared.global" not in ptx
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") >= 32
    wait = ptx.index("griddepcontrol.wait")
    assert "ld.global" not in ptx[:wait] and "cp.async" not in ptx[:wait]


def test_fused_refusals():
    assert not fused.supports(hidden=4096, inter=14336, num_experts=8, group_size=128,
                              config=TileConfig(64, 8, direct_warps=8, stream_k=True))[0]
    assert not fused.supports(hidden=4096, inter=14336, num_experts=8, group_size=128, config=TileConfig(64, 8))[0]
    # 12 k-tiles of I = 768: 8 warps do not split them into whole groups
    ok, reason = fused.supports(hidden=1024, inter=768, num_experts=8, group_size=128,
                                config=TileConfig(64, 8, direct_warps=8))
    assert not ok and "whole groups" in reason
    assert fused.supports(hidden=4096, inter=14336, num_experts=8, group_size=128,
                          config=direct_tile(4096, 128, gated=True))[0]


def _shapes_only(num_experts: int, n_out: int, k_dim: int, group_size: int, gated: bool):
    """W4A16Weights of the right shapes on the meta device (no memory): what fused_config reads."""
    import torch

    from light_moe.kernels.w4a16_layout import W4A16Weights

    qweight = torch.empty(num_experts, k_dim // 64, n_out // 64, 128, 4, dtype=torch.int32, device="meta")
    meta = torch.empty(num_experts, k_dim // group_size, n_out, dtype=torch.int32, device="meta")
    return W4A16Weights(qweight, meta, group_size, gated, False)


def test_fused_config_is_the_decode_row_only():
    """Mixtral: the direct tile with 8 warps (both K split into whole groups) for up to 4 routed rows per active
    expert (the tile table's decode row), none for a prefill-sized step; Qwen2-MoE's I = 1408 (22 k-tiles) splits
    only over 2 warps."""
    w13, w2 = _shapes_only(8, 2 * 14336, 4096, 128, True), _shapes_only(8, 4096, 14336, 128, False)
    for rows in (2, 8, 32):
        assert fused.fused_config(rows, w13, w2) == TileConfig(64, 8, direct_warps=8)
    assert fused.fused_config(33, w13, w2) is None and fused.fused_config(2 * 128, w13, w2) is None
    q13, q2 = _shapes_only(60, 2 * 1408, 2048, 64, True), _shapes_only(60, 2048, 1408, 64, False)
    assert fused.fused_config(8, q13, q2) == TileConfig(64, 8, direct_warps=2)
