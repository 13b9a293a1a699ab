"""CPU-only compile tests of the MLA rotary + latent-cache write kernel (kernels/mla_rope_kv.py) for sm_90a:
DeepSeek-V2-Lite's and V3's shapes, both rotary layouts, every activation dtype; and its shape checks."""
import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import mla_rope_kv  # noqa: E402
from tests.kernels.compile_check import compile_sm90a  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (dtype, h, Dn, R, L, interleave)
CASES = {
    "v2_lite_bf16_interleaved": (BF16, 16, 128, 64, 512, True),
    "v3_bf16_interleaved": (BF16, 128, 128, 64, 512, True),
    "v2_lite_bf16_rotate_half": (BF16, 16, 128, 64, 512, False),
    "fp16_interleaved": (FP16, 16, 128, 64, 512, True),
    "fp32_interleaved": (FP32, 4, 32, 16, 64, True),  # the tiny test models' sizes
    "fp32_rotate_half_no_nope": (FP32, 2, 0, 16, 32, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mla_rope_write_compiles(name, tmp_path):
    dtype, h, nope, rope, lat, interleave = CASES[name]
    assert mla_rope_kv.supports(dtype, h, nope, rope, lat)[0]
    jit_fn, args = mla_rope_kv.make_compile_args(dtype, h, nope, rope, lat, interleave, make_fake_stream())
    assert 32 <= jit_fn.threads <= mla_rope_kv.MAX_THREADS and jit_fn.threads % 32 == 0
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    print(f"\nmla_rope_write {name} threads={jit_fn.threads}: compiled in {seconds:.2f} s")
    assert cubin


def test_mla_rope_supports():
    assert mla_rope_kv.supports(BF16, 16, 128, 64, 512) == (True, "ok")
    assert "rope dims" in mla_rope_kv.supports(BF16, 16, 128, 8, 512)[1]  # a pair needs two 16-byte vectors
    assert "no-rope" in mla_rope_kv.supports(BF16, 16, 100, 64, 512)[1]
    assert "latent" in mla_rope_kv.supports(BF16, 16, 128, 64, 500)[1]
    assert "num_heads" in mla_rope_kv.supports(BF16, 0, 128, 64, 512)[1]
    assert "dtype" in mla_rope_kv.supports(torch.int8, 16, 128, 64, 512)[1]
