"""GPU tests of the paged prefill attention kernel against a per-sequence fp32 SDPA over the gathered keys.

Shape legend: N new tokens, B sequences, h query heads, g KV heads, D head_dim, bs block size.
Every input is fresh random data; the output is poisoned with NaN; every cache slot that no sequence owns
(unused blocks, the tail of each sequence's last block) and every unused block-table entry (pointing at a
block of NaN) is poisoned too, so a read past a sequence's keys or a row left unwritten shows up as NaN.
Block tables are random permutations (no two neighbouring slots in neighbouring blocks). Errors are
checked per sequence, so a wrong single-token query cannot hide in the norm of a long prompt. gpt-oss's sinks and
sliding window (at the end) are checked against ops.attention.paged_attention_sinks, with NaN in every slot before
the window of a sequence's first query too.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("cutlass")

from light_moe.kernels import prefill_attention as pa  # noqa: E402
from light_moe.ops.attention import AttentionMetadata, paged_attention_sinks  # noqa: E402
from tests.kernels.gpu_helpers import rel_l2  # noqa: E402

pytestmark = pytest.mark.gpu

MIXTRAL = (32, 8, 128)  # h, g, D
TOL = 1e-2  # bf16 inputs and output, fp32 softmax and accumulation


def make_problem(seqs, heads, block_size, gen, extra_table_cols=3):
    """seqs: [(q_len, ctx_len)]. Returns (q, k_cache, v_cache, block_tables, query_start, ctx_lens, max_q)
    with block 0 all NaN (every unused table entry points at it) and NaN in every slot past a ctx_len."""
    h, g, d = heads
    dev = "cuda"
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = 1 + sum(blocks_per_seq) + 5  # block 0 = poison, 5 never used
    max_blocks = max(blocks_per_seq) + extra_table_cols
    k_cache = torch.full((num_blocks, block_size, g, d), float("nan"), device=dev, dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = (torch.randperm(num_blocks - 1, generator=gen, device=dev) + 1).to(torch.int32)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32, device=dev)
    used = 0
    for b, (_, ctx) in enumerate(seqs):
        tables[b, :blocks_per_seq[b]] = perm[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        slots = torch.arange(ctx, device=dev)
        blk = tables[b, slots // block_size].long()
        k_cache[blk, slots % block_size] = torch.randn(ctx, g, d, generator=gen, device=dev).bfloat16()
        v_cache[blk, slots % block_size] = torch.randn(ctx, g, d, generator=gen, device=dev).bfloat16()
    q_lens = [q_len for q_len, _ in seqs]
    query_start = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=dev)
    ctx_lens = torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), h, d, generator=gen, device=dev).bfloat16()
    return q, k_cache, v_cache, tables, query_start, ctx_lens, max(q_lens)


def reference(q, k_cache, v_cache, tables, query_start, ctx_lens, scale):
    """fp32 causal SDPA per sequence over its gathered keys -> [N, h, D] fp32."""
    block_size, g = k_cache.shape[1], k_cache.shape[2]
    h = q.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(tables.shape[0]):
        start, end, ctx = int(query_start[b]), int(query_start[b + 1]), int(ctx_lens[b])
        q_len = end - start
        if q_len == 0:
            continue
        slots = torch.arange(ctx, device=q.device)
        blk = tables[b, slots // block_size].long()
        k = k_cache[blk, slots % block_size].float().repeat_interleave(h // g, dim=1)  # [ctx, h, D]
        v = v_cache[blk, slots % block_size].float().repeat_interleave(h // g, dim=1)
        pos = ctx - q_len + torch.arange(q_len, device=q.device)
        mask = slots[None, :] <= pos[:, None]  # [q_len, ctx]
        o = F.scaled_dot_product_attention(q[start:end].float().transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def check(seqs, heads=MIXTRAL, block_size=16, block_m=pa.DEFAULT_BLOCK_M, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k_cache, v_cache, tables, query_start, ctx_lens, max_q = make_problem(seqs, heads, block_size, gen)
    scale = 1.0 / math.sqrt(heads[2])
    out = torch.full_like(q, float("nan"))
    pa.prefill_attention(q, k_cache, v_cache, tables, query_start, ctx_lens, max_q, scale, out=out, block_m=block_m)
    ref = reference(q, k_cache, v_cache, tables, query_start, ctx_lens, scale)
    _compare_per_sequence(out, ref, seqs, query_start)
    return out


def _compare_per_sequence(out, ref, seqs, query_start) -> None:
    torch.cuda.synchronize()
    problems = []  # every sequence is checked before failing: one GPU run shows the whole pattern
    for b, (q_len, ctx) in enumerate(seqs):
        start = int(query_start[b])
        seq_out, seq_ref = out[start:start + q_len], ref[start:start + q_len]
        bad_rows = (~torch.isfinite(seq_out)).any(-1).any(-1).nonzero().flatten().tolist()
        if bad_rows:
            problems.append(f"sequence {b} (q_len={q_len}, ctx={ctx}): {len(bad_rows)} non-finite rows {bad_rows[:10]}")
            seq_out = seq_out.nan_to_num(0.0, 0.0, 0.0)
        err = rel_l2(seq_out, seq_ref)
        if err >= TOL:
            problems.append(f"sequence {b} (q_len={q_len}, ctx={ctx}): rel L2 {err:.3e}; {_where(seq_out, seq_ref)}")
    assert not problems, "\n".join(problems)


def _where(out, ref):
    """Where a sequence's error sits: per 64-row block of queries, per head, and its worst row."""
    rows = [f"{i}:{rel_l2(out[i:i + 64], ref[i:i + 64]):.2e}" for i in range(0, out.shape[0], 64)]
    heads = [f"{j}:{rel_l2(out[:, j], ref[:, j]):.2e}" for j in range(out.shape[1])]
    row_err = ((out.float() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2)).clamp_min(1e-30))
    worst = int(row_err.argmax())
    return f"rows {' '.join(rows[:40])}; heads {' '.join(heads)}; worst row {worst} ({row_err[worst]:.2e})"


