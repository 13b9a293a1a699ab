"""GPU tests of the MLA decode kernel (kernels/mla_decode_attention.py) against the absorbed computation in fp32,
and of its wiring in CuteOps.mla_attention against the reference backend (ops/attention.py paged_mla_attention).

Every case has fresh random inputs, a NaN-poisoned output, shuffled non-contiguous block tables (padded with
block 0 like the engine's) and a latent cache that holds NaN in every slot no sequence owns (slots past a
sequence's length in its last block included), so a kernel that reads a row it should not, or leaves an output
unwritten, fails. Context lengths mix 1, block_size - 1, block_size, 1000, 4097 and random ones up to 32k.
"""
import math

import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.bench.timing import graph_replay  # noqa: E402
from light_moe.kernels import mla_decode_attention as mk  # noqa: E402
from light_moe.ops.attention import AttentionMetadata  # noqa: E402
from tests.kernels.gpu_helpers import rel_l2  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="CuTe kernels need sm_90")]

BF16 = torch.bfloat16
TOL = 1e-2  # relative L2, bf16
L, R = 512, 64
SCALE = 1.0 / math.sqrt(128 + 64)  # DeepSeek's 1 / sqrt(Dn + R)


def _lengths(batch: int, block_size: int, gen) -> list[int]:
    fixed = [1, block_size - 1, block_size, 1000, 4097]
    fixed = [n for n in fixed if n > 0]  # block_size 1: no block_size - 1
    rand = torch.randint(1, 2100, (batch,), generator=gen, device="cuda").tolist()
    return (fixed + rand)[:batch] if batch > 1 else [4097]


