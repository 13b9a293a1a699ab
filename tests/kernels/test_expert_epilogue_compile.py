"""CPU-only checks of the grouped GEMMs' epilogue variants (light_moe/kernels/expert_epilogue.py): per-expert biases
and gpt-oss's clamped SwiGLU compile for sm_90a in both kernels (bf16 and W4A16) and their PTX holds the bias loads
and the clamp; the bias index the kernels use agrees with both weight preparations; an emulation of the epilogue
on the prepared row order equals the reference experts; ExpertEpilogue's checks. GPU checks:
test_expert_epilogue_gpu.py.

Shape legend: E experts, H hidden, I intermediate, N weight rows (2I up, H down), M routed rows.
"""
import re

import pytest
import torch

cute = pytest.importorskip("cutlass.cute")

from cutlass import BFloat16  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor  # noqa: E402

from light_moe.config import ExpertConfig  # noqa: E402
from light_moe.kernels import expert_epilogue  # noqa: E402
from light_moe.kernels import grouped_gemm as gg  # noqa: E402
from light_moe.kernels.expert_epilogue import DEFAULT_EPILOGUE, ExpertEpilogue, canonical_row  # noqa: E402
from light_moe.kernels.tile_config import TileConfig  # noqa: E402
from light_moe.kernels.w4a16_gemm import W4A16GroupedGemmSm90  # noqa: E402
from light_moe.kernels.w4a16_layout import prepare_w4a16_weights  # noqa: E402
from light_moe.ops import reference  # noqa: E402
from tests.kernels import test_grouped_gemm_compile as bf16_compile  # noqa: E402
from tests.kernels import test_w4a16_compile as w4a16_compile  # noqa: E402
from tests.kernels.compile_check import compile_sm90a_ptx  # noqa: E402

GPT_OSS = ExpertConfig(activation="clamped_swiglu", alpha=1.702, limit=7.0, bias=True)
SWIGLU = ExpertEpilogue.of(GPT_OSS, bias=True)
BIAS = ExpertEpilogue(bias=True)  # the down projection's epilogue (and SiLU experts with biases)
LIMIT_PTX = "0f40E00000"  # 7.0f: the clamp's bound, baked into the code
BIAS_LOAD = re.compile(r"ld\.global(\.nc)?\.b16")  # one bf16 bias value

BF16_CASES = {
    # name: (gated, E, H, I, tile config, epilogue); gpt-oss-20b's shape (I = 2880: the up projection's 5760 rows
    # take 128-row tiles, the down projection's 2880 rows 64-row tiles)
    "up_decode_64x8_swiglu": (True, 32, 2880, 2880, TileConfig(64, 8), SWIGLU),
    "up_128x32_swiglu": (True, 32, 2880, 2880, TileConfig(128, 32), SWIGLU),
    "up_prefill_256x128_silu_bias": (True, 8, 4096, 14336, TileConfig(256, 128, "producer"), BIAS),
    "down_decode_64x8_bias": (False, 32, 2880, 2880, TileConfig(64, 8), BIAS),
    "down_prefill_256x128_bias": (False, 8, 4096, 14336, TileConfig(256, 128, "producer"), BIAS),
}

W4A16_CASES = {
    # name: (gated, E, H, I, g, tile config, epilogue); gpt-oss-20b (H = I = 2880: 45 k-tiles, an odd count) takes
    # g = 32 or 64 (g = 128 does not divide 2880) and no split K; 2816 (44 k-tiles) the split-K decode tiles
    "up_decode_64x8_k4_swiglu": (True, 32, 2816, 2816, 128, TileConfig(64, 8, k_split=4), SWIGLU),
    "gpt_oss_up_decode_128x8_swiglu": (True, 32, 2880, 2880, 32, TileConfig(128, 8), SWIGLU),
    "gpt_oss_up_128x64_swiglu": (True, 32, 2880, 2880, 64, TileConfig(128, 64), SWIGLU),
    "gpt_oss_down_decode_64x8_bias": (False, 32, 2880, 2880, 32, TileConfig(64, 8), BIAS),
    "up_decode_128x16_k2_swiglu": (True, 32, 2816, 2816, 32, TileConfig(128, 16, k_split=2), SWIGLU),
    "up_prefill_256x128_tma_swiglu": (True, 8, 4096, 14336, 128,
                                      TileConfig(256, 128, kblock_pipeline=True, bulk_weights=True, tma_tokens=True),
                                      SWIGLU),
    "down_decode_64x8_k4_bias": (False, 32, 2816, 2816, 128, TileConfig(64, 8, k_split=4), BIAS),
    "down_prefill_128x256_bias": (False, 8, 4096, 14336, 128, TileConfig(128, 256, "producer"), BIAS),
}


def _bias_arg(num_experts: int, n_out: int):
    return make_fake_compact_tensor(BFloat16, (num_experts, n_out), stride_order=(1, 0))


