"""Speculative decoding (llama/speculative.py, `Scheduler._speculate`): what the model says does not change.

Greedy: token for token what plain decoding and transformers' own greedy choices give (float32 on a CPU: exactly),
with a draft that is always right (the same weights loaded twice), one that is useless (other random weights) and
prompt lookup. Sampling: a chi-square test that the emitted tokens have the target's distribution, exact from
transformers' forward over every continuation of a tiny vocabulary."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch
from conftest import official_config, shrink, write_hf_checkpoint

import llama
import llama.scheduler
from llama.generate import RowParams, SamplingParams
from llama.scheduler import Request, Scheduler
from llama.speculative import DraftModel, PromptLookup, accept

VOCAB = 320
EOS = 2  # shrink()'s eos_token_id


def prompt(seed: int, length: int, vocab: int = VOCAB) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while these tests run: on 2 cores shared with other processes, two OpenMP threads
    wait for each other at every op (a 17-token forward of a random test model: 150 ms instead of 2 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def transformers_greedy(hf, ids: tuple[int, ...], n: int) -> list[int]:
    """Up to n greedy tokens by transformers, a full forward per token (no cache), cut before the first EOS
    (remembered: several tests ask for the same prompts)."""
    ids = list(ids)
    new: list[int] = []
    with torch.no_grad():
        while len(new) < n:
            token = int(hf(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == EOS:
                break
            new.append(token)
    return new


def fresh_scheduler(llm: llama.Llama, rows: int, length: int, draft: str | llama.Llama | None = None, k: int = 3,
                    seed: int = 0) -> Scheduler:
    """A scheduler over caches of its own (released first, so that a later `generate` allocates its own), with
    the draft ("prompt-lookup" or a Llama) as speculator; no end-of-sequence ids."""
    for model in (llm, draft):
        if isinstance(model, llama.Llama):
            model._release_cache()
            model.model.setup_cache(rows, length)
    speculator = None if draft is None else PromptLookup(k) if draft == "prompt-lookup" \
        else DraftModel(draft.model, draft._decode_step, k)
    return Scheduler(llm.model, llm._decode_step, None, [], seed, speculator=speculator)


def run(s: Scheduler, jobs) -> None:
    while not all(job.done for job in jobs):
        s.step()


# ---------------------------------------------------------------------------- random checkpoints (vocab 320)
@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """Llama 3.1's layout (grouped-query attention), seed 0: (folder, transformers' model, loaded Llama)."""
    folder = tmp_path_factory.mktemp("gqa")
    hf = write_hf_checkpoint(folder, shrink(official_config("llama-3.1-8b")), seed=0)
    return folder, hf, llama.Llama.from_pretrained(folder, device="cpu", progress=False)


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    """Llama 2's layout (multi-head attention), other random weights (seed 1), the same vocabulary: a useless
    draft for `gqa`, and a target of its own."""
    folder = tmp_path_factory.mktemp("mha")
    hf = write_hf_checkpoint(folder, shrink(official_config("llama-2-7b")), seed=1)
    return folder, hf, llama.Llama.from_pretrained(folder, device="cpu", progress=False)


@pytest.fixture(scope="module")
def noisy_twin(gqa):
    """`gqa`'s weights loaded again, with noise added to its output projection: a draft that is right part
    of the time, so that the rows of a batch keep different numbers of proposals."""
    twin = llama.Llama.from_pretrained(gqa[0], device="cpu", progress=False)
    weight = twin.model.lm_head.weight
    with torch.no_grad():
        weight += torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 0.3
    return twin


PROMPT_LENGTHS = (3, 9, 17)


@pytest.mark.parametrize("target, draft, k", [
    *[("gqa", draft, k) for draft in ("random draft", "noisy twin", "prompt-lookup") for k in (1, 3, 7)],
    ("mha", "random draft", 4), ("mha", "prompt-lookup", 4),
])
def test_greedy_speculation_on_random_checkpoints_gives_transformers_greedy_tokens(request, target, draft, k):
    """A batch of three prompt lengths; rows accept different numbers of proposals and go on from their own
    positions. The reference: transformers' greedy choices, and the engine without speculation."""
    _, hf, llm = request.getfixturevalue(target)
    kind = draft
    if draft == "random draft":
        draft = request.getfixturevalue("mha" if target == "gqa" else "gqa")[2]
    elif draft == "noisy twin":
        draft = request.getfixturevalue("noisy_twin")
    prompts = [prompt(seed, length) for seed, length in enumerate(PROMPT_LENGTHS)]
    plain = llm.generate(prompts, max_new_tokens=24)
    results = llm.generate(prompts, max_new_tokens=24, draft=draft, num_speculative_tokens=k)
    assert llm.stats.proposed_tokens > 0
    if kind == "random draft":  # another random model's proposals are wrong (almost) every time
        assert llm.stats.accepted_tokens < llm.stats.proposed_tokens / 10
    elif kind == "noisy twin":
        assert 0 < llm.stats.accepted_tokens < llm.stats.proposed_tokens
    for ids, result, without in zip(prompts, results, plain):
        assert result.token_ids == without.token_ids == transformers_greedy(hf, tuple(ids), 24)
        assert result.finish_reason == without.finish_reason