# fresh prompt, chunk on a cached prefix, single-token queries, lengths off the tile and block sizes
MIXED = [(300, 300), (200, 777), (1, 513), (1, 1), (64, 64), (130, 1000), (65, 129), (17, 17)]


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
def test_mixed_batch_mixtral(block_size, block_m):
    check(MIXED, MIXTRAL, block_size, block_m, seed=block_size + block_m)


@pytest.mark.parametrize("block_size,block_m", [(32, 64), (128, 128)])
def test_mixed_batch_other_block_sizes(block_size, block_m):
    check(MIXED, MIXTRAL, block_size, block_m, seed=block_size)


@pytest.mark.parametrize("block_m", [64, 128])
def test_mha(block_m):
    check(MIXED, (16, 16, 128), 16, block_m, seed=7)


@pytest.mark.parametrize("heads,block_size,block_m", [((8, 2, 64), 16, 64), ((8, 2, 64), 16, 128),
                                                       ((8, 8, 64), 64, 64)])
def test_head_dim_64(heads, block_size, block_m):
    check(MIXED, heads, block_size, block_m, seed=11)


@pytest.mark.parametrize("prompt", [1, 2, 15, 63, 64, 65, 127, 128, 129, 500, 1023, 2048])
@pytest.mark.parametrize("block_m", [64, 128])
def test_fresh_prompt_lengths(prompt, block_m):
    check([(prompt, prompt)], MIXTRAL, 16, block_m, seed=prompt)


@pytest.mark.parametrize("block_m", [64, 128])
def test_chunk_on_long_prefix(block_m):
    """Chunked prefill: the query tile's first position is far from any key-tile boundary."""
    check([(512, 2048), (333, 1500), (1, 2048)], MIXTRAL, 16, block_m, seed=3)


def test_default_tile_choice_and_allocating_call():
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k_cache, v_cache, tables, query_start, ctx_lens, max_q = make_problem(MIXED, MIXTRAL, 16, gen)
    out = pa.prefill_attention(q, k_cache, v_cache, tables, query_start, ctx_lens, max_q, 0.1)
    ref = reference(q, k_cache, v_cache, tables, query_start, ctx_lens, 0.1)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_l2(out, ref) < TOL