def _check_ptx(ptx: str, epilogue: ExpertEpilogue, mma_m: int):
    """The variant's instructions are in the code: 2 bias loads per m64 atom of a consumer thread (its rows r and
    r + 8), and the clamp's bound for the clamped SwiGLU."""
    assert len(BIAS_LOAD.findall(ptx)) == (2 * mma_m if epilogue.bias else 0)
    assert (LIMIT_PTX in ptx) == (epilogue.activation == "clamped_swiglu")


@pytest.mark.parametrize("name", sorted(BF16_CASES))
def test_bf16_epilogue_variant_compiles(name, tmp_path):
    gated, num_experts, hidden, inter, config, epilogue = BF16_CASES[name]
    n_out, k_dim, args = bf16_compile._args(gated, num_experts, hidden, inter)
    kernel = gg.GroupedGemmSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts, config=config,
                                epilogue=epilogue)
    ptx = compile_sm90a_ptx(kernel, *args, _bias_arg(num_experts, n_out), dump_root=str(tmp_path))
    _check_ptx(ptx, epilogue, config.tile_w // (64 * kernel.n_consumer_wg))


@pytest.mark.parametrize("name", sorted(W4A16_CASES))
def test_w4a16_epilogue_variant_compiles(name, tmp_path):
    gated, num_experts, hidden, inter, group_size, config, epilogue = W4A16_CASES[name]
    n_out, k_dim, args = w4a16_compile._args(gated, num_experts, hidden, inter, group_size)
    kernel = W4A16GroupedGemmSm90(gated=gated, n_out=n_out, k_dim=k_dim, num_experts=num_experts,
                                  group_size=group_size, config=config, epilogue=epilogue)
    ptx = compile_sm90a_ptx(kernel, *args, _bias_arg(num_experts, n_out), dump_root=str(tmp_path))
    _check_ptx(ptx, epilogue, kernel.n_atoms // kernel.m_wg)


def test_default_kernel_has_no_epilogue_instructions(tmp_path):
    """The default (SiLU * up, no bias) kernel: no bias argument, no bias loads, no clamp."""
    n_out, k_dim, args = bf16_compile._args(True, 32, 2880, 2880)
    kernel = gg.GroupedGemmSm90(gated=True, n_out=n_out, k_dim=k_dim, num_experts=32, config=TileConfig(64, 8))
    assert kernel.epilogue == DEFAULT_EPILOGUE
    _check_ptx(compile_sm90a_ptx(kernel, *args, dump_root=str(tmp_path)), DEFAULT_EPILOGUE, 1)


def test_w4a16_takes_gpt_oss_20b_at_group_32_and_64():
    """gpt-oss-20b (H = I = 2880 = 45 k-tiles of 64 = 22.5 groups of 128): W4A16 at g = 32 / 64, every tile the
    chooser picks from decode to prefill (odd k-tiles: no split K, one k-tile per stage); g = 128 is refused with
    the reason; the bf16 grouped GEMM takes the shape as well."""
    from light_moe.kernels import w4a16_gemm
    from light_moe.kernels.tile_config import choose_w4a16_tile

    for g in (32, 64):
        assert w4a16_gemm.supports(32, 2880, 2880, g) == (True, "ok")
        for rows in (1, 4, 32, 128, 4096, 65536):
            for gated, n_out in ((True, 5760), (False, 2880)):
                config = choose_w4a16_tile(rows, 32, n_out, 2880, group_size=g, gated=gated)
                assert config.k_split == 1 and config.k_tiles_per_stage == 1, (rows, gated, config)
    ok, reason = w4a16_gemm.supports(32, 2880, 2880, 128)
    assert not ok and "multiples of the group size 128" in reason
    assert gg.supports(torch.bfloat16, 32, 2880, 2880) == (True, "ok")


@pytest.mark.parametrize("inter", (8, 48, 128))
def test_bias_index_matches_both_weight_preparations(inter):
    """canonical_row(prepared row) is the canonical row each preparation put there: the bias entry the epilogue adds
    to that accumulator row (bf16 w13 of grouped_gemm, int4 w13 of w4a16_layout; down rows stay in place)."""
    num_experts, hidden = 2, 128
    rows = torch.arange(2 * inter)
    w13 = rows.view(1, -1, 1).expand(num_experts, -1, hidden).to(torch.bfloat16).contiguous()  # row r holds r
    w2 = torch.zeros(num_experts, hidden, inter, dtype=torch.bfloat16)
    w13p, _ = gg.prepare_expert_weights(w13, w2)
    assert torch.equal(w13p[1, :, 0].long(), canonical_row(rows, inter, True))
    if 2 * inter % 64 == 0:  # the W4A16 layout takes 64-row atoms: its scales (meta low halves) follow the rows
        groups = hidden // 128
        scales = rows.view(1, -1, 1).expand(num_experts, -1, groups).to(torch.bfloat16).contiguous()
        qweight = torch.zeros(num_experts, 2 * inter, hidden // 8, dtype=torch.int32)
        meta = prepare_w4a16_weights(qweight, scales, None, 128, gated=True).meta  # [E, G, N]
        prepared_scales = (meta[1, 0] & 0xFFFF).to(torch.int16).view(torch.bfloat16).long()
        assert torch.equal(prepared_scales, canonical_row(rows, inter, True))
    assert torch.equal(canonical_row(rows, inter, False), rows)


def _epilogue_emulation(gate_up_p: torch.Tensor, bias: torch.Tensor, epilogue: ExpertEpilogue) -> torch.Tensor:
    """The kernel's gated epilogue in torch on the prepared row order: gate_up_p [m, 2I] (prepared rows), bias [2I]
    canonical; value of row r plus bias[canonical_row(r)]; rows r % 16 < 8 are gates, r + 8 their up rows; the
    output column of gate row r is (r // 16) * 8 + r % 8; activation as expert_epilogue.gated_activation."""
    two_inter = gate_up_p.shape[1]
    rows = torch.arange(two_inter)
    acc = gate_up_p + bias[canonical_row(rows, two_inter // 2, True)]
    gate_rows = rows[rows % 16 < 8]
    gate, up = acc[:, gate_rows], acc[:, gate_rows + 8]
    if epilogue.activation == "clamped_swiglu":
        gate = torch.minimum(gate, torch.tensor(epilogue.limit))
        up = up.clamp(-epilogue.limit, epilogue.limit)
        act = gate / (1.0 + torch.exp(gate * -epilogue.alpha)) * (up + 1.0)
    else:
        act = gate / (1.0 + torch.exp(-gate)) * up
    out = torch.empty_like(act)
    out[:, (gate_rows // 16) * 8 + gate_rows % 8] = act
    return out


@pytest.mark.parametrize("spec", (GPT_OSS, None))
def test_epilogue_emulation_matches_reference_experts(spec):
    """The epilogue's math on the prepared (interleaved) rows with canonical biases equals reference.expert_up with
    the spec and b13 (fp32); without the bias, or SiLU for the clamp, it would not (the test can fail)."""
    gen = torch.Generator().manual_seed(0)
    num_experts, hidden, inter, rows = 3, 64, 48, 40
    x = torch.randn(rows, hidden, generator=gen) * 4  # |gate|, |up| beyond the limit of 7 for some values
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen)
    b13 = torch.randn(num_experts, 2 * inter, generator=gen)
    offsets = torch.tensor([0, 15, 15, rows], dtype=torch.int32)  # expert 1 empty
    gather = torch.randint(0, rows, (rows,), generator=gen, dtype=torch.int32)
    w13p, _ = gg.prepare_expert_weights(w13, torch.zeros(num_experts, hidden, inter))
    epilogue = ExpertEpilogue.of(spec, bias=True)
    ref = reference.expert_up(x, gather, offsets, w13, spec, b13)
    got = torch.empty_like(ref)
    for e, lo, hi in ((0, 0, 15), (2, 15, rows)):
        got[lo:hi] = _epilogue_emulation(x[gather[lo:hi].long()] @ w13p[e].t(), b13[e], epilogue)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    unbiased = reference.expert_up(x, gather, offsets, w13, spec, None)
    assert (got - unbiased).abs().max() > 0.1
    if spec is not None:
        assert (got - reference.expert_up(x, gather, offsets, w13, None, b13)).abs().max() > 0.1


def test_expert_epilogue_checks():
    assert ExpertEpilogue.of(None, bias=False) == DEFAULT_EPILOGUE
    assert ExpertEpilogue.of(ExpertConfig(bias=True), bias=True) == BIAS
    assert SWIGLU == ExpertEpilogue("clamped_swiglu", 1.702, 7.0, True)
    assert SWIGLU != ExpertEpilogue("clamped_swiglu", 1.702, 7.0, False)  # distinct compile keys
    with pytest.raises(ValueError, match="SiLU takes no alpha"):
        ExpertEpilogue("silu", alpha=1.702)
    with pytest.raises(ValueError, match="limit > 0"):
        ExpertEpilogue("clamped_swiglu", 1.702, None)
    with pytest.raises(ValueError, match="activation must be"):
        ExpertEpilogue("gelu")
    ok, reason = expert_epilogue.supports(SWIGLU, gated=False)
    assert not ok and "down projection has no activation" in reason
    with pytest.raises(ValueError, match="no activation"):
        gg.GroupedGemmSm90(gated=False, n_out=2880, k_dim=2880, num_experts=32, config=TileConfig(64, 8),
                           epilogue=SWIGLU)
    b13 = torch.zeros(32, 5760, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="takes no b13"):
        expert_epilogue.check_bias(DEFAULT_EPILOGUE, b13, 32, 5760, "b13")
    with pytest.raises(ValueError, match="needs b13"):
        expert_epilogue.check_bias(SWIGLU, None, 32, 5760, "b13")
    with pytest.raises(ValueError, match=r"\[32, 5760\]"):
        expert_epilogue.check_bias(SWIGLU, b13[:, :2880], 32, 5760, "b13")
