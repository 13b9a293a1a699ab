"""CPU-only tests of the skinny decode GEMM (kernels/skinny_gemm.py): sm_90a compiles of its static configurations
(Mixtral's q/k/v and o projections at M = 1, 4, 8, 16 with and without bias, the lm_head, gpt-oss-like odd shapes,
forced tiles and splits), the cubin's resources (no spills, two CTAs per SM), the PTX it is designed around (the
weight stream issued before the PDL wait, mma / ldmatrix counts per k-tile, the cluster reduction only with a K
split), its fragment addressing checked against mma.sync's layouts under the TMA's 128-byte swizzle, the bank-
conflict claims, the plan choice, and the wrapper's input checks (raised before anything touches a GPU).
Run with -s to see the compile time and registers of each case.

Shape legend: M token rows, N out features, K in features, BN weight rows per CTA, MT token tile, S K-splits.
"""
import re

import pytest
import torch

pytest.importorskip("cutlass")

from cutlass.cute.runtime import make_fake_stream  # noqa: E402

from light_moe.kernels import skinny_gemm as sk  # noqa: E402
from tests.kernels.compile_check import compile_sm90a, compile_sm90a_ptx  # noqa: E402
from tests.kernels.test_mla_decode_compile import kernel_resources  # noqa: E402

BF16 = torch.bfloat16
SMS = 132  # H100 SXM
REGS_PER_SM = 65536
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096)}  # Mixtral-8x7B's attention projections (N, K)
# name -> (N, K, M, bias, block_n, splits); None: the plan's choice
EXTRA = {
    "lm_head_m1": (32000, 4096, 1, False, None, None),
    "gpt_oss_o_m16_bias": (2880, 4096, 16, True, None, None),
    "gpt_oss_qkv_m3_bias": (5120, 2880, 3, True, None, None),
    "k7168_m9": (5120, 7168, 9, False, None, None),
    "n2880_k2880_m16": (2880, 2880, 16, True, None, None),
    "bn128_m16_bias": (6144, 4096, 16, True, 128, None),
    "bn128_m1_s8": (4096, 4096, 1, False, 128, 8),
    "o_m16_s8": (4096, 4096, 16, True, None, 8),
    "o_m4_s1": (4096, 4096, 4, False, None, 1),
    "lm_head_m64": (32000, 4096, 64, False, None, None),
    "bn128_m64_bias": (6144, 4096, 64, True, 128, None),
    "o_m48_s8": (4096, 4096, 48, True, None, 8),
    "gpt_oss_qkv_m33_bias": (5120, 2880, 33, True, None, None),
}


def _compile_args(n, k, m, bias, block_n=None, splits=None):
    mt = sk.token_tile(m)
    plan = sk.choose_plan(n, k, SMS, mt, block_n, splits)
    return plan, sk.make_compile_args(n, k, mt, plan, bias, stream=make_fake_stream())


def _check_resources(cubin: str, plan: sk.SkinnyPlan, mt: int, label: str, seconds: float) -> None:
    resources = kernel_resources(cubin)
    assert len(resources) == 1, resources
    (res,) = resources.values()
    print(f"\nskinny_gemm {label}: {plan}, MT={mt}, compiled in {seconds:.2f} s, {res}")
    assert res.get("frame", 0) == 0, f"local memory (spills): {res}"
    assert res["regs"] * sk.THREADS * sk.CTAS_PER_SM <= REGS_PER_SM, "fewer resident CTAs than the plan assumes"
    assert (sk.smem_bytes(plan.block_n, mt, plan.stages) + sk.SMEM_RESERVED_PER_CTA) * sk.CTAS_PER_SM \
        <= sk.SMEM_PER_SM


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mixtral_projections_compile_without_spills(shape, m, bias, tmp_path):
    n, k = SHAPES[shape]
    assert sk.supports(BF16, m, n, k, bias) == (True, "ok")
    plan, (jit_fn, args) = _compile_args(n, k, m, bias)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _check_resources(cubin, plan, sk.token_tile(m), f"{shape} M={m} bias={bias}", seconds)


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_other_configurations_compile_without_spills(name, tmp_path):
    n, k, m, bias, block_n, splits = EXTRA[name]
    assert sk.supports(BF16, m, n, k, bias) == (True, "ok")
    plan, (jit_fn, args) = _compile_args(n, k, m, bias, block_n, splits)
    cubin, seconds = compile_sm90a(jit_fn, *args, dump_root=str(tmp_path))
    _check_resources(cubin, plan, sk.token_tile(m), name, seconds)