def test_cuda_graph_replay_reads_device_lengths():
    """Captured once, replayed with other lengths, tables and inputs of the same shapes (max_query_len fixed):
    the kernel must take every length from device memory at replay time."""
    seqs_a = [(100, 400), (37, 37), (1, 90)]
    seqs_b = [(5, 900), (100, 100), (60, 61)]
    gen = torch.Generator(device="cuda").manual_seed(9)
    prob_a = make_problem(seqs_a, MIXTRAL, 16, gen)
    prob_b = make_problem(seqs_b, MIXTRAL, 16, gen)
    q, k_cache, v_cache, tables, query_start, ctx_lens, _ = prob_a
    max_q = 100
    scale = 1 / math.sqrt(128)
    num_q = max(q.shape[0], prob_b[0].shape[0])
    q_buf = torch.zeros(num_q, 32, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.full_like(q_buf, float("nan"))
    n_blocks = max(k_cache.shape[0], prob_b[1].shape[0])
    k_buf = torch.full((n_blocks, 16, 8, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    v_buf = torch.full_like(k_buf, float("nan"))
    t_cols = max(tables.shape[1], prob_b[3].shape[1])
    t_buf = torch.zeros(3, t_cols, dtype=torch.int32, device="cuda")
    qs_buf, ctx_buf = query_start.clone(), ctx_lens.clone()

    def load(prob):
        pq, pk, pv, pt, pqs, pctx, _ = prob
        q_buf.zero_()
        q_buf[:pq.shape[0]] = pq
        k_buf.fill_(float("nan"))
        v_buf.fill_(float("nan"))
        k_buf[:pk.shape[0]] = pk
        v_buf[:pv.shape[0]] = pv
        t_buf.zero_()
        t_buf[:, :pt.shape[1]] = pt
        qs_buf.copy_(pqs)
        ctx_buf.copy_(pctx)

    def call():
        pa.prefill_attention(q_buf, k_buf, v_buf, t_buf, qs_buf, ctx_buf, max_q, scale, out=out)

    load(prob_a)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        call()
    load(prob_b)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    n_b = prob_b[0].shape[0]
    ref = reference(q_buf[:n_b], k_buf, v_buf, t_buf, qs_buf, ctx_buf, scale)
    assert torch.isfinite(out[:n_b]).all()
    assert rel_l2(out[:n_b], ref) < TOL


# ---- gpt-oss: sinks and the sliding window (kernels/attention_variant.py) ------------------------------------------
# against ops.attention.paged_attention_sinks in fp32; every slot before the window of a sequence's first query holds
# NaN in the kernel's cache (no row of the step may see it) and 0 in the reference's

GPT_OSS = (64, 8, 64)  # h, g, D
MHA_D128 = (16, 16, 128)


def check_variant(seqs, heads=GPT_OSS, block_size=16, block_m=pa.DEFAULT_BLOCK_M, sinks_dtype=None, window=None,
                  seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k_cache, v_cache, tables, query_start, ctx_lens, max_q = make_problem(seqs, heads, block_size, gen)
    ref_k, ref_v = k_cache.nan_to_num(0.0).float(), v_cache.nan_to_num(0.0).float()
    if window is not None:
        for b, (q_len, ctx) in enumerate(seqs):
            first_key = ctx - q_len - window + 1  # the window of the sequence's first query starts here
            if first_key > 0:
                slots = torch.arange(first_key, device="cuda")
                blk = tables[b, slots // block_size].long()
                k_cache[blk, slots % block_size] = float("nan")
                v_cache[blk, slots % block_size] = float("nan")
    h = heads[0]
    sinks = None
    if sinks_dtype is not None:  # around the logits' scale, some far above: a sink can take most of a row's mass
        sinks = (torch.randn(h, generator=gen, device="cuda") * 2 + 1).to(sinks_dtype)
        sinks[::7] += 6
    scale = 1.0 / math.sqrt(heads[2])
    out = torch.full_like(q, float("nan"))
    pa.prefill_attention(q, k_cache, v_cache, tables, query_start, ctx_lens, max_q, scale, out=out, block_m=block_m,
                         sinks=sinks, sliding_window=window)
    meta = AttentionMetadata.for_lengths([ctx for _, ctx in seqs], [q_len for q_len, _ in seqs], tables)
    ref = paged_attention_sinks(q.float(), ref_k, ref_v, meta, scale, None if sinks is None else sinks.float(), window)
    _compare_per_sequence(out, ref, seqs, query_start)


@pytest.mark.parametrize("sinks_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,block_m", [(GPT_OSS, 64), (GPT_OSS, 128), (MHA_D128, 64)])
def test_sinks_only(heads, block_m, sinks_dtype):
    check_variant(MIXED, heads, 16, block_m, sinks_dtype=sinks_dtype, seed=block_m)


# one 300-token prompt against windows smaller than (including one key, and 100: not a multiple of the 64-key
# tile or the block), equal to and larger than it
@pytest.mark.parametrize("window", [1, 100, 128, 299, 300, 301, 5000])
@pytest.mark.parametrize("block_m", [64, 128])
def test_window_only_fresh_prompt(window, block_m):
    check_variant([(300, 300)], GPT_OSS, 16, block_m, window=window, seed=window)


@pytest.mark.parametrize("window", [1, 100, 128, 1000])
@pytest.mark.parametrize("heads,block_size,block_m", [(GPT_OSS, 16, 64), (GPT_OSS, 64, 128), (GPT_OSS, 128, 64),
                                                      (MHA_D128, 16, 128)])
def test_window_mixed_batch(heads, block_size, block_m, window):
    """MIXED: fresh prompts, chunks on cached prefixes (whole key tiles below the window skipped), single queries."""
    check_variant(MIXED, heads, block_size, block_m, window=window, seed=window + block_size)


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("window", [128, 700])
def test_sinks_and_window_chunked_prefill(window, block_m):
    """Both at once; chunks far into a long cached context (most of it outside every row's window)."""
    check_variant([(512, 2048), (333, 1500), (1, 2048), (64, 4000), (130, 130)], GPT_OSS, 16, block_m,
                  sinks_dtype=torch.bfloat16, window=window, seed=window + block_m)
    check_variant(MIXED, MHA_D128, 64, block_m, sinks_dtype=torch.float32, window=window, seed=window)
