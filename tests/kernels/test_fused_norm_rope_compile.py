"""CPU-only compile tests of the decoder-layer kernels (RMSNorm with optional residual add; RoPE + paged KV write)
for sm_90a. Each case traces, lowers and assembles one static configuration (N stays dynamic) and checks that a
non-empty sm_90a cubin was written, plus the PTX facts the kernels rely on. Run with -s to see compile times.
"""
import re

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import rms_norm, rope_kv  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

NORM_CASES = [(dtype, hidden, residual) for dtype in (BF16, FP32) for hidden in (4096, 2048, 128)
              for residual in (False, True)]
NORM_CASES += [(BF16, 2880, True), (FP16, 8192, False)]  # a row that does not fill its threads; the largest model H

# (dtype, h, g, D, block_size)
ROPE_CASES = {
    "mixtral_bf16_bs16": (BF16, 32, 8, 128, 16),
    "mixtral_bf16_bs32": (BF16, 32, 8, 128, 32),
    "qwen3_bf16_bs16": (BF16, 32, 4, 128, 16),
    "mha_d64_bf16_bs32": (BF16, 16, 16, 64, 32),
    "mixtral_fp32_bs16": (FP32, 32, 8, 128, 16),
    "mha_d64_fp16_bs16": (FP16, 16, 16, 64, 16),
}


def _report(name, seconds, cubin):
    print(f"\n{name}: compiled in {seconds:.2f} s -> {cubin.rsplit('/', 1)[-1][:60]}...")


def _ops(ptx: str, pattern: str) -> int:
    return len(re.findall(pattern, ptx))


@pytest.mark.parametrize("dtype,hidden,residual", NORM_CASES)
def test_rms_norm_compiles(dtype, hidden, residual, tmp_path):
    assert rms_norm.supports(dtype, hidden)[0]
    jit_fn, args = rms_norm.make_compile_args(dtype, hidden, residual, make_fake_stream())
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"rms_norm {dtype} H={hidden} residual={residual} {jit_fn.tiling}", seconds, cubin)


def test_rms_norm_ptx(tmp_path):
    """16-byte accesses only; the mean is an explicit mul.rn (not folded into an fma with + eps, which would
    round once where torch rounds twice); PDL wait first; the row spans 4 warps so shared memory is used."""
    jit_fn, args = rms_norm.make_compile_args(BF16, 4096, True, make_fake_stream())
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    tiling = jit_fn.tiling
    assert tiling.threads_per_row * tiling.vectors_per_thread == 4096 // 8
    loads = _ops(ptx, r"ld\.global\.v4\.b32")
    assert loads == 3 * tiling.vectors_per_thread  # x, residual, weight; nothing narrower from global
    assert _ops(ptx, r"ld\.global\.(?!v4)") == 0 and _ops(ptx, r"st\.global\.(?!v4)") == 0
    assert _ops(ptx, r"st\.global\.v4\.b32") == 2 * tiling.vectors_per_thread  # residual and out
    assert _ops(ptx, r"mul\.rn\.f32") == 1 and _ops(ptx, r"rsqrt\.approx\.f32") == 1
    assert _ops(ptx, r"griddepcontrol\.wait") == 1 and _ops(ptx, r"bar\.sync") == 1


@pytest.mark.parametrize("dtype,hidden,top_k,extra", [(BF16, 4096, 2, False), (BF16, 2048, 6, True),
                                                       (BF16, 2880, 4, False), (FP32, 128, 8, True)])
def test_combine_rms_norm_compiles(dtype, hidden, top_k, extra, tmp_path):
    """The combine prologue (the MoE output fused into the next norm): Mixtral, DeepSeek-V2-Lite with its shared
    expert, gpt-oss, a small fp32 case."""
    assert rms_norm.combine_supports(dtype, hidden, top_k)[0]
    jit_fn, args = rms_norm.make_compile_args(dtype, hidden, True, make_fake_stream(), top_k, extra)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"combine_rms_norm {dtype} H={hidden} K={top_k} extra={extra} {jit_fn.tiling}", seconds, cubin)


