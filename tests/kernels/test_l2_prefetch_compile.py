"""CPU-only compile tests of kernels/l2_prefetch.py for sm_90a: every range count compiles; the PTX waits for the
predecessor (griddepcontrol.wait) before its first cp.async.bulk.prefetch.L2 and writes nothing to global memory;
the host checks and the grid size."""
import re

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import l2_prefetch  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402


@pytest.mark.parametrize("num_ranges", range(1, l2_prefetch.MAX_RANGES + 1))
def test_l2_prefetch_compiles(num_ranges, tmp_path):
    jit_fn, args = l2_prefetch.make_compile_args(num_ranges, make_fake_stream())
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    print(f"\nl2_prefetch ranges={num_ranges}: compiled in {seconds:.2f} s")


def test_l2_prefetch_ptx_waits_then_prefetches(tmp_path):
    jit_fn, args = l2_prefetch.make_compile_args(2, make_fake_stream())
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    wait = ptx.index("griddepcontrol.wait")
    prefetches = [m.start() for m in re.finditer(r"cp\.async\.bulk\.prefetch\.L2\.global", ptx)]
    assert len(prefetches) == 2 and wait < min(prefetches)  # one loop per range, both after the wait
    assert "griddepcontrol.launch_dependents" in ptx
    assert not re.search(r"\bst\.global", ptx) and not re.search(r"\bld\.global", ptx)  # touches no tensor


def test_l2_prefetch_host_checks():
    assert l2_prefetch.grid_size(16) == 1
    assert l2_prefetch.grid_size(l2_prefetch.CHUNK * l2_prefetch.THREADS * 3) == 3
    assert l2_prefetch.grid_size(1 << 40) == l2_prefetch.MAX_CTAS
    ok, reason = l2_prefetch.supports([torch.zeros(64)])
    assert not ok and "CUDA" in reason  # CPU tensors
    assert l2_prefetch.supports([None, torch.zeros(0)]) == (True, "ok")  # nothing to fetch
    with pytest.raises(ValueError, match="CUDA"):
        l2_prefetch.l2_prefetch([torch.zeros(8)])
    l2_prefetch.l2_prefetch([])  # no ranges: no launch
