"""Sampling rules against transformers' logits processors, and the sampler against the softmax it draws from."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llama.generate import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    argmax,
    exponential_race,
    pick,
    sample,
)

LOGITS = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3


def kept(logits):
    return torch.isfinite(logits)


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_keeps_what_transformers_keeps(k):
    theirs = TopKLogitsWarper(top_k=k)(None, LOGITS.clone())
    assert torch.equal(kept(apply_top_k(LOGITS, k)), kept(theirs))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_keeps_what_transformers_keeps(p):
    theirs = TopPLogitsWarper(top_p=p)(None, LOGITS.clone())
    assert torch.equal(kept(apply_top_p(LOGITS, p)), kept(theirs))


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_keeps_what_transformers_keeps(min_p):
    theirs = MinPLogitsWarper(min_p=min_p)(None, LOGITS.clone()) if min_p > 0 else LOGITS
    assert torch.equal(kept(apply_min_p(LOGITS, min_p)), kept(theirs))


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_equals_transformers(penalty):
    history = torch.tensor([[1, 2, 2, 7], [0, 3, 49, 49], [5, 5, 5, 5], [10, 11, 12, 13]])
    seen = torch.zeros_like(LOGITS, dtype=torch.bool).scatter_(1, history, True)
    theirs = RepetitionPenaltyLogitsProcessor(penalty=penalty)(history, LOGITS.clone())
    torch.testing.assert_close(apply_repetition_penalty(LOGITS, seen, penalty), theirs)


@pytest.mark.parametrize("options", [{"top_k": 3}, {"top_p": 0.6}, {"min_p": 0.2}, {"top_k": 10, "top_p": 0.3}])
def test_samples_never_leave_the_kept_set(options):
    params = SamplingParams(temperature=1.0, **options)
    logits = LOGITS[:1].expand(4000, -1)
    allowed = kept(apply_min_p(apply_top_p(apply_top_k(LOGITS[:1], options.get("top_k", 50)),
                                           options.get("top_p", 1.0)), options.get("min_p", 0.0)))[0]
    draws = sample(logits, params, None, torch.Generator().manual_seed(0))
    assert allowed[draws].all()
    assert len(draws.unique()) == int(allowed.sum())  # 4000 draws visit every allowed token here


# chi-square critical values at p = 0.001 (a fixed seed makes the test deterministic; a correct sampler
# passes with probability 0.999 for a random seed, a sampler off by a few percent fails by far)
CHI2_999 = {7: 24.32, 2: 13.82}


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, None), (1.0, 3)])
def test_sampled_frequencies_match_the_softmax(temperature, top_k):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    expected = torch.softmax(apply_top_k(logits[None] / temperature, top_k or 8)[0], dim=-1)
    n = 40_000
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=temperature, top_k=top_k), None,
                   torch.Generator().manual_seed(1234))
    counts = torch.bincount(draws, minlength=8).double()
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2 = (((counts - n * expected) ** 2 / (n * expected))[support]).sum().item()
    assert chi2 < CHI2_999[int(support.sum()) - 1]


def test_greedy_is_argmax():
    assert torch.equal(sample(LOGITS, SamplingParams(), None, None), LOGITS.argmax(-1))


@pytest.mark.parametrize("V", [1, 5, 127, 128, 129, 1000, 32000, 128256])
def test_two_stage_argmax_equals_torch_argmax(V):
    g = torch.Generator().manual_seed(V)
    for x in (torch.randn(3, V, generator=g), torch.randint(-2, 2, (3, V), generator=g).float()):  # ties: the first
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(argmax(x.to(dtype)), x.to(dtype).argmax(-1))


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5), (1.3, 1), (0.8, 49), (2.0, 500)])
def test_the_in_step_choice_draws_what_sample_draws(temperature, top_k):
    """`pick` (inside the compiled step) and `sample` turn the same random draws into the same tokens."""
    logits = torch.randn(4000, 50, generator=torch.Generator().manual_seed(3)) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k)
    theirs = sample(logits, params, None, torch.Generator().manual_seed(7))
    race = exponential_race(logits.shape, logits.device, torch.Generator().manual_seed(7))
    ours = pick(logits, race, torch.tensor(temperature), top_k)
    assert torch.equal(ours, theirs)
    assert kept(apply_top_k(logits, top_k or 50)).gather(1, ours[:, None]).all()
    assert (ours != logits.argmax(-1)).any() == (top_k != 1)  # random draws, not the greedy choice
    assert torch.equal(pick(logits, None, None, top_k), logits.argmax(-1))  # no race: greedy
    greedy_as_a_draw = pick(logits, torch.ones_like(logits), torch.tensor(0.0), logits.shape[1])  # (compiled GPU step)
    assert torch.equal(greedy_as_a_draw, logits.argmax(-1))