@pytest.mark.parametrize("draft", ["noisy twin", "prompt-lookup"])
def test_greedy_with_a_repetition_penalty_and_speculation_gives_transformers_tokens(request, gqa, draft):
    """A proposal is judged with the tokens proposed before it counted as seen (penalised), as plain decoding
    would have seen them; the reference is transformers' generate with the same penalty."""
    _, hf, llm = gqa
    draft = request.getfixturevalue("noisy_twin") if draft == "noisy twin" else draft
    prompts = [prompt(0, 3) * 3, prompt(26, 9)]
    results = llm.generate(prompts, max_new_tokens=20, repetition_penalty=1.3, draft=draft)
    assert llm.stats.proposed_tokens > 0
    for ids, result in zip(prompts, results):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.3,
                              eos_token_id=EOS, pad_token_id=EOS)[0, len(ids):].tolist()
        assert result.token_ids == (out[:out.index(EOS)] if EOS in out else out)


def test_greedy_prompt_lookup_with_compiled_layers_gives_transformers_greedy_tokens(gqa):
    """compile=True on a CPU: the verify step runs the layers compiled for a few tokens (api._compiled_for_decode)."""
    folder, hf, _ = gqa
    llm = llama.Llama.from_pretrained(folder, device="cpu", progress=False, compile=True)
    # A prompt that repeats itself, so that lookup proposes from the first step on; one row, as the layers were
    # compiled at load (a second batch size would compile them again)
    prompts = [prompt(7, 6) * 3]
    results = llm.generate(prompts, max_new_tokens=20, draft="prompt-lookup", num_speculative_tokens=4)
    assert llm.stats.proposed_tokens > 0
    for ids, result in zip(prompts, results):
        assert result.token_ids == transformers_greedy(hf, tuple(ids), 20)


@pytest.mark.parametrize("draft", ["random draft", "prompt-lookup"])
def test_seeded_sampling_with_speculation_repeats_itself(gqa, mha, draft):
    llm, draft = gqa[2], mha[2] if draft == "random draft" else draft
    prompts = [prompt(0, 3) * 3, prompt(10, 12)]
    options = dict(max_new_tokens=24, temperature=0.7, top_p=0.95, draft=draft, num_speculative_tokens=3)
    first, second = (llm.generate(prompts, seed=1234, **options) for _ in range(2))
    assert llm.stats.proposed_tokens > 0
    other = llm.generate(prompts, seed=4321, **options)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert [r.token_ids for r in other] != [r.token_ids for r in first]  # (the seed is what repeats it)


@pytest.fixture(params=["noisy twin", "prompt-lookup"])
def greedy_draft(request):
    """A draft that is right part of the time, or prompt lookup (for `fresh_scheduler`)."""
    return request.getfixturevalue("noisy_twin") if request.param == "noisy twin" else request.param


def test_requests_joining_a_speculating_batch_get_their_greedy_tokens(gqa, greedy_draft):
    """A starts alone; B and C (other prompt lengths) join at a later step, into the rows beside A (prefilled into
    the draft's cache too); each gets transformers' greedy tokens for its prompt."""
    _, hf, llm = gqa
    prompts = [prompt(0, 3) * 3, prompt(22, 11), prompt(23, 2)]  # (A's answer repeats a token: lookup proposes)
    s = fresh_scheduler(llm, rows=3, length=64, draft=greedy_draft, k=3)
    a = s.submit(Request(prompts[0], 20))
    for _ in range(3):
        s.step()
    assert 2 <= len(a.output.token_ids) < 20  # mid-answer when the others arrive
    b, c = s.submit(Request(prompts[1], 12)), s.submit(Request(prompts[2], 9))
    run(s, [a, b, c])
    assert s.proposed_tokens > 0
    for job, ids in zip((a, b, c), prompts):
        assert job.output.token_ids == transformers_greedy(hf, tuple(ids), job.request.max_new_tokens)


