"""GPU tests of the paged decode-attention kernel (kernels/decode_attention.py) against a PyTorch reference.

Every case has fresh random inputs, a NaN-poisoned output, random non-contiguous block tables and a cache
that holds NaN in every slot no sequence owns (slots past a sequence's length in its last block included), so
a kernel that reads a key it should not, or leaves an output unwritten, fails. Context lengths mix 1, lengths
that are not multiples of the block size and long contexts (4096+). gpt-oss's sinks and sliding window (at the
end) are checked against ops.attention.paged_attention_sinks with NaN in every slot before a window too.
"""
import math

import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.bench.timing import graph_replay  # noqa: E402
from light_moe.kernels import decode_attention as da  # noqa: E402
from light_moe.ops.attention import AttentionMetadata, paged_attention, paged_attention_sinks  # noqa: E402
from tests.kernels.gpu_helpers import rel_l2  # noqa: E402

pytestmark = pytest.mark.gpu

BF16, FP16 = torch.bfloat16, torch.float16
TOL = {BF16: 1e-2, FP16: 5e-3}


def _lengths(batch: int, block_size: int, gen) -> list[int]:
    """Mixed lengths: 1, one short of / one past a block boundary, one long context, the rest random."""
    fixed = [1, 4097 + block_size // 3, 2 * block_size - 1, 3 * block_size + 1]
    rand = torch.randint(1, 2100, (batch,), generator=gen, device="cuda").tolist()
    return (fixed + rand)[:batch] if batch > 1 else [4500]


def _shuffled_tables(lengths, block_size, width, num_blocks, index_dtype, gen) -> torch.Tensor:
    """[B, width] tables of distinct random blocks (never block 0, which only pads), 0 past each sequence."""
    perm = (torch.randperm(num_blocks - 1, generator=gen, device="cuda") + 1).tolist()
    tables = torch.zeros(len(lengths), width, dtype=index_dtype)
    start = 0
    for b, n in enumerate(lengths):
        blocks = -(-n // block_size)
        tables[b, :blocks] = torch.tensor(perm[start:start + blocks])
        start += blocks
    assert start < num_blocks
    return tables.cuda()


class Problem:
    """q, a NaN-filled paged cache whose owned slots hold random K/V, shuffled block tables."""

    def __init__(self, batch, num_heads, num_kv_heads, head_dim, block_size, dtype, lengths, gen,
                 index_dtype=torch.int32, extra_columns=3, spare_blocks=5):
        self.lengths = lengths
        self.block_size = block_size
        self.gen = gen
        blocks = [-(-n // block_size) for n in lengths]
        width = max(blocks) + extra_columns  # padded columns (0) like the engine's bucketed tables
        num_blocks = sum(blocks) + spare_blocks + 1
        self.k_cache = torch.empty((num_blocks, block_size, num_kv_heads, head_dim), device="cuda", dtype=dtype)
        self.v_cache = torch.empty_like(self.k_cache)
        self.tables = _shuffled_tables(lengths, block_size, width, num_blocks, index_dtype, gen)
        self.ctx_lens = torch.tensor(lengths, dtype=index_dtype, device="cuda")
        self.q = torch.empty(batch, num_heads, head_dim, device="cuda", dtype=dtype)
        self.refill()

    def refill(self) -> None:
        """New random q and K/V in every slot a sequence owns; NaN in all other slots."""
        self.q.copy_(torch.randn(self.q.shape, generator=self.gen, device="cuda") * 2)
        flat_k = self.k_cache.view(-1, *self.k_cache.shape[2:])
        flat_v = self.v_cache.view(-1, *self.v_cache.shape[2:])
        flat_k.fill_(float("nan"))
        flat_v.fill_(float("nan"))
        for b, n in enumerate(self.lengths):
            slots = self.slots(b, n)
            flat_k[slots] = torch.randn((n, *flat_k.shape[1:]), generator=self.gen, device="cuda").to(flat_k.dtype)
            flat_v[slots] = torch.randn((n, *flat_v.shape[1:]), generator=self.gen, device="cuda").to(flat_v.dtype)

    def slots(self, b: int, n: int) -> torch.Tensor:
        pos = torch.arange(n, device="cuda")
        return self.tables[b, pos // self.block_size].long() * self.block_size + pos % self.block_size

    def reference(self, scale: float) -> torch.Tensor:
        """fp32 softmax(q K^T scale) V per sequence over its own keys only (zeros without keys)."""
        group = self.q.shape[1] // self.k_cache.shape[2]
        out = torch.zeros(self.q.shape, dtype=torch.float32, device="cuda")
        flat_k = self.k_cache.view(-1, *self.k_cache.shape[2:])
        flat_v = self.v_cache.view(-1, *self.v_cache.shape[2:])
        for b, n in enumerate(self.lengths):
            if n == 0:
                continue
            slots = self.slots(b, n)
            k = flat_k[slots].float().repeat_interleave(group, dim=1)  # [n, h, D]
            v = flat_v[slots].float().repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,nhd->hn", self.q[b].float(), k) * scale
            out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
        return out


def _check(problem: Problem, out: torch.Tensor, scale: float, dtype) -> float:
    torch.cuda.synchronize()
    assert not out.isnan().any(), "NaN in the output: an unwritten row or a key read past a sequence's end"
    err = rel_l2(out, problem.reference(scale))
    assert err < TOL[dtype], f"rel L2 {err:.2e}"
    return err


# (h, g, D, bs, dtype, index dtype)
CONFIGS = {
    "mixtral": (32, 8, 128, 16, BF16, torch.int32),
    "mixtral_bs64_int64": (32, 8, 128, 64, BF16, torch.int64),
    "mha_D128": (16, 16, 128, 16, BF16, torch.int32),
    "r8_D128_bs32": (32, 4, 128, 32, BF16, torch.int32),
    "r4_D64_bs64": (16, 4, 64, 64, BF16, torch.int32),
    "mha_D64_fp16": (8, 8, 64, 16, FP16, torch.int32),
}


@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, batch):
    h, g, d, bs, dtype, index = CONFIGS[name]
    if batch == 64 and name not in ("mixtral", "mha_D64_fp16"):
        pytest.skip("batch 64 checked on two configurations (compile time)")
    gen = torch.Generator(device="cuda").manual_seed(100 * list(CONFIGS).index(name) + batch)
    problem = Problem(batch, h, g, d, bs, dtype, _lengths(batch, bs, gen), gen, index)
    out = torch.full_like(problem.q, float("nan"))
    scale = 1.0 / math.sqrt(d)
    res = da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens,
                              scale, out=out)
    assert res is out
    err = _check(problem, out, scale, dtype)
    print(f"\n{name} B={batch}: rel L2 {err:.2e}")


@pytest.mark.parametrize("num_splits", [1, 2, 1000])
@pytest.mark.parametrize("block_size", [1, 8, 16, 256])
def test_block_sizes_and_forced_splits(block_size, num_splits):
    """Every power-of-two block size the engine allows (bs < 8: one table lookup per key; bs > KT: several
    tiles per block), with the single-CTA path (S = 1), two splits and one split per 4 tiles."""
    gen = torch.Generator(device="cuda").manual_seed(7 * block_size + num_splits)
    lengths = [1, 300, 2 * block_size + 5, 1100]
    problem = Problem(4, 32, 8, 128, block_size, BF16, lengths, gen)
    out = torch.full_like(problem.q, float("nan"))
    da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens, 0.07,
                        out=out, num_splits=num_splits)
    _check(problem, out, 0.07, BF16)


@pytest.mark.parametrize("group", [16, 5])
def test_wide_and_odd_groups(group):
    """r = 16 (both row halves of the mma tile) and r = 5 (not a power of two)."""
    gen = torch.Generator(device="cuda").manual_seed(group)
    problem = Problem(3, 4 * group, 4, 128, 16, BF16, [1, 777, 4100], gen)
    out = da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens,
                              0.088)
    _check(problem, out, 0.088, BF16)


def test_empty_context_gives_zeros():
    """ctx_lens[b] == 0 (no keys): zeros in both the split and the single-CTA path, never NaN."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    problem = Problem(2, 32, 8, 128, 16, BF16, [0, 50], gen)
    for splits in (1, 4):
        out = torch.full_like(problem.q, float("nan"))
        da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens, 0.1,
                            out=out, num_splits=splits)
        _check(problem, out, 0.1, BF16)
        assert (out[0] == 0).all()


def test_matches_engine_reference_with_strided_int64_tables():
    """The engine's own format: int64 tables sliced out of a wider buffer (row stride > width, as in
    executor/cuda_graphs.py) and int64 ctx_lens; compared with ops.attention.paged_attention (decode metadata)."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    lengths = [5, 1, 64, 1000, 333]
    bs, batch = 16, len(lengths)
    problem = Problem(batch, 32, 8, 128, bs, BF16, lengths, gen, torch.int64)
    problem.k_cache.nan_to_num_(0.0)  # the SDPA reference multiplies masked NaN values by 0
    problem.v_cache.nan_to_num_(0.0)
    blocks = problem.tables.shape[1]
    wide = torch.zeros(batch + 2, blocks + 9, dtype=torch.int64, device="cuda")
    wide[:batch, :blocks] = problem.tables
    tables = wide[:batch, :blocks]
    ctx = problem.ctx_lens
    meta = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long, device="cuda"),
                             block_tables=tables, ctx_lens=ctx, query_pos=(ctx - 1).view(batch, 1),
                             padded_index=torch.arange(batch, device="cuda"), max_query_len=1,
                             max_ctx_len=blocks * bs)
    ref = paged_attention(problem.q, problem.k_cache, problem.v_cache, meta, 0.0884)
    out = torch.full_like(problem.q, float("nan"))
    da.decode_attention(problem.q, problem.k_cache, problem.v_cache, tables, ctx, 0.0884, out=out)
    torch.cuda.synchronize()
    assert rel_l2(out, ref) < 1e-2
    assert rel_l2(out, problem.reference(0.0884)) < 1e-2


