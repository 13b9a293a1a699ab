"""CPU-only compile tests of the paged decode-attention kernel (kernels/decode_attention.py) for sm_90a, plus its
host-side split choice and its PTX (PDL wait first, the tensor-core and load instructions it is designed around),
and of its gpt-oss variants (sinks, sliding window; kernels/attention_variant.py).

Each case traces, lowers and assembles one static configuration (B, MB and the split count stay dynamic) and
checks that a non-empty sm_90a cubin was written. Run with -s to see the compile time of each case.
"""
import re

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import decode_attention as da  # noqa: E402
from tests.kernels.compile_check import assert_waits_before_loads, compile_sm90a, compile_sm90a_ptx, ptx_entries  # noqa: E402

BF16, FP16, I32, I64 = torch.bfloat16, torch.float16, torch.int32, torch.int64

# name -> (dtype, table / ctx index dtype, h, g, D, bs, split)
CASES = {
    "mixtral_bf16_D128_r4_bs16_split": (BF16, I32, 32, 8, 128, 16, True),
    "mixtral_bf16_D128_r4_bs16_single": (BF16, I32, 32, 8, 128, 16, False),
    "bf16_D128_r4_bs64_split_int64": (BF16, I64, 32, 8, 128, 64, True),  # the engine's int64 metadata
    "bf16_D128_r1_bs16_split": (BF16, I32, 16, 16, 128, 16, True),  # MHA
    "bf16_D128_r8_bs64_single": (BF16, I32, 32, 4, 128, 64, False),
    "bf16_D64_r1_bs16_split": (BF16, I32, 16, 16, 64, 16, True),
    "bf16_D64_r4_bs64_single": (BF16, I32, 16, 4, 64, 64, False),
    "bf16_D64_r8_bs16_split": (BF16, I32, 64, 8, 64, 16, True),
    "bf16_D128_r16_bs16_split": (BF16, I32, 64, 4, 128, 16, True),  # both 8-row halves of the mma tile
    "bf16_D128_r5_bs32_split": (BF16, I32, 40, 8, 128, 32, True),  # r not a power of two
    "bf16_D128_r4_bs8_split": (BF16, I32, 32, 8, 128, 8, True),  # two blocks per 16-key tile
    "bf16_D64_r4_bs4_split": (BF16, I32, 32, 8, 64, 4, True),  # blocks smaller than an 8-key group
    "bf16_D128_r4_bs1_single": (BF16, I32, 32, 8, 128, 1, False),
    "bf16_D128_r4_bs256_split": (BF16, I32, 32, 8, 128, 256, True),
    "fp16_D128_r4_bs16_split": (FP16, I32, 32, 8, 128, 16, True),
    "fp16_D64_r1_bs32_single": (FP16, I64, 8, 8, 64, 32, False),
}


# name -> (dtype, index dtype, h, g, D, bs, split, sinks dtype or None, window)
VARIANT_CASES = {
    "gpt_oss_D64_r8_bs16_split_sinks_bf16_window": (BF16, I32, 64, 8, 64, 16, True, BF16, True),
    "gpt_oss_D64_r8_bs16_single_sinks_bf16_window": (BF16, I32, 64, 8, 64, 16, False, BF16, True),
    "gpt_oss_D64_r8_bs16_split_sinks_fp32": (BF16, I64, 64, 8, 64, 16, True, torch.float32, False),
    "gpt_oss_D64_r8_bs16_single_window": (BF16, I32, 64, 8, 64, 16, False, None, True),
    "mha_D128_bs4_split_window": (BF16, I32, 16, 16, 128, 4, True, None, True),  # one table lookup per key
    "mha_D128_bs64_single_sinks_fp16": (FP16, I32, 16, 16, 128, 64, False, FP16, False),
}


def _args(name):
    if name in VARIANT_CASES:
        dtype, index, h, g, d, bs, split, sinks, window = VARIANT_CASES[name]
        return da.make_compile_args(dtype, index, index, h, g, d, bs, split, make_fake_stream(), sinks_dtype=sinks,
                                    window=window)
    dtype, index, h, g, d, bs, split = CASES[name]
    return da.make_compile_args(dtype, index, index, h, g, d, bs, split, make_fake_stream())