def test_greedy_rows_beside_sampled_rows_stay_greedy_with_speculation(gqa, greedy_draft):
    """Rows with temperature, top-k, top-p, min-p and a repetition penalty share the verify step (and its random
    draws) with a greedy row."""
    _, hf, llm = gqa
    s = fresh_scheduler(llm, rows=4, length=64, draft=greedy_draft, k=3)
    greedy = s.submit(Request(prompt(0, 3) * 3, 16))
    sampled = [s.submit(Request(prompt(24 + i, 5), 16, params)) for i, params in enumerate([
        SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.7, top_k=5, min_p=0.05),
        SamplingParams(temperature=1.3, repetition_penalty=1.3)])]
    run(s, [greedy, *sampled])
    assert s.proposed_tokens > 0
    assert greedy.output.token_ids == transformers_greedy(hf, tuple(greedy.request.prompt), 16)
    assert any(job.output.token_ids != transformers_greedy(hf, tuple(job.request.prompt), 16) for job in sampled)


def test_rows_at_the_end_of_the_cache_keep_their_greedy_tokens(gqa, greedy_draft):
    """A cache exactly as long as prompt + max_new_tokens: the padding of rows with fewer proposals than k = 7 is
    written into the last slot, which no real token reaches before its answer ends."""
    _, hf, llm = gqa
    prompts = [prompt(0, 3) * 3, prompt(25, 4)]
    s = fresh_scheduler(llm, rows=2, length=len(prompts[0]) + 15, draft=greedy_draft, k=7)
    jobs = [s.submit(Request(prompts[0], 15)), s.submit(Request(prompts[1], 11))]
    run(s, jobs)
    assert s.proposed_tokens > 0
    for job, ids in zip(jobs, prompts):
        assert job.output.token_ids == transformers_greedy(hf, tuple(ids), job.request.max_new_tokens)


@pytest.mark.parametrize("draft", ["random draft", "prompt-lookup"])
def test_a_seeded_request_draws_the_same_tokens_whatever_speculates_beside_it(gqa, mha, draft):
    """As without speculation (test_scheduler.py): a seeded request alone, and beside a longer greedy request."""
    llm, draft = gqa[2], mha[2] if draft == "random draft" else draft
    seeded = Request(prompt(0, 3) * 3, 6, SamplingParams(temperature=1.0), seed=42)
    outputs = []
    for neighbours in (0, 1):
        s = fresh_scheduler(llm, rows=2, length=64, draft=draft, k=3)
        job = s.submit(seeded)
        others = [s.submit(Request(prompt(0, 3) * 3, 30)) for _ in range(neighbours)]
        run(s, [job, *others])
        outputs.append(job.output.token_ids)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("draft", ["prompt-lookup", "random draft"])
