"""Sampler statistics and filters on fixed logits (CPU, seeded)."""
import math

import pytest
import torch

from light_moe.engine.sampler import SamplingRow, sample
from light_moe.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def draw(params, n=4000, logits=LOGITS, seen=()):
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(logits.shape[1])
    for _ in range(n):
        tok, _ = sample(logits.clone(), [SamplingRow(params, None, list(seen))], gen)
        counts[tok[0]] += 1
    return counts / n


def test_temperature_one_matches_the_distribution():
    freq = draw(SamplingParams(temperature=1.0))
    assert torch.allclose(freq, LOGITS.softmax(-1)[0], atol=0.03)


def test_top_k_top_p_min_p_restrict_the_support():
    assert draw(SamplingParams(temperature=1.0, top_k=2), n=1000)[2:].sum() == 0
    # top_p=0.7: 0.5 + 0.25 reaches it, so only the first two remain
    freq = draw(SamplingParams(temperature=1.0, top_p=0.7), n=1000)
    assert freq[2:].sum() == 0 and abs(freq[0] - 2 / 3) < 0.05
    # min_p=0.2: tokens below 0.2 * 0.5 = 0.1 are dropped
    assert draw(SamplingParams(temperature=1.0, min_p=0.2), n=1000)[3:].sum() == 0


def test_low_temperature_sharpens_and_greedy_is_argmax():
    assert draw(SamplingParams(temperature=0.1), n=500)[0] > 0.99
    tok, _ = sample(LOGITS.clone(), [SamplingRow(SamplingParams(temperature=0.0), None, [])])
    assert tok == [0]


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    tok, _ = sample(logits.clone(), [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.5), None, [0])])
    assert tok == [1]  # 2.0 / 1.5 < 1.9


def test_logprobs_are_of_the_raw_distribution():
    tok, lp = sample(LOGITS.clone(), [SamplingRow(SamplingParams(temperature=0.0, logprobs=True), None, [])])
    assert math.isclose(lp[0], math.log(0.5), rel_tol=1e-5)


def test_seeded_rows_do_not_depend_on_neighbours():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = torch.randn(3, 50)

    def run(rows_logits):
        gen = torch.Generator().manual_seed(7)
        return sample(rows_logits, [SamplingRow(params, gen, [])], None)[0][0]

    alone = run(logits[1:2].clone())
    gen = torch.Generator().manual_seed(7)
    batch, _ = sample(logits.clone(), [SamplingRow(SamplingParams(temperature=1.0), None, []),
                                       SamplingRow(params, gen, []),
                                       SamplingRow(SamplingParams(temperature=0.5), None, [])],
                      torch.Generator().manual_seed(123))
    assert batch[1] == alone


BAD_PARAMS = [
    dict(max_tokens=0), dict(max_tokens=2**31), dict(max_tokens=1.5), dict(max_tokens=True),
    dict(temperature=-1), dict(temperature=float("inf")), dict(temperature=float("nan")), dict(temperature=101),
    dict(temperature="1"), dict(top_p=0), dict(top_p=1.5), dict(top_p=float("nan")), dict(min_p=2),
    dict(min_p=-0.1), dict(top_k=-5), dict(top_k=2**63), dict(top_k=9223372036854775808), dict(top_k=2.0),
    dict(top_k=None), dict(repetition_penalty=0), dict(repetition_penalty=1e-30), dict(repetition_penalty=1e3),
    dict(repetition_penalty=float("inf")), dict(seed=2**64), dict(seed=-(2**63) - 1), dict(seed=1.0),
    dict(stop=[""]), dict(stop=["x"] * 17), dict(stop=["x" * 257]), dict(stop=[3]),
    dict(stop_token_ids=[-1]), dict(stop_token_ids=[2**31]), dict(stop_token_ids=list(range(257))),
    dict(logprobs="yes"),
]


@pytest.mark.parametrize("bad", BAD_PARAMS, ids=[repr(b)[:60] for b in BAD_PARAMS])
def test_bad_sampling_params_raise(bad):
    with pytest.raises(ValueError) as info:
        SamplingParams(**bad)
    assert str(info.value).startswith(next(iter(bad)))  # the message names the field first (the server's param)


def test_bounds_are_inclusive():
    SamplingParams(max_tokens=2**31 - 1, temperature=100, top_k=2**31 - 1, top_p=1e-9, min_p=1.0,
                   repetition_penalty=0.01, seed=2**64 - 1, stop=["x" * 256] * 16, stop_token_ids=[2**31 - 1] * 256)
    SamplingParams(top_k=-1, repetition_penalty=100, seed=-(2**63), temperature=0)


def test_top_k_beyond_the_vocabulary_beside_a_top_p_row():
    """A huge top_k (no filter) in the same step as a top_p row: it used to overflow int64 on the way to the
    device and stop the engine."""
    logits = torch.randn(2, 50)
    huge = SamplingParams(temperature=1.0, top_k=2**31 - 1)
    object.__setattr__(huge, "top_k", 2**63)  # past the bound, as if validation had missed it: clamped on the host
    rows = [SamplingRow(huge, None, []),
            SamplingRow(SamplingParams(temperature=1.0, top_p=0.5), None, [])]
    tokens, _ = sample(logits.clone(), rows, torch.Generator().manual_seed(0))
    assert all(0 <= t < 50 for t in tokens)
    # a top_k beyond the vocabulary changes nothing: the same draws as no top_k
    same = [SamplingRow(SamplingParams(temperature=1.0), None, []), rows[1]]
    assert sample(logits.clone(), same, torch.Generator().manual_seed(0))[0] == tokens


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-6, 1e-4])
def test_tiny_temperatures_pick_the_argmax_without_nan(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.9, -4.0], [0.5, -1.0, 0.25, 7.0]])
    rows = [SamplingRow(SamplingParams(temperature=temperature), None, []) for _ in range(2)]
    for seed in range(20):
        tokens, _ = sample(logits.clone(), rows, torch.Generator().manual_seed(seed))
        assert tokens == [1, 3]


def test_large_logits_at_a_small_temperature_stay_finite():
    logits = torch.tensor([[3.0e4, 2.0e4, -3.0e4]])
    row = SamplingRow(SamplingParams(temperature=1e-3, top_p=0.9, min_p=0.1), None, [])
    tokens, _ = sample(logits.clone(), [row], torch.Generator().manual_seed(0))
    assert tokens == [0]
