"""Programmatic dependent launch (kernels/launch.await_inputs), checked in the PTX of each kernel family on the
CPU: every kernel entry waits for its predecessor (griddepcontrol.wait) before its first global load and lets its
dependents launch (griddepcontrol.launch_dependents). A kernel launched with use_pdl that read a predecessor's
output before the wait would race with it; the GPU tests would catch that only by chance."""

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import combine, router, routing  # noqa: E402
from light_moe.kernels.grouped_gemm import GroupedGemmSm90  # noqa: E402
from light_moe.kernels.tile_config import TileConfig  # noqa: E402
from light_moe.kernels.w4a16_gemm import W4A16GroupedGemmSm90  # noqa: E402
from tests.kernels.compile_check import assert_waits_before_loads, compile_sm90a_ptx, ptx_entries  # noqa: E402
from tests.kernels.test_grouped_gemm_compile import _args as gemm_args  # noqa: E402
from tests.kernels.test_w4a16_compile import _args as w4a16_args  # noqa: E402


def _check(ptx: str, kernels: int) -> None:
    entries = ptx_entries(ptx)
    assert len(entries) == kernels, list(entries)
    for name, body in entries.items():
        assert "griddepcontrol.launch_dependents" in body, f"{name}: no launch_dependents"
    assert_waits_before_loads(entries)


def test_routing_side_kernels_wait_first(tmp_path):
    bf16 = torch.bfloat16
    # the split router: GEMM kernel + top-k kernel
    tile = router.choose_tile(128, 16, 2048 * 2)
    assert tile.split
    for (jit_fn, args), kernels in ((router.make_compile_args(bf16, 2048, 128, 8, True, tile, make_fake_stream()), 2),
                                    (routing.make_compile_args(8, 2, False, make_fake_stream()), 2),
                                    (combine.make_compile_args(bf16, 4096, 2, make_fake_stream()), 1)):
        _check(compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path)), kernels)


def test_grouped_gemms_wait_first(tmp_path):
    n_out, k_dim, args = gemm_args(True, 8, 4096, 14336)
    kernel = GroupedGemmSm90(gated=True, n_out=n_out, k_dim=k_dim, num_experts=8, config=TileConfig(64, 8))
    _check(compile_sm90a_ptx(kernel, *args, dump_root=str(tmp_path)), 1)
    n_out, k_dim, args = w4a16_args(False, 8, 4096, 14336, 128)
    kernel = W4A16GroupedGemmSm90(gated=False, n_out=n_out, k_dim=k_dim, num_experts=8, group_size=128,
                                  config=TileConfig(256, 32, bulk_weights=True))
    _check(compile_sm90a_ptx(kernel, *args, dump_root=str(tmp_path)), 1)