@pytest.mark.parametrize("num_splits", [None, 1])
def test_cuda_graph_replay_reads_new_inputs(num_splits):
    """Capture with one batch, then write new q, new tables, new lengths (crossing split and block boundaries) and
    new K/V into the same buffers, poison out and replay: the graph must use the replay's device values."""
    gen = torch.Generator(device="cuda").manual_seed(21)
    bs = 16
    first = [1, 40, 2000, 17]
    problem = Problem(4, 32, 8, 128, bs, BF16, first, gen, extra_columns=200, spare_blocks=300)
    out = torch.full_like(problem.q, float("nan"))

    def step():
        da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens, 0.09,
                            out=out, num_splits=num_splits)

    replay = graph_replay(step)  # warmed up (compiled) on a side stream, then captured
    out.fill_(float("nan"))
    replay()
    _check(problem, out, 0.09, BF16)

    second = [3000, 1, 15, 33]  # within the table width the graph was captured with
    problem.tables.copy_(_shuffled_tables(second, bs, problem.tables.shape[1], problem.k_cache.shape[0],
                                          problem.tables.dtype, gen))
    problem.ctx_lens.copy_(torch.tensor(second, dtype=problem.ctx_lens.dtype))
    problem.lengths = second
    problem.refill()
    out.fill_(float("nan"))
    replay()
    _check(problem, out, 0.09, BF16)


