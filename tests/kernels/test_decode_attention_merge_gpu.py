"""GPU tests of decode attention's in-kernel split merge (kernels/decode_attention.py, merge_counters): the last split
CTA of each (sequence, KV head) merges the splits instead of a combine kernel.

The merge is the combine kernel's code on the same partials, so its output must equal the two-kernel path's bit for
bit (and the fp32 reference within the bf16 tolerance); the counters must be zero again after every launch, also
across many back-to-back launches sharing them (the layers of a decode step) and CUDA graph replays. Inputs as in
test_decode_attention_gpu.py: fresh random values, NaN in every cache slot no sequence owns, NaN-poisoned outputs.
"""
import math

import pytest
import torch

pytest.importorskip("cutlass")

from light_moe.bench.timing import graph_replay  # noqa: E402
from light_moe.kernels import decode_attention as da  # noqa: E402
from tests.kernels.test_decode_attention_gpu import (  # noqa: E402
    CONFIGS,
    Problem,
    _check,
    _check_variant,
    _lengths,
    _poison_before_window,
    _shuffled_tables,
)

pytestmark = pytest.mark.gpu


def _counters(problem: Problem, spare: int = 7) -> torch.Tensor:
    return torch.zeros(problem.q.shape[0] * problem.k_cache.shape[2] + spare, dtype=torch.int32, device="cuda")


def _both(problem: Problem, scale: float, counters: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged in the kernel, merged by the combine kernel), each into a NaN-poisoned output."""
    outs = []
    for merge in (counters, None):
        out = torch.full_like(problem.q, float("nan"))
        da.decode_attention(problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens, scale,
                            out=out, merge_counters=merge, **kwargs)
        outs.append(out)
    torch.cuda.synchronize()
    return outs[0], outs[1]


@pytest.mark.parametrize("num_splits", [None, 2, 1000])
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_combine_kernel_and_reference(name, batch, num_splits):
    h, g, d, bs, dtype, index = CONFIGS[name]
    gen = torch.Generator(device="cuda").manual_seed(batch * 31 + (num_splits or 0))
    problem = Problem(batch, h, g, d, bs, dtype, _lengths(batch, bs, gen), gen, index)
    counters = _counters(problem)
    merged, combined = _both(problem, 1.0 / math.sqrt(d), counters, num_splits=num_splits)
    _check(problem, merged, 1.0 / math.sqrt(d), dtype)
    assert torch.equal(merged, combined), "the in-kernel merge differs from the combine kernel's"
    assert not counters.any(), "a counter was left non-zero"


def test_empty_context_gives_zeros():
    """ctx_lens[b] == 0: no split has keys, so nobody merges; split 0 writes the zeros."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    problem = Problem(3, 32, 8, 128, 16, torch.bfloat16, [0, 50, 0], gen)
    counters = _counters(problem)
    merged, combined = _both(problem, 0.1, counters, num_splits=4)
    _check(problem, merged, 0.1, torch.bfloat16)
    assert (merged[0] == 0).all() and (merged[2] == 0).all() and torch.equal(merged, combined)
    assert not counters.any()


@pytest.mark.parametrize("num_splits", [None, 3, 1000])
def test_sinks_and_window(num_splits):
    """gpt-oss's heads: the sink joins the final merge once (in the merging CTA), the window moves the splits."""
    gen = torch.Generator(device="cuda").manual_seed(num_splits or 5)
    lengths = [1, 100, 128, 129, 4500, 1000]
    problem = Problem(len(lengths), 64, 8, 64, 16, torch.bfloat16, lengths, gen)
    _poison_before_window(problem, 128)
    sinks = (torch.randn(64, generator=gen, device="cuda") * 2 + 1)
    sinks[::7] += 6
    counters = _counters(problem)
    merged, combined = _both(problem, 0.125, counters, num_splits=num_splits, sinks=sinks, sliding_window=128)
    _check_variant(problem, merged, 0.125, sinks, 128)
    assert torch.equal(merged, combined)
    assert not counters.any()


def test_back_to_back_launches_and_graph_replays_share_counters():
    """Eight launches per step share one counter buffer (a decode step's layers), captured in a CUDA graph and
    replayed with new inputs; 1 sequence of 4500 keys with the most splits races the most CTAs for each counter.
    Every output equals the combine kernel's, and the counters stay zero."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    bs = 16
    problems = [Problem(2, 32, 8, 128, bs, torch.bfloat16, [4500, 2100], gen, extra_columns=40, spare_blocks=60)
                for _ in range(8)]
    counters = _counters(problems[0], spare=0)
    outs = [torch.empty_like(p.q) for p in problems]

    def step():
        for p, out in zip(problems, outs):
            da.decode_attention(p.q, p.k_cache, p.v_cache, p.tables, p.ctx_lens, 0.09, out=out, num_splits=1000,
                                merge_counters=counters)

    replay = graph_replay(step)
    for round_ in range(3):
        for p in problems:
            if round_:
                lengths = [int(x) for x in torch.randint(1, 2700, (2,), generator=gen, device="cuda")]
                p.tables.copy_(_shuffled_tables(lengths, bs, p.tables.shape[1], p.k_cache.shape[0], p.tables.dtype,
                                                gen))
                p.ctx_lens.copy_(torch.tensor(lengths, dtype=p.ctx_lens.dtype))
                p.lengths = lengths
                p.refill()
        for out in outs:
            out.fill_(float("nan"))
        for _ in range(5):  # the same inputs five times: any lost or doubled count shows as a wrong merge
            replay()
        torch.cuda.synchronize()
        assert not counters.any(), f"round {round_}: counters left non-zero"
        for p, out in zip(problems, outs):
            _check(p, out, 0.09, torch.bfloat16)
            ref = torch.full_like(out, float("nan"))
            da.decode_attention(p.q, p.k_cache, p.v_cache, p.tables, p.ctx_lens, 0.09, out=ref, num_splits=1000)
            assert torch.equal(out, ref)


def test_counter_buffer_checked():
    gen = torch.Generator(device="cuda").manual_seed(1)
    problem = Problem(4, 32, 8, 128, 16, torch.bfloat16, [10, 20, 30, 40], gen)
    args = (problem.q, problem.k_cache, problem.v_cache, problem.tables, problem.ctx_lens, 0.1)
    for bad in (torch.zeros(31, dtype=torch.int32, device="cuda"),  # B * g = 32
                torch.zeros(32, dtype=torch.int64, device="cuda"),
                torch.zeros(32, dtype=torch.int32)):
        with pytest.raises(ValueError, match="merge_counters"):
            da.decode_attention(*args, merge_counters=bad)