def _shuffled_tables(lengths, block_size, width, num_blocks, gen) -> torch.Tensor:
    """[B, width] int32 tables of distinct random blocks (never block 0, which only pads), 0 past each sequence."""
    perm = (torch.randperm(num_blocks - 1, generator=gen, device="cuda") + 1).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    start = 0
    for b, n in enumerate(lengths):
        blocks = -(-n // block_size)
        tables[b, :blocks] = torch.tensor(perm[start:start + blocks], dtype=torch.int32)
        start += blocks
    assert start < num_blocks
    return tables.cuda()


class Problem:
    """q_abs, a NaN-filled paged latent cache whose owned slots hold random rows, shuffled block tables."""

    def __init__(self, lengths, heads, block_size, gen, extra_columns=3, spare_blocks=5):
        self.lengths = lengths
        self.block_size = block_size
        self.gen = gen
        blocks = [-(-n // block_size) for n in lengths]
        width = max(blocks) + extra_columns  # padded columns (0), as the engine's tables
        num_blocks = sum(blocks) + spare_blocks + 1
        self.cache = torch.empty((num_blocks, block_size, L + R), device="cuda", dtype=BF16)
        self.tables = _shuffled_tables(lengths, block_size, width, num_blocks, gen)
        self.ctx_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        self.q = torch.empty(len(lengths), heads, L + R, device="cuda", dtype=BF16)
        self.refill()

    def refill(self) -> None:
        """New random q_abs and latent rows in every slot a sequence owns; NaN in all other slots."""
        self.q.copy_(torch.randn(self.q.shape, generator=self.gen, device="cuda"))
        flat = self.cache.view(-1, L + R)
        flat.fill_(float("nan"))
        for b, n in enumerate(self.lengths):
            flat[self.slots(b, n)] = torch.randn((n, L + R), generator=self.gen, device="cuda").to(BF16)

    def slots(self, b: int, n: int) -> torch.Tensor:
        pos = torch.arange(n, device="cuda")
        return self.tables[b, pos // self.block_size].long() * self.block_size + pos % self.block_size

    def reference(self, scale: float) -> torch.Tensor:
        """fp32 softmax(q_abs C^T scale) C[:, :L] per sequence over its own rows only (zeros without rows)."""
        out = torch.zeros(*self.q.shape[:2], L, dtype=torch.float32, device="cuda")
        flat = self.cache.view(-1, L + R)
        for b, n in enumerate(self.lengths):
            if n:
                rows = flat[self.slots(b, n)].float()  # [n, L + R]
                probs = (self.q[b].float() @ rows.t() * scale).softmax(-1)
                out[b] = probs @ rows[:, :L]
        return out

    def run(self, scale: float = SCALE, **kwargs) -> torch.Tensor:
        out = torch.full((*self.q.shape[:2], L), float("nan"), dtype=BF16, device="cuda")
        res = mk.mla_decode_attention(self.q, self.cache, self.tables, self.ctx_lens, scale, out=out, **kwargs)
        assert res is out
        return out


def _check(problem: Problem, out: torch.Tensor, scale: float = SCALE) -> float:
    torch.cuda.synchronize()
    assert not out.isnan().any(), "NaN in the output: an unwritten row or a latent read past a sequence's end"
    err = rel_l2(out, problem.reference(scale))
    assert err < TOL, f"rel L2 {err:.2e}"
    return err


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("heads", [16, 128])
def test_matches_reference(heads, batch, block_size):
    """V2-Lite (h = 16) and V3 / V2 (h = 128) heads, the tuned split choice (B = 1: many splits; h = 128 at
    B = 64: one)."""
    gen = torch.Generator(device="cuda").manual_seed(1000 * heads + 10 * batch + block_size)
    problem = Problem(_lengths(batch, block_size, gen), heads, block_size, gen)
    err = _check(problem, problem.run())
    splits = mk.choose_splits(batch, heads, problem.tables.shape[1], block_size, torch.cuda.get_device_properties(
        0).multi_processor_count, mk.heads_per_cta(heads))[0]
    print(f"\nh={heads} B={batch} bs={block_size} S={splits}: rel L2 {err:.2e}")


@pytest.mark.parametrize("num_splits", [1, 2, 1000])
@pytest.mark.parametrize("block_size", [1, 8, 16, 256])
def test_block_sizes_and_forced_splits(block_size, num_splits):
    """Power-of-two block sizes the engine allows (bs < 32: several blocks per 32-row tile; bs > 32: several
    tiles per block), with the single-CTA path (S = 1), two splits and one split per tile."""
    gen = torch.Generator(device="cuda").manual_seed(7 * block_size + num_splits)
    problem = Problem([1, 300, 2 * block_size + 5, 1100], 16, block_size, gen)
    _check(problem, problem.run(num_splits=num_splits))


@pytest.mark.parametrize("heads,group", [(128, 16), (128, 32), (48, 16), (64, 32), (32, 32)])
def test_head_groups_and_tensor_parallel_slices(heads, group):
    """Both CTA shapes (HG = 16: 4 warps; HG = 32: 8 warps, two m-tiles) and head counts of tensor-parallel
    slices of V3's 128."""
    gen = torch.Generator(device="cuda").manual_seed(heads + group)
    problem = Problem([33, 1, 2500, 64], heads, 16, gen)
    for num_splits in (None, 1):
        _check(problem, problem.run(group=group, num_splits=num_splits))


@pytest.mark.parametrize("heads", [16, 128])
def test_32k_context(heads):
    """The longest context DeepSeek serves here: 1024 tiles, next to a one-row sequence."""
    gen = torch.Generator(device="cuda").manual_seed(32 + heads)
    problem = Problem([32768, 1, 32000 + 17], heads, 64, gen)
    _check(problem, problem.run())
    _check(problem, problem.run(num_splits=1))


def test_empty_context_gives_zeros():
    """ctx_lens[b] == 0 (a padded row of a captured batch): zeros in both the split and the single-CTA path."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    problem = Problem([0, 50], 16, 16, gen)
    for splits in (1, 4):
        out = problem.run(num_splits=splits)
        _check(problem, out)
        assert (out[0] == 0).all()


@pytest.mark.parametrize("num_splits", [None, 1])
def test_cuda_graph_replay_reads_new_inputs(num_splits):
    """Capture with one batch, then write new q_abs, tables, lengths (crossing split and block boundaries) and
    latent rows into the same buffers, poison out and replay: the graph must use the replay's device values."""
    gen = torch.Generator(device="cuda").manual_seed(21)
    first = [1, 40, 2000, 17]
    problem = Problem(first, 16, 16, gen, extra_columns=200, spare_blocks=300)
    out = torch.full((4, 16, L), float("nan"), dtype=BF16, device="cuda")

    def step():
        mk.mla_decode_attention(problem.q, problem.cache, problem.tables, problem.ctx_lens, SCALE, out=out,
                                num_splits=num_splits)

    replay = graph_replay(step)  # warmed up (compiled) on a side stream, then captured
    out.fill_(float("nan"))
    replay()
    _check(problem, out)

    second = [3000, 1, 15, 33]  # within the table width the graph was captured with
    problem.tables.copy_(_shuffled_tables(second, 16, problem.tables.shape[1], problem.cache.shape[0], gen))
    problem.ctx_lens.copy_(torch.tensor(second, dtype=torch.int32))
    problem.lengths = second
    problem.refill()
    out.fill_(float("nan"))
    replay()
    _check(problem, out)


@pytest.mark.parametrize("heads", [16, 128])
def test_cute_ops_mla_attention_matches_reference_backend(heads):
    """CuteOps.mla_attention (W_UK into the query, the kernel, W_UV out: DeepSeek's Dn = Dv = 128) against the
    reference backend's paged_mla_attention in fp32, on decode metadata built like the engine's; a prefill step
    stays on the reference (the same result, the reason logged)."""
    from light_moe.ops.backend import ReferenceOps
    from light_moe.ops.cute_backend import CuteOps

    gen = torch.Generator(device="cuda").manual_seed(heads)
    nope, v_dim, bs = 128, 128, 16
    lengths = [1, 15, 16, 1000, 4097, 77]
    problem = Problem(lengths, heads, bs, gen)
    problem.cache.nan_to_num_(0.0)  # the SDPA reference multiplies masked NaN rows by 0
    q = torch.randn(len(lengths), heads, nope + R, generator=gen, device="cuda").to(BF16)
    kv_b = (torch.randn(heads * (nope + v_dim), L, generator=gen, device="cuda") * L ** -0.5).to(BF16)
    meta = AttentionMetadata.for_lengths(lengths, [1] * len(lengths), problem.tables)
    ops = CuteOps()
    out = ops.mla_attention(q, problem.cache, kv_b, meta, SCALE)
    assert not any(op.startswith("MLA") for op, _ in ops._logged), ops._logged
    expected = ReferenceOps().mla_attention(q.float(), problem.cache.float(), kv_b.float(), meta, SCALE)
    torch.cuda.synchronize()
    assert out.shape == (len(lengths), heads, v_dim) and not out.isnan().any()
    assert rel_l2(out, expected) < TOL

    # prefill (two query rows for one sequence): the reference path, logged once with its reason
    prefill = AttentionMetadata.for_lengths(lengths, [1, 2, 1, 1, 1, 1], problem.tables)
    q2 = torch.cat([q[:1], torch.randn(1, heads, nope + R, generator=gen, device="cuda").to(BF16), q[1:]])
    got = ops.mla_attention(q2, problem.cache, kv_b, prefill, SCALE)
    assert torch.equal(got, ReferenceOps().mla_attention(q2, problem.cache, kv_b, prefill, SCALE))
    assert [reason for op, reason in ops._logged if op == "MLA prefill attention"] != []