# ---- gpt-oss: sinks and the sliding window (kernels/attention_variant.py) ------------------------------------------
# against ops.attention.paged_attention_sinks in fp32; every slot before a sequence's window holds NaN in the
# kernel's cache (the kernel must neither read those keys nor let them reach PV) and 0 in the reference's

# (h, g, D, bs)
VARIANT_HEADS = {"gpt_oss": (64, 8, 64, 16), "mha_D128": (16, 16, 128, 16)}
# contexts around a window of 128: shorter, equal, one past, far longer (whole tiles and blocks skipped)
WINDOW_LENGTHS = [1, 100, 128, 129, 4500, 1000]


def _poison_before_window(problem: Problem, window: int | None) -> None:
    if window is None:
        return
    flat_k = problem.k_cache.view(-1, *problem.k_cache.shape[2:])
    flat_v = problem.v_cache.view(-1, *problem.v_cache.shape[2:])
    for b, n in enumerate(problem.lengths):
        if n > window:
            slots = problem.slots(b, n - window)  # keys 0 .. n - window - 1: outside the window of position n - 1
            flat_k[slots] = float("nan")
            flat_v[slots] = float("nan")


def _check_variant(problem: Problem, out: torch.Tensor, scale: float, sinks, window) -> float:
    batch = len(problem.lengths)
    meta = AttentionMetadata.for_lengths(problem.lengths, [1] * batch, problem.tables)
    k_ref, v_ref = (c.nan_to_num(0.0).float() for c in (problem.k_cache, problem.v_cache))
    ref = paged_attention_sinks(problem.q.float(), k_ref, v_ref, meta, scale,
                                None if sinks is None else sinks.float(), window)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "NaN in the output: a key outside the window or the sequence reached it"
    err = rel_l2(out, ref)
    worst = max(range(batch), key=lambda b: rel_l2(out[b], ref[b]))
    assert err < TOL[out.dtype], f"rel L2 {err:.2e}; worst sequence {worst} (ctx {problem.lengths[worst]}): " \
                                 f"{rel_l2(out[worst], ref[worst]):.2e}"
    return err