@pytest.mark.parametrize("n,k,m,bias,block_n,splits", [
    (4096, 4096, 16, True, None, None),  # S = 4, MT = 16
    (6144, 4096, 1, False, None, None),  # S = 2, MT = 8
    (32000, 4096, 4, True, None, None),  # S = 1
    (6144, 4096, 16, False, 128, None),  # BN = 128: two m16 blocks per warp
])
def test_ptx_structure(n, k, m, bias, block_n, splits, tmp_path):
    """Per k-tile each consumer warp loads its A fragments (4 per m16 block) and the token fragments (4 for MT = 16,
    2 for MT = 8) with ldmatrix.x4 and issues m16 blocks x token n-tiles x 4 mma.sync, each once in the code. The
    producer's first weight TMA comes before the first griddepcontrol.wait (the weights stream while the previous
    kernel finishes); the token TMA only after it. With S > 1 the partials meet through distributed shared memory
    (S mapa + ld.shared::cluster per reduction round, two cluster barriers); with S = 1 a CTA barrier and local
    loads."""
    plan, (jit_fn, args) = _compile_args(n, k, m, bias, block_n, splits)
    mt = sk.token_tile(m)
    ptx = compile_sm90a_ptx(jit_fn, *args, dump_root=str(tmp_path))
    body = ptx[ptx.index(".entry"):]
    mpw = plan.block_n // 64
    assert body.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16") == 4 * mpw + sk.token_loads_per_stage(mt)
    assert body.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == mpw * (mt // 8) * 4
    tma = "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
    assert body.count(tma) == 4  # prologue weights, prologue tokens, steady-state weights + tokens
    first_tma, first_wait = body.index(tma), body.index("griddepcontrol.wait")
    assert first_tma < first_wait, "the weight prefetch must be issued before the PDL wait"
    assert body.index(tma, first_tma + 1) > first_wait, "the token tiles must wait for the previous kernel"
    assert body.count("griddepcontrol.wait") == 2  # producer warp and consumer warps
    assert re.search(r"\.reqntid\s+160, 1, 1", ptx)
    rounds = -(-mt * (plan.block_n // plan.splits // 4) // sk.THREADS)
    if plan.splits > 1:
        assert body.count("barrier.cluster.arrive") == 2 and body.count("barrier.cluster.wait") == 2
        assert body.count("mapa.shared::cluster.u32") == plan.splits * rounds
        assert body.count("ld.shared::cluster.v4.f32") == plan.splits * rounds
    else:
        assert "barrier.cluster" not in body and "mapa" not in body
        assert body.count("ld.shared.v4.f32") == rounds
    assert body.count("st.global.v2.b32") == rounds
    assert body.count("ld.global") == (4 * rounds if bias else 0)  # the bias, the only non-TMA global load


# ---------------------------------------------------------------------------------------------------------------
# Fragment addressing: a CPU model of the swizzled stage and of ldmatrix.x4 against mma.sync m16n8k16's layouts
# ---------------------------------------------------------------------------------------------------------------

def _stage(rows: int) -> dict[int, tuple[int, int]]:
    """Byte offset of each bf16 in a stage -> (row, column), as the TMA's 128-byte swizzle places it: chunk c of row
    r at chunk c ^ (r % 8) of the row's 128 bytes."""
    where = {}
    for r in range(rows):
        for col in range(sk.BLOCK_K):
            where[r * sk.ROW_BYTES + ((col // 8) ^ (r % 8)) * 16 + (col % 8) * 2] = (r, col)
    return where


def _ldmatrix_x4(where, offsets):
    """offsets[lane] -> regs[lane][j] = the two (row, column) elements lane gets in register j: the elements
    (lane // 4, 2 (lane % 4) and + 1) of matrix j, whose row i lane 8 j + i addresses."""
    regs = []
    for lane in range(32):
        row, pair = lane // 4, lane % 4
        regs.append([tuple(where[offsets[8 * j + row] + 4 * pair + 2 * e] for e in range(2)) for j in range(4)])
    return regs


@pytest.mark.parametrize("block16", [0, 3, 7])
def test_weight_fragments_are_mma_a_fragments(block16):
    """For every k-step the four registers of lane (g, c) hold A = W[16 block16 + row, 16 q + col] at mma.sync's
    (row, col): a0 (g, 2c..), a1 (g + 8, 2c..), a2 (g, 2c + 8..), a3 (g + 8, 2c + 8..)."""
    where = _stage(128)
    for q in range(sk.BLOCK_K // 16):
        regs = _ldmatrix_x4(where, [sk.weight_fragment_offset(block16, q, lane) for lane in range(32)])
        for lane in range(32):
            g, c = lane // 4, lane % 4
            for j, (dr, dc) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                want = tuple((16 * block16 + g + dr, 16 * q + 2 * c + dc + e) for e in range(2))
                assert regs[lane][j] == want, (q, lane, j)


@pytest.mark.parametrize("m_tile", sk.TOKEN_TILES)
def test_token_fragments_are_mma_b_fragments(m_tile):
    """B of k-step q, token n-tile t: lane (g, c) holds b0 = x[8 t + g, 16 q + 2c..], b1 = x[8 t + g, 16 q + 2c + 8..]
    (mma.sync's col-major B: k pairs of column n = g), in the register order consume() reads them."""
    where = _stage(m_tile)
    got = {}  # (q, t) -> per lane (b0, b1)
    for idx in range(sk.token_loads_per_stage(m_tile)):
        regs = _ldmatrix_x4(where, [sk.token_fragment_offset(idx, lane, m_tile) for lane in range(32)])
        for lane in range(32):
            if m_tile >= 16:  # load (k-step q, block t): registers 0, 1: n-tile 2t; 2, 3: n-tile 2t + 1
                q, t = divmod(idx, m_tile // 16)
                got.setdefault((q, 2 * t), []).append((regs[lane][0], regs[lane][1]))
                got.setdefault((q, 2 * t + 1), []).append((regs[lane][2], regs[lane][3]))
            else:  # registers 0, 1: k-step 2 idx; 2, 3: k-step 2 idx + 1
                got.setdefault((2 * idx, 0), []).append((regs[lane][0], regs[lane][1]))
                got.setdefault((2 * idx + 1, 0), []).append((regs[lane][2], regs[lane][3]))
    assert sorted(got) == [(q, t) for q in range(sk.BLOCK_K // 16) for t in range(m_tile // 8)]
    for (q, t), lanes in got.items():
        for lane, (b0, b1) in enumerate(lanes):
            g, c = lane // 4, lane % 4
            assert b0 == tuple((8 * t + g, 16 * q + 2 * c + e) for e in range(2)), (q, t, lane)
            assert b1 == tuple((8 * t + g, 16 * q + 2 * c + 8 + e) for e in range(2)), (q, t, lane)


def test_ldmatrix_phases_are_conflict_free():
    """ldmatrix.x4 reads one 8x8 matrix per phase: its 8 lanes' 16-byte rows sit in 8 different 16-byte bank groups
    of the 128-byte bank line."""
    for block16 in range(8):
        for q in range(4):
            offsets = [sk.weight_fragment_offset(block16, q, lane) for lane in range(32)]
            for j in range(4):
                assert len({(o // 16) % 8 for o in offsets[8 * j:8 * j + 8]}) == 8, (block16, q, j)
    for m_tile in sk.TOKEN_TILES:
        for idx in range(sk.token_loads_per_stage(m_tile)):
            offsets = [sk.token_fragment_offset(idx, lane, m_tile) for lane in range(32)]
            for j in range(4):
                assert len({(o // 16) % 8 for o in offsets[8 * j:8 * j + 8]}) == 8, (m_tile, idx, j)


@pytest.mark.parametrize("block_n", sk.BLOCK_N_CHOICES)
def test_partial_tile_stores_are_conflict_free(block_n):
    """Each of a warp's four fragment stores into partial[token][row] (pitch BN + PARTIAL_PAD floats) hits 32
    distinct 4-byte banks, and every (token, row) of the tile is written exactly once over the warps."""
    pitch = block_n + sk.PARTIAL_PAD
    mpw = block_n // 64
    seen = []
    for warp in range(sk.CONSUMER_WARPS):
        for i in range(mpw):
            for t in range(sk.MAX_M // 8):
                for dtok, drow in ((0, 0), (1, 0), (0, 8), (1, 8)):
                    words = []
                    for lane in range(32):
                        row = warp * 16 * mpw + 16 * i + lane // 4 + drow
                        tok = 8 * t + 2 * (lane % 4) + dtok
                        words.append(tok * pitch + row)
                        seen.append((tok, row))
                    assert len({w % 32 for w in words}) == 32
    assert sorted(seen) == [(tok, row) for tok in range(sk.MAX_M) for row in range(block_n)]


# ---------------------------------------------------------------------------------------------------------------
# Host side: supports, the plan, the wrapper's checks
# ---------------------------------------------------------------------------------------------------------------

def test_supports_reasons():
    assert sk.supports(BF16, 1, 6144, 4096) == (True, "ok")
    assert sk.supports(BF16, 16, 2880, 2880, True) == (True, "ok")
    assert "bfloat16" in sk.supports(torch.float16, 1, 6144, 4096)[1]
    assert sk.supports(BF16, 64, 6144, 4096) == (True, "ok")
    assert "M=65" in sk.supports(BF16, 65, 6144, 4096)[1]
    assert "M=0" in sk.supports(BF16, 0, 6144, 4096)[1]
    assert "N=6100" in sk.supports(BF16, 1, 6100, 4096)[1]
    assert "K=4000" in sk.supports(BF16, 1, 4096, 4000)[1]


@pytest.mark.parametrize("n,k,splits", [
    (6144, 4096, 1),  # q/k/v: 96 tiles fill half the SMs or more: no split
    (4096, 4096, 4),  # o: 64 tiles -> 256 CTAs
    (32000, 4096, 1),  # lm_head: 500 tiles
    (2880, 2880, 4),  # 45 tiles -> 180 CTAs; 45 k-tiles as 12, 12, 12, 9
    (5120, 7168, 1),  # 80 tiles
    (64, 128, 2),  # 1 tile, 2 k-tiles: S = 8 would leave splits empty
])
def test_plan_for_known_shapes(n, k, splits):
    plan = sk.choose_plan(n, k, SMS)
    assert plan.block_n == 64 and plan.splits == splits


@pytest.mark.parametrize("k", [64, 128, 320, 2880, 4096, 7168])
@pytest.mark.parametrize("n", [64, 640, 2880, 4096, 6144, 32000])
@pytest.mark.parametrize("mt", sk.TOKEN_TILES)
def test_plan_properties(n, k, mt):
    """S is a power of two <= 8 (the cluster), every split has k-tiles and together they cover K exactly once, the
    grid gives every SM a CTA (no split at all when the tiles fill half the SMs) unless S is at its cap or twice S
    would leave a split empty, and the ring fits two CTAs per SM."""
    plan = sk.choose_plan(n, k, SMS, mt)
    k_tiles = k // sk.BLOCK_K
    assert plan.splits in (1, 2, 4, 8)
    assert (plan.splits - 1) * plan.k_tiles_per_split < k_tiles <= plan.splits * plan.k_tiles_per_split
    tiles = n // plan.block_n
    doubled = 2 * plan.splits
    assert (2 * tiles >= SMS and plan.splits == 1 or tiles * plan.splits >= SMS or plan.splits == 8
            or -(-k_tiles // doubled) * (doubled - 1) >= k_tiles)
    assert tiles * plan.splits < 2 * SMS or plan.splits == 1  # never more splits than needed
    assert sk.MIN_STAGES <= plan.stages <= min(sk.MAX_STAGES, max(sk.MIN_STAGES, plan.k_tiles_per_split))
    assert (sk.smem_bytes(plan.block_n, mt, plan.stages) + sk.SMEM_RESERVED_PER_CTA) * sk.CTAS_PER_SM \
        <= sk.SMEM_PER_SM


def test_plan_overrides_and_their_checks():
    assert sk.choose_plan(6144, 4096, SMS, 16, 128) == sk.SkinnyPlan(128, 4, 16, 5)  # 48 tiles -> S = 4
    assert sk.choose_plan(4096, 4096, SMS, 16, None, 8).splits == 8
    assert sk.choose_plan(4096, 128, SMS, 16, None, 8).splits == 2  # only 2 k-tiles
    assert sk.choose_plan(4096, 4096, SMS, 8).stages == sk.MAX_STAGES
    with pytest.raises(ValueError, match="block_n"):
        sk.choose_plan(4096, 4096, SMS, 16, 96)
    with pytest.raises(ValueError, match="block_n"):
        sk.choose_plan(2880, 4096, SMS, 16, 128)  # 2880 % 128
    with pytest.raises(ValueError, match="splits"):
        sk.choose_plan(4096, 4096, SMS, 16, None, 3)


def test_token_tile():
    assert [sk.token_tile(m) for m in (1, 4, 8, 9, 16, 17, 32, 33, 64)] == [8, 8, 8, 16, 16, 32, 32, 64, 64]
    with pytest.raises(StopIteration):
        sk.token_tile(65)  # supports() refuses M > MAX_M before this is asked


def _inputs(m=4, n=128, k=256):
    return (torch.zeros(m, k, dtype=BF16), torch.zeros(n, k, dtype=BF16), torch.zeros(n, dtype=BF16),
            torch.zeros(m, n, dtype=BF16))


@pytest.mark.parametrize("change,message", [
    (lambda x, w, b, o: (x.float(), w, b, o), "x must be contiguous"),
    (lambda x, w, b, o: (x.t().contiguous().t(), w, b, o), "x must be contiguous"),
    (lambda x, w, b, o: (torch.zeros(65, 256, dtype=BF16), w, b, None), "M=65"),
    (lambda x, w, b, o: (x[:0], w, b, None), "M=0"),
    (lambda x, w, b, o: (x, w.half(), b, o), "weight must be"),
    (lambda x, w, b, o: (x, torch.zeros(96, 256, dtype=BF16), b[:96], o[:, :96]), "N=96"),
    (lambda x, w, b, o: (x, w, b.float(), o), "bias must be"),
    (lambda x, w, b, o: (x, w, b[:64], o), "bias must be"),
    (lambda x, w, b, o: (x, w, b, o[:, :64]), "out must be"),
    (lambda x, w, b, o: (x, w, b, o), "CUDA device"),
])
def test_wrapper_rejects_bad_inputs(change, message):
    x, w, b, o = change(*_inputs())
    with pytest.raises(ValueError, match=message):
        sk.skinny_linear(x, w, b, out=o)