def test_combine_rms_norm_ptx(tmp_path):
    """Mixtral's shape: per owned vector the K expert rows, the residual and the weight by 16-byte loads (x is not
    read), the K reverse indices and K weights as scalars; residual and out stored; one rounding of the sum."""
    jit_fn, args = rms_norm.make_compile_args(BF16, 4096, True, make_fake_stream(), 2, False)
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    vpt = jit_fn.tiling.vectors_per_thread
    assert _ops(ptx, r"ld\.global\.v4\.b32") == (2 + 2) * vpt  # 2 expert rows, residual, weight
    assert _ops(ptx, r"st\.global\.v4\.b32") == 2 * vpt and _ops(ptx, r"st\.global\.(?!v4)") == 0
    assert _ops(ptx, r"mul\.rn\.f32") == 1 and _ops(ptx, r"griddepcontrol\.wait") == 1
    with pytest.raises(ValueError, match="needs a residual"):
        rms_norm.RMSNormKernel(rms_norm._DTYPES[BF16], 4096, False, 2)
    assert not rms_norm.combine_supports(BF16, 4096, 17)[0]


def test_norm_tiling_covers_rows():
    for dtype in (BF16, FP32):
        for hidden in (64, 128, 2048, 2880, 4096, 5120, 7168, 8192, 16384):
            if not rms_norm.supports(dtype, hidden)[0]:
                continue
            n_vec = hidden * dtype.itemsize // 16
            t = rms_norm.choose_tiling(n_vec)
            assert t.threads_per_row * t.vectors_per_thread >= n_vec
            assert t.threads_per_row * (t.vectors_per_thread - 1) < n_vec  # no thread with only idle vectors
            assert t.vectors_per_thread <= rms_norm.MAX_VECTORS_PER_THREAD and t.threads <= 1024
            assert t.threads_per_row & (t.threads_per_row - 1) == 0 and t.threads >= min(128, t.threads_per_row)
    assert not rms_norm.supports(BF16, 100)[0] and not rms_norm.supports(torch.int8, 4096)[0]
    assert not rms_norm.supports(BF16, 1 << 20)[0]


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_write_kv_compiles(name, tmp_path):
    dtype, h, g, d, block_size = ROPE_CASES[name]
    assert rope_kv.supports(dtype, h, g, d, block_size)[0]
    jit_fn, args = rope_kv.make_compile_args(dtype, h, g, d, block_size, make_fake_stream())
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _report(f"rope_write_kv {name} threads={jit_fn.threads}", seconds, cubin)


def test_rope_write_kv_ptx(tmp_path):
    """bf16 Mixtral: every product an explicit mul.rn rounded to bf16 before the add/sub (torch's per-op
    rounding), 16-byte data accesses, the slot offset formed in 64 bits."""
    jit_fn, args = rope_kv.make_compile_args(BF16, 32, 8, 128, 16, make_fake_stream())
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    assert _ops(ptx, r"mul\.rn\.f32") == 2 * 4 * 8  # q and k call sites x 4 products x 8 elements
    assert _ops(ptx, r"fma\.") == 0
    assert _ops(ptx, r"st\.global\.v4\.b32") == 5  # q_out lo/hi, k cache lo/hi, v cache
    assert _ops(ptx, r"st\.global\.(?!v4)") == 0
    assert _ops(ptx, r"griddepcontrol\.wait") == 1


def test_rope_supports():
    assert rope_kv.supports(BF16, 32, 8, 128, 16)[0]
    assert not rope_kv.supports(BF16, 32, 8, 96, 16)[0]
    assert not rope_kv.supports(BF16, 32, 6, 128, 16)[0]
    assert not rope_kv.supports(torch.int8, 32, 8, 128, 16)[0]
