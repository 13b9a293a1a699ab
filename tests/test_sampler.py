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


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(min_p=2), dict(top_k=-5), dict(repetition_penalty=0), dict(stop=[""])])
def test_bad_sampling_params_raise(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