@pytest.mark.parametrize("name", list(VARIANT_CASES))
def test_gpt_oss_variants_compile(name, tmp_path):
    dtype, index, h, g, d, bs, split, sinks, window = VARIANT_CASES[name]
    assert da.supports(dtype, h, g, d, bs) == (True, "ok")
    jit_fn, args = _args(name)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    print(f"\ndecode_attention {name}: compiled in {seconds:.2f} s -> {cubin.rsplit('/', 1)[-1][:60]}...")


def _body(entry_text: str) -> str:
    """A kernel's PTX body without its name and parameter declarations (which name the kernel)."""
    return re.sub(r"\S*_param_\d+", "PARAM", entry_text.split("{", 1)[1])


def test_split_sinks_only_in_the_combine(tmp_path):
    """With S > 1 the sink is the combine kernel's alone: the attention kernel of the sinks variant is the same
    code as without sinks, the combine kernel is not (it starts its merge from the sink)."""
    dtype, index, h, g, d, bs, split, sinks, window = VARIANT_CASES["gpt_oss_D64_r8_bs16_split_sinks_fp32"]
    bodies = []
    for sinks_dtype in (None, sinks):
        jit_fn, args = da.make_compile_args(dtype, index, index, h, g, d, bs, split, make_fake_stream(),
                                            sinks_dtype=sinks_dtype, window=window)
        entries = ptx_entries(compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path)))
        bodies.append({kind: next(_body(b) for n, b in entries.items() if kind in n)
                       for kind in ("attention_kernel", "combine_kernel")})
    assert bodies[0]["attention_kernel"] == bodies[1]["attention_kernel"]
    assert bodies[0]["combine_kernel"] != bodies[1]["combine_kernel"]


@pytest.mark.parametrize("name", list(CASES))
def test_decode_attention_compiles(name, tmp_path):
    dtype, index, h, g, d, bs, split = CASES[name]
    assert da.supports(dtype, h, g, d, bs) == (True, "ok")
    jit_fn, args = _args(name)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    print(f"\ndecode_attention {name}: compiled in {seconds:.2f} s -> {cubin.rsplit('/', 1)[-1][:60]}...")


@pytest.mark.parametrize("name", ["mixtral_bf16_D128_r4_bs16_split", "bf16_D64_r8_bs16_split",
                                  "bf16_D128_r16_bs16_split", "gpt_oss_D64_r8_bs16_split_sinks_bf16_window"])
def test_ptx_structure(name, tmp_path):
    """Both kernels wait for their predecessor (PDL) before any global load; the attention kernel reads K/V with
    16-byte loads (16 per lane per tile) and multiplies on the tensor cores: KT / 8 * D / 16 QK^T plus
    KT / 16 * D / 8 PV mma per tile, none of them duplicated (the window adds no load or product)."""
    dtype, index, h, g, d, bs, split = (CASES.get(name) or VARIANT_CASES[name])[:7]
    jit_fn, args = _args(name)
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    entries = ptx_entries(ptx)
    assert len(entries) == 2, list(entries)
    assert_waits_before_loads(entries, ("ld.global",))
    attn = next(body for kernel_name, body in entries.items() if "attention_kernel" in kernel_name)
    kt = da.keys_per_tile(d)
    assert attn.count("mma.sync.aligned.m16n8k16") == kt // 8 * (d // 16) + kt // 16 * (d // 8)
    rows = 2 if h // g > 8 else 1
    q_loads = rows * d // 32
    assert attn.count("ld.global.nc.L1::no_allocate.v4.b32") == q_loads + 16  # q once, then 16 per tile
    assert "ex2.approx" in attn


# name -> (dtype, index dtype, h, g, D, bs, sinks dtype or None, window): split, merged by the last split CTA
MERGE_CASES = {
    "mixtral_bf16_D128_r4_bs16": (BF16, I32, 32, 8, 128, 16, None, False),
    "bf16_D64_r8_bs16_int64": (BF16, I64, 64, 8, 64, 16, None, False),
    "bf16_D128_r16_bs16": (BF16, I32, 64, 4, 128, 16, None, False),
    "gpt_oss_D64_r8_bs16_sinks_window": (BF16, I32, 64, 8, 64, 16, BF16, True),
}


