"""CPU-only compile tests of the paged prefill attention kernel for sm_90a (light_moe/kernels/prefill_attention.py).

Each case traces, lowers and assembles one static configuration (h, g, D, block size, query tile); N, B, the
lengths and the cache size stay dynamic. Also checked in the PTX: the kernel waits for its predecessor before its
first global load (programmatic dependent launch), reads K/V with 16-byte cp.async and multiplies with bf16
mma.sync. Run with -s to see compile times. The gpt-oss variants (sinks, sliding window; kernels/attention_variant.py)
compile too, and keep the plain kernel's loads and products.
"""
import re

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import prefill_attention as pa  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402

# (h, g, D, block_size, block_m)
CASES = {
    "mixtral_h32_g8_D128_bs16_bm128": (32, 8, 128, 16, 128),
    "mixtral_h32_g8_D128_bs64_bm64": (32, 8, 128, 64, 64),
    "mha_h16_g16_D128_bs16_bm64": (16, 16, 128, 16, 64),
    "mha_h8_g8_D64_bs64_bm128": (8, 8, 64, 64, 128),
    "gqa_h16_g4_D64_bs16_bm64": (16, 4, 64, 16, 64),
    "gqa_h32_g8_D128_bs128_bm128": (32, 8, 128, 128, 128),  # block larger than a key tile
}


# (h, g, D, block_size, block_m, sinks dtype or None, window)
VARIANT_CASES = {
    "gpt_oss_h64_g8_D64_bs16_bm64_sinks_bf16_window": (64, 8, 64, 16, 64, torch.bfloat16, True),
    "gpt_oss_h64_g8_D64_bs16_bm128_sinks_fp32_window": (64, 8, 64, 16, 128, torch.float32, True),
    "gpt_oss_h64_g8_D64_bs64_bm64_window": (64, 8, 64, 64, 64, None, True),
    "gpt_oss_h64_g8_D64_bs16_bm64_sinks_fp32": (64, 8, 64, 16, 64, torch.float32, False),
    "mha_h16_g16_D128_bs128_bm64_sinks_bf16_window": (16, 16, 128, 128, 64, torch.bfloat16, True),
}


def _variant_args(name):
    h, g, d, bs, bm, sinks, window = VARIANT_CASES[name]
    return pa.make_compile_args(h, g, d, bs, bm, make_fake_stream(), sinks_dtype=sinks, window=window)


@pytest.mark.parametrize("name", list(VARIANT_CASES))
def test_gpt_oss_variants_compile(name, tmp_path):
    h, g, d, bs, bm, _, _ = VARIANT_CASES[name]
    assert pa.supports(torch.bfloat16, h, g, d, bs)[0]
    jit_fn, args = _variant_args(name)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    print(f"\n{name}: compiled in {seconds:.2f} s -> {cubin.rsplit('/', 1)[-1][:60]}...")


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_attention_compiles(name, tmp_path):
    h, g, d, bs, bm = CASES[name]
    assert pa.supports(torch.bfloat16, h, g, d, bs)[0]
    jit_fn, args = pa.make_compile_args(h, g, d, bs, bm, make_fake_stream())
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    print(f"\n{name}: compiled in {seconds:.2f} s -> {cubin.rsplit('/', 1)[-1][:60]}...")


@pytest.mark.parametrize("variant", [None, "gpt_oss_h64_g8_D64_bs16_bm64_sinks_bf16_window"])
def test_prefill_attention_ptx(variant, tmp_path):
    if variant is None:
        jit_fn, args = pa.make_compile_args(32, 8, 128, 16, 128, make_fake_stream())
    else:
        jit_fn, args = _variant_args(variant)
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    entries = re.split(r"\.entry\s+\S+?\s*\(", ptx)[1:]
    assert len(entries) == 1
    body = entries[0]
    wait = body.find("griddepcontrol.wait")
    assert wait >= 0 and "griddepcontrol.launch_dependents" in body
    first_load = min(i for i in (body.find("ld.global"), body.find("cp.async")) if i >= 0)
    assert wait < first_load, "a global load comes before griddepcontrol.wait"
    assert re.search(r"cp\.async\.cg\.shared\.global(\.L2::\w+)?\s*\[[^]]+\],\s*\[[^]]+\],\s*16", body), \
        "K/V/Q not loaded with 16-byte cp.async"
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in body
    assert "ldmatrix.sync.aligned" in body and ".trans" in body  # V^T through ldmatrix.trans


@pytest.mark.parametrize("dtype,h,g,d,bs,ok", [
    (torch.bfloat16, 32, 8, 128, 16, True),
    (torch.bfloat16, 32, 32, 64, 128, True),
    (torch.bfloat16, 32, 8, 128, 256, True),
    (torch.float16, 32, 8, 128, 16, False),
    (torch.bfloat16, 32, 8, 96, 16, False),
    (torch.bfloat16, 32, 8, 128, 8, False),
    (torch.bfloat16, 32, 8, 128, 48, False),
    (torch.bfloat16, 32, 8, 128, 512, False),
    (torch.bfloat16, 32, 6, 128, 16, False),
])
def test_supports(dtype, h, g, d, bs, ok):
    supported, reason = pa.supports(dtype, h, g, d, bs)
    assert supported == ok, reason


def test_rejects_bad_arguments():
    q = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    qs = torch.tensor([0, 4], dtype=torch.int32)
    ctx = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables"):
        pa.prefill_attention(q, cache, cache, tables.long(), qs, ctx, 4, 0.125)
    with pytest.raises(ValueError, match="query_start"):
        pa.prefill_attention(q, cache, cache, tables, qs[:1], ctx, 4, 0.125)
    with pytest.raises(ValueError, match="block_size"):
        pa.prefill_attention(q, cache[:, :8], cache[:, :8], tables, qs, ctx, 4, 0.125)
    with pytest.raises(ValueError, match="does not match"):
        pa.prefill_attention(q, cache.float(), cache.float(), tables, qs, ctx, 4, 0.125)
    with pytest.raises(ValueError, match="block_m"):
        pa.prefill_attention(q, cache, cache, tables, qs, ctx, 4, 0.125, block_m=32)