def _variant_case(heads, lengths, sinks_dtype, window, seed, num_splits=None, dtype=BF16):
    h, g, d, bs = VARIANT_HEADS[heads]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    problem = Problem(len(lengths), h, g, d, bs, dtype, lengths, gen)
    _poison_before_window(problem, window)
    sinks = None
    if sinks_dtype is not None:  # around the logits' scale, some far above: a sink can take most of a row's mass
        sinks = (torch.randn(h, generator=gen, device="cuda") * 2 + 1).to(sinks_dtype)
        sinks[::7] += 6
    out = torch.full_like(problem.q, float("nan"))
    scale = 1.0 / math.sqrt(d)
    da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens, scale,
                        out=out, num_splits=num_splits, sinks=sinks, sliding_window=window)
    return _check_variant(problem, out, scale, sinks, window)


@pytest.mark.parametrize("sinks_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("heads", list(VARIANT_HEADS))
def test_sinks_only(heads, sinks_dtype):
    err = _variant_case(heads, WINDOW_LENGTHS, sinks_dtype, None, seed=31)
    print(f"\nsinks {heads} {sinks_dtype}: rel L2 {err:.2e}")


@pytest.mark.parametrize("window", [1, 100, 128, 4500, 10 ** 6])  # 100: not a multiple of bs or KT
@pytest.mark.parametrize("heads", list(VARIANT_HEADS))
def test_window_only(heads, window):
    """Windows smaller than, equal to and larger than the contexts of WINDOW_LENGTHS."""
    err = _variant_case(heads, WINDOW_LENGTHS, None, window, seed=window % 1000)
    print(f"\nwindow {window} {heads}: rel L2 {err:.2e}")


@pytest.mark.parametrize("num_splits", [None, 1, 2, 1000])
@pytest.mark.parametrize("heads", list(VARIANT_HEADS))
def test_sinks_and_window_with_forced_splits(heads, num_splits):
    """Both at once, on the single-CTA path (the sink in the warp merge) and split (the sink in the combine only:
    a sink counted by every split would fail)."""
    _variant_case(heads, WINDOW_LENGTHS, torch.float32, 128, seed=7, num_splits=num_splits)
    _variant_case(heads, [3000, 77, 5000], BF16, 300, seed=8, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [1, 8, 64, 256])
def test_window_block_sizes(block_size):
    """The window's first key inside a block of any size (bs < 8: one table lookup per key; bs > KT: several
    tiles per block, the window starting mid-block)."""
    gen = torch.Generator(device="cuda").manual_seed(block_size)
    lengths = [1, 300, 2 * block_size + 5, 1100]
    problem = Problem(4, 64, 8, 64, block_size, BF16, lengths, gen)
    _poison_before_window(problem, 200)
    sinks = torch.randn(64, generator=gen, device="cuda")
    out = torch.full_like(problem.q, float("nan"))
    da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens, 0.125,
                        out=out, sinks=sinks, sliding_window=200)
    _check_variant(problem, out, 0.125, sinks, 200)


def test_fp16_sinks_and_window():
    _variant_case("mha_D128", WINDOW_LENGTHS, FP16, 128, seed=5, dtype=FP16)