@pytest.mark.parametrize("name", list(MERGE_CASES))
def test_merge_in_kernel_ptx(name, tmp_path):
    """merge_in_kernel: one kernel (no combine), one acq_rel atomic per CTA between barriers (its release covers
    the CTA's partial stores, its acquire the other splits' partials), the partials read back with coherent loads
    (never ld.global.nc, which may serve stale lines), and the same K/V loads and mma as the two-kernel path."""
    dtype, index, h, g, d, bs, sinks, window = MERGE_CASES[name]
    entries = []
    for merge in (False, True):
        jit_fn, args = da.make_compile_args(dtype, index, index, h, g, d, bs, True, make_fake_stream(),
                                            sinks_dtype=sinks, window=window, merge_in_kernel=merge)
        entries.append(ptx_entries(compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))))
    plain, merged = entries
    assert len(plain) == 2 and len(merged) == 1, (list(plain), list(merged))
    assert_waits_before_loads(merged, ("ld.global",))
    attn_plain = next(body for n, body in plain.items() if "attention_kernel" in n)
    attn = next(iter(merged.values()))
    atomics = [line.strip() for line in attn.splitlines() if line.strip().startswith(("atom.", "red."))]
    assert len(atomics) == 1 and atomics[0].startswith("atom.global.acq_rel.add.u32"), atomics  # scope: .gpu
    assert attn.count("bar.sync") == attn_plain.count("bar.sync") + 2
    for pattern in ("ld.global.nc", "mma.sync.aligned.m16n8k16"):
        assert attn.count(pattern) == attn_plain.count(pattern), pattern
    assert "combine_kernel" not in "".join(merged)


def test_supports_reasons():
    assert da.supports(BF16, 32, 8, 128, 16) == (True, "ok")
    assert da.supports(FP16, 8, 8, 64, 1) == (True, "ok")
    assert not da.supports(torch.float32, 32, 8, 128, 16)[0]
    assert not da.supports(BF16, 32, 8, 96, 16)[0]
    assert not da.supports(BF16, 32, 8, 256, 16)[0]
    assert not da.supports(BF16, 30, 8, 128, 16)[0]
    assert "query heads per KV head" in da.supports(BF16, 64, 2, 128, 16)[1]
    assert not da.supports(BF16, 32, 8, 128, 24)[0]


@pytest.mark.parametrize("batch", [1, 3, 16, 64, 256])
@pytest.mark.parametrize("max_blocks", [1, 7, 16, 128, 1024])
@pytest.mark.parametrize("block_size,tile_keys", [(16, 16), (64, 16), (8, 16), (16, 32), (256, 16), (1, 16)])
def test_choose_splits_covers_every_tile(batch, max_blocks, block_size, tile_keys):
    n_tiles = -(-max_blocks * block_size // tile_keys)
    splits, per_split = da.choose_splits(batch, 8, max_blocks, block_size, tile_keys, 132, resident_ctas=2)
    assert splits >= 1 and per_split >= 1
    assert splits * per_split >= n_tiles > (splits - 1) * per_split  # every tile owned, no empty last split
    assert splits <= max(1, -(-n_tiles // da.WARPS))  # on average a tile for every warp of a split
    if splits > 1:
        assert batch * 8 * splits <= 2 * 132  # never a second wave of CTAs
    forced, forced_per_split = da.choose_splits(batch, 8, max_blocks, block_size, tile_keys, 132, num_splits=3)
    assert forced <= 3 and forced * forced_per_split >= n_tiles > (forced - 1) * forced_per_split


def test_choose_splits_fills_one_wave():
    """Mixtral heads (g = 8) on 132 SMs at 2 resident CTAs each: one wave is 264 CTAs."""
    assert da.choose_splits(1, 8, 128, 16, 16, 132) == (32, 4)  # B = 1, ctx 2048: 32 splits of 4 tiles
    assert da.choose_splits(16, 8, 128, 16, 16, 132) == (2, 64)  # 128 CTAs per split: two fill the wave
    assert da.choose_splits(64, 8, 128, 16, 16, 132) == (1, 128)  # 512 CTAs: already two waves
    assert da.choose_splits(1, 8, 16, 16, 16, 132) == (4, 4)  # short context: one tile per warp at most


def test_window_splits_sized_by_the_window():
    """A 128-key window over a 4k-token table needs at most ceil((128 + KT - 1) / KT) tiles: the split count is
    sized for them, not for the table."""
    kt = da.keys_per_tile(64)
    plain = da.choose_splits(1, 8, 256, 16, kt, 132, resident_ctas=4)
    windowed = da.choose_splits(1, 8, 256, 16, kt, 132, resident_ctas=4, window=128)
    assert windowed[0] * windowed[1] >= -(-(128 + kt - 1) // kt) and windowed[0] * windowed[1] < plain[0] * plain[1]