def test_logprobs_with_speculation_equal_those_without(gqa, mha, draft):
    """The verify step's log-probabilities of the tokens it emits (and the top 3) are those of a plain decode
    step (to 1e-5, absolute and relative, as torch.allclose: the same float32 logits, computed for k + 1 tokens
    at once instead of one, round differently)."""
    llm, draft = gqa[2], mha[2] if draft == "random draft" else draft
    ids = prompt(0, 3) * 3  # (its answer repeats a token: lookup has proposals, and some are right)
    outputs = []
    for speculator in (None, draft):
        s = fresh_scheduler(llm, rows=2, length=64, draft=speculator, k=3)
        job = s.submit(Request(ids, 16, logprobs=3))
        other = s.submit(Request(prompt(12, 7), 16))  # (a row without logprobs beside it)
        run(s, [job, other])
        outputs.append(job.output)
    assert s.proposed_tokens > 0
    plain, speculative = outputs
    assert speculative.token_ids == plain.token_ids and len(plain.logprobs) == 16
    for ours, theirs in zip(speculative.logprobs, plain.logprobs):
        assert ours.token == theirs.token
        assert ours.logprob == pytest.approx(theirs.logprob, rel=1e-5, abs=1e-5)
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert [v for _, v in ours.top] == pytest.approx([v for _, v in theirs.top], rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("arguments, words", [
    (dict(draft="foo"), ["draft", "'foo'"]),
    (dict(draft=42), ["draft", "int"]),
    (dict(draft="prompt-lookup", num_speculative_tokens=0), ["num_speculative_tokens", "[1, 16]"]),
    (dict(draft="prompt-lookup", num_speculative_tokens=17), ["num_speculative_tokens", "[1, 16]"]),
    (dict(draft="prompt-lookup", num_speculative_tokens="3"), ["num_speculative_tokens", "whole number"]),
    ("itself", ["draft", "cache of its own"]),
    ("small vocabulary", ["draft", "vocabulary", "8", "320"]),
])
def test_bad_speculation_arguments_are_one_line_value_errors_naming_them(gqa, tiny, arguments, words):
    llm = gqa[2]
    if arguments == "itself":
        arguments = dict(draft=llm)
    elif arguments == "small vocabulary":
        arguments = dict(draft=tiny[0][2])
    with pytest.raises(ValueError) as error:
        llm.generate([prompt(13, 4)], max_new_tokens=4, **arguments)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# ---------------------------------------------------------------------------- prompt lookup
class _Owner:  # (a job stands for the sequence; PromptLookup holds it weakly)
    pass


def latest_continuation(tokens: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Brute force: the k tokens after the latest earlier occurrence of the last n tokens, n = max_ngram first."""
    for n in range(max_ngram, min_ngram - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + k]
    return []


@pytest.mark.parametrize("max_ngram, min_ngram", [(3, 1), (4, 2)])
def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence(max_ngram, min_ngram):
    """Random sequences over 4 symbols (matches everywhere), grown by 1 to 5 tokens at a time as a verify step
    grows them, the index brought up to date at each call."""
    rng = random.Random(0)
    lookup = PromptLookup(max_ngram=max_ngram, min_ngram=min_ngram)
    checked = nonempty = 0
    for _ in range(40):
        owner, prompt_ids, generated = _Owner(), [rng.randrange(4) for _ in range(rng.randint(1, 12))], []
        while len(generated) < 40:
            k = rng.randint(0, 6)
            proposal = lookup.propose(owner, prompt_ids, generated, k)
            assert proposal == latest_continuation(prompt_ids + generated, k, max_ngram, min_ngram)
            checked, nonempty = checked + 1, nonempty + bool(proposal)
            generated += [rng.randrange(4) for _ in range(rng.randint(1, 5))]
    assert nonempty > checked // 2  # (the comparison is mostly about real proposals, not empty ones)


# ---------------------------------------------------------------------------- sampling: chi-square tests
def rules_applied(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float = 1.0,
                  min_p: float = 0.0, repetition_penalty: float = 1.0,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution plain sampling draws from, written out in transformers' order: the logits of the tokens
    `seen` divided by the penalty (multiplied where negative), softmax(logits / T), restricted to the k most likely
    tokens, then to the fewest most likely whose probability reaches top_p, then to those at least min_p times as
    likely as the most likely one, renormalised after each."""
    logits = logits.double()
    if repetition_penalty != 1:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    probs = (logits / temperature).softmax(-1)
    if top_k is not None:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # the mass of the more likely tokens
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.amax(-1, keepdim=True), probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def chi_square_p_value(samples: torch.Tensor, expected: torch.Tensor) -> float:
    """samples [N] cell indices, expected [cells] probabilities -> the p-value of Pearson's chi-square statistic,
    cells with an expected count under 5 pooled (least likely first) so that the chi-square law holds. A sample
    in a cell of probability 0 is p = 0."""
    observed = torch.bincount(samples, minlength=len(expected)).double()
    if observed[expected == 0].sum() > 0:
        return 0.0
    expected = expected.double() * len(samples)
    order = expected.argsort()
    bins_observed, bins_expected, pooled_observed, pooled_expected = [], [], 0.0, 0.0
    for cell in order.tolist():
        pooled_observed += observed[cell].item()
        pooled_expected += expected[cell].item()
        if pooled_expected >= 5:
            bins_observed.append(pooled_observed)
            bins_expected.append(pooled_expected)
            pooled_observed = pooled_expected = 0.0
    bins_observed[-1] += pooled_observed  # (the rest, under 5, joins the largest bin)
    bins_expected[-1] += pooled_expected
    o, e = torch.tensor(bins_observed), torch.tensor(bins_expected)
    statistic = ((o - e) ** 2 / e).sum()
    degrees = torch.tensor(len(e) - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(degrees / 2, statistic / 2).item()


TINY_VOCAB = 8
SAMPLES = 6000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A target and a draft (other weights, other layout) over a vocabulary of 8, small enough to enumerate every
    continuation: ((folder, transformers' model, Llama) for each)."""
    models = []
    for name, seed in (("llama-3.1-8b", 0), ("llama-2-7b", 1)):
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        hf = write_hf_checkpoint(folder, shrink(official_config(name), vocab_size=TINY_VOCAB), seed=seed)
        models.append((folder, hf, llama.Llama.from_pretrained(folder, device="cpu", progress=False)))
    return models


TINY_PROMPT = [1, 5, 3, 7, 4, 0, 6, 5, 3]  # (every token but 2: prompt lookup finds a match for almost any token)
SAMPLED_TOKENS = 4  # the joint law of 4 tokens is checked, in two views of 3 (V^3 = 512 cells each)


def exact_joint(hf, params: dict) -> torch.Tensor:
    """P(t1, t2, t3, t4) [V, V, V, V] after TINY_PROMPT: the product of the rules' distributions at each step,
    from transformers' forward over all V^3 continuations (one batch)."""
    V = TINY_VOCAB
    continuations = torch.tensor(list(itertools.product(range(V), repeat=SAMPLED_TOKENS - 1)))  # [V^3, 3]
    tokens = torch.cat([torch.tensor(TINY_PROMPT).expand(len(continuations), -1), continuations], dim=1)
    with torch.no_grad():
        logits = hf(tokens).logits[:, len(TINY_PROMPT) - 1:].float()  # [V^3, 4, V]
    # the tokens seen before each step: the prompt's, and those sampled before it
    seen = torch.zeros(len(continuations), SAMPLED_TOKENS, V, dtype=torch.bool)
    seen[:, :, TINY_PROMPT] = True
    for step in range(1, SAMPLED_TOKENS):
        for earlier in range(step):
            seen[torch.arange(len(continuations)), step, continuations[:, earlier]] = True
    p = rules_applied(logits, seen=seen, **params).view(V, V, V, SAMPLED_TOKENS, V)  # [t1, t2, t3, step, next]
    return p[0, 0, 0, 0][:, None, None, None] * p[:, 0, 0, 1][:, :, None, None] \
        * p[:, :, 0, 2][:, :, :, None] * p[:, :, :, 3]


def speculative_samples(tiny, draft: str, params: dict, seed: int) -> torch.Tensor:
    """The first 4 tokens of SAMPLES rows of one batch, sampled with k = 3 proposals from the draft model or
    prompt lookup (the first token comes from the prefill, the next from verify steps) -> [SAMPLES, 4]."""
    (_, _, target), (_, _, draft_model) = tiny
    s = fresh_scheduler(target, rows=SAMPLES, length=32, draft=draft_model if draft == "draft model" else draft,
                        k=3, seed=seed)
    jobs = [s.submit(Request(TINY_PROMPT, SAMPLED_TOKENS + 1, SamplingParams(**params), ignore_eos=True))
            for _ in range(SAMPLES)]
    run(s, jobs)
    assert s.proposed_tokens >= 2 * SAMPLES
    return torch.tensor([job.output.token_ids[:SAMPLED_TOKENS] for job in jobs])


def joint_p_values(samples: torch.Tensor, joint: torch.Tensor) -> list[float]:
    """The chi-square p-values of (t1, t2, t3) and of (t2, t3, t4)."""
    V = TINY_VOCAB
    first = samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2]
    last = samples[:, 1] * V * V + samples[:, 2] * V + samples[:, 3]
    return [chi_square_p_value(first, joint.sum(3).flatten()), chi_square_p_value(last, joint.sum(0).flatten())]


SAMPLING = {"temperature": dict(temperature=1.0), "top-k-top-p": dict(temperature=0.8, top_k=5, top_p=0.9),
            "penalty-min-p": dict(temperature=1.2, repetition_penalty=1.5, min_p=0.05)}


@pytest.mark.parametrize("params", SAMPLING.values(), ids=SAMPLING.keys())
@pytest.mark.parametrize("draft", ["draft model", "prompt-lookup"])
def test_speculative_sampling_draws_the_target_distribution(tiny, draft, params):
    """Chi-square over 6,000 rows against the exact law of four tokens. The rules (repetition penalty,
    temperature, top-k, top-p, min-p) apply to the draft's distribution and the target's alike; a penalised token
    has also been seen when it was proposed earlier in the same step. A p-value under 1e-3 would be a real
    difference (the draws are seeded: the test is deterministic)."""
    samples = speculative_samples(tiny, draft, params, seed=0)
    for p_value in joint_p_values(samples, exact_joint(tiny[0][1], params)):
        assert p_value > 1e-3


@pytest.mark.parametrize("draft", ["draft model", "prompt-lookup"])
def test_the_chi_square_test_rejects_a_rule_that_accepts_every_proposal(tiny, monkeypatch, draft):
    """The same test has the power to see a wrong rule: with the uniform draws at 0 every proposal is kept, and the
    tokens follow the draft's law (or the prompt's), not the target's."""
    monkeypatch.setattr(llama.scheduler, "_uniform", lambda shape, device, generator: torch.zeros(shape))
    params = SAMPLING["temperature"]
    samples = speculative_samples(tiny, draft, params, seed=0)
    assert max(joint_p_values(samples, exact_joint(tiny[0][1], params))) < 1e-6


ROWS = 20000


@pytest.mark.parametrize("proposer", ["draft", "certain"])
@pytest.mark.parametrize("params", [SAMPLING["temperature"], SAMPLING["top-k-top-p"]], ids=["temperature",
                                                                                          "top-k-top-p"])
def test_accept_emits_tokens_with_the_target_distribution(proposer, params):
    """`speculative.accept` alone: fixed logits [k+1 = 3, V] repeated over 20,000 rows. With a draft, each row's
    proposals are drawn from fixed distributions q (covering tokens the rules exclude, which must then be
    rejected); certain proposals (prompt lookup: q = None) are fixed tokens, likely and unlikely ones. Either way
    the first token follows p_0, and the second, in the rows that kept the first proposal, p_1."""
    V, k = 12, 2
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(k + 1, V, generator=generator) * 1.5
    if proposer == "draft":
        q = (torch.randn(k, V, generator=generator) * 1.5).softmax(-1)  # [k, V]
        proposals = torch.stack([torch.multinomial(q[j], ROWS, replacement=True, generator=generator)
                                 for j in range(k)], dim=1)  # [ROWS, k]
        q = q.expand(ROWS, k, V).contiguous()
    else:
        q = None
        # the three most likely tokens and the least likely one (which the rules may exclude), in turn
        ranked = logits[:k].argsort(dim=-1, descending=True)  # [k, V]
        proposals = ranked[:, [0, 1, 2, -1]][:, torch.arange(ROWS) % 4].t()  # [ROWS, k]
    uniform = 1 - torch.rand(ROWS, k, generator=generator)
    race = torch.empty(ROWS, V).exponential_(1, generator=generator)
    tokens, emitted = accept(logits.expand(ROWS, k + 1, V).contiguous(), proposals, torch.full((ROWS,), k), q,
                             RowParams.of([SamplingParams(**params)], torch.device("cpu")).repeat_interleave(ROWS),
                             None, uniform, race)
    p = rules_applied(logits, **params)  # [k+1, V]
    assert 0.1 < (emitted > 1).double().mean() < 0.9  # (both branches, kept and resampled, are exercised)
    assert chi_square_p_value(tokens[:, 0], p[0]) > 1e-3
    kept = tokens[:, 0] == proposals[:, 0]
    assert torch.equal(kept, emitted > 1)
    assert chi_square_p_value(tokens[kept, 1], p[1]) > 1e-3


# ---------------------------------------------------------------------------- the real SmolLM2 weights
@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)


@pytest.fixture(scope="module")
def smollm2_twin(smollm2_dir):
    """The same weights loaded a second time: a draft whose every proposal is the model's own greedy choice."""
    return llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2):
    chat = smollm2.tokenizer.encode_chat
    prompts = [
        chat([{"role": "user", "content": "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, "
                                          "grape, honeydew, kiwi, lemon, mango."}]),
        chat([{"role": "user", "content": "What is the capital of France?"}]),
        smollm2.tokenizer.encode("Once upon a time", bos=smollm2.tokenizer.adds_bos),
    ]
    assert len({len(p) for p in prompts}) == 3
    return prompts


@pytest.fixture(scope="module")
def smollm2_plain(smollm2, smollm2_prompts):
    return smollm2.generate(smollm2_prompts, max_new_tokens=24)


def test_greedy_prompt_lookup_on_real_weights_gives_the_plain_tokens(smollm2, smollm2_prompts, smollm2_plain):
    results = smollm2.generate(smollm2_prompts, max_new_tokens=24, draft="prompt-lookup")
    assert smollm2.stats.accepted_tokens > 0  # (the list to repeat is in the prompt)
    assert [r.token_ids for r in results] == [r.token_ids for r in smollm2_plain]
    assert [r.text for r in results] == [r.text for r in smollm2_plain]


def test_greedy_draft_of_the_same_weights_gives_the_plain_tokens_and_is_always_accepted(
        smollm2, smollm2_twin, smollm2_prompts, smollm2_plain):
    results = smollm2.generate(smollm2_prompts, max_new_tokens=24, draft=smollm2_twin)
    assert smollm2.stats.accepted_tokens == smollm2.stats.proposed_tokens > 0
    assert [r.token_ids for r in results] == [r.token_ids for r in smollm2_plain]


@pytest.mark.parametrize("case", ["stop string", "stop token", "max_new_tokens 1", "max_new_tokens 2",
                                  "max_new_tokens 3"])
def test_stops_inside_an_accepted_run_end_the_answer_where_plain_decoding_does(
        smollm2, smollm2_twin, smollm2_prompts, smollm2_plain, case):
    """With a draft that is always right, each verify step emits k + 1 = 5 tokens; a stop string, a stop token (or
    the end of sequence: "Paris." is 7 tokens) falling inside such a run cuts it where plain generation stops (text,
    tokens, reason), and max_new_tokens under k + 1 is never exceeded."""
    story = smollm2_plain[2]  # "Once upon a time" goes on for all 24 tokens
    prompts = smollm2_prompts[1:]
    options: dict = dict(max_new_tokens=12)
    if case == "stop string":
        options["stop"] = story.text[len(smollm2.tokenizer.decode(story.token_ids[:6])):][:5]
    elif case == "stop token":
        options["stop_token_ids"] = [story.token_ids[7]]
    else:
        options["max_new_tokens"] = int(case.split()[-1])
    expected = smollm2.generate(prompts, **options)
    results = smollm2.generate(prompts, draft=smollm2_twin, num_speculative_tokens=4, **options)
    for result, want in zip(results, expected):
        assert (result.text, result.token_ids, result.finish_reason) == (want.text, want.token_ids,
                                                                         want.finish_reason)
        assert len(result.token_ids) <= options["max_new_tokens"]
    if case.startswith("stop"):
        assert expected[1].finish_reason == "stop" and 5 <= len(expected[1].token_ids) <= 8
        assert smollm2.stats.accepted_tokens == smollm2.stats.proposed_tokens > 0


@pytest.mark.parametrize("kernels", [True, False], ids=["c++ op", "python custom op"])
def test_the_verify_steps_products_are_f_linear(kernels, monkeypatch):
    """pack_for_verify gives every Linear oneDNN's product over a prepacked weight for 2 to 17 rows, called from
    C++ (cpu_kernels) or, where those cannot be built, from a Python custom op: both equal F.linear."""
    from llama import cpu_kernels
    from llama.config import ModelConfig
    from llama.model import Linear, Transformer
    from llama.speculative import pack_for_verify

    if not kernels:
        monkeypatch.setattr(cpu_kernels, "ops", lambda: None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf_config(shrink(official_config("llama-3.1-8b")))).eval()
    pack_for_verify(model)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.few_rows is not None for m in linears)
    for module in linears:
        x = torch.randn(2, 5, module.in_features)
        expected = x.double() @ module.weight.double().T
        torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-5)
