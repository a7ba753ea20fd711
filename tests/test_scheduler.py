"""Continuous batching (llama/scheduler.py): requests that join, leave and share a batch each get what they would get
alone, checked against transformers' greedy choices on a random checkpoint (float32, CPU: exactly)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import official_config, shrink, write_hf_checkpoint

import llama
from llama.api import PrefillGraphs
from llama.generate import SamplingParams, decode_step
from llama.model import Joining
from llama.scheduler import QueueFull, Request, Scheduler

VOCAB = 320


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return folder, write_hf_checkpoint(folder, shrink(official_config("llama-3.1-8b")))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return llama.Llama.from_pretrained(checkpoint[0], device="cpu", progress=False)


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def transformers_greedy(hf, ids: list[int], n: int) -> list[int]:
    """n greedy tokens by transformers, a full forward per token (no cache): the reference."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def scheduler(llm, rows: int, length: int = 128, **options) -> Scheduler:
    llm.model.setup_cache(rows, length)
    return Scheduler(llm.model, llm._decode_step, None, [], **options)


def run(s: Scheduler, jobs, steps: int | None = None) -> None:
    for _ in range(steps) if steps is not None else iter(lambda: not all(j.done for j in jobs), False):
        s.step()


def test_requests_joining_a_running_batch_get_their_solo_tokens(llm, checkpoint):
    """A starts alone; B and C (other prompt lengths) join at a later step, into the free rows beside A."""
    prompts = [prompt(1, 5), prompt(2, 11), prompt(3, 2)]
    s = scheduler(llm, rows=3)
    a = s.submit(Request(prompts[0], 20))
    run(s, [a], steps=6)
    assert len(a.output.token_ids) == 6  # mid-answer when the others arrive
    b, c = s.submit(Request(prompts[1], 12)), s.submit(Request(prompts[2], 9))
    run(s, [a, b, c])
    for job, ids in zip((a, b, c), prompts):
        assert job.output.token_ids == transformers_greedy(checkpoint[1], ids, job.request.max_new_tokens)
        assert job.output.finish_reason == "length"


def per_row_kth(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th largest logit of each row, k a tensor [B] (as the GPU kernel takes it; k >= V masks nothing)."""
    k = torch.as_tensor(k).expand(logits.shape[0]).clamp(max=logits.shape[-1])
    return logits.sort(dim=-1, descending=True).values.gather(-1, k[:, None] - 1)


def test_a_step_that_chooses_its_tokens_writes_the_next_inputs_itself(llm, checkpoint, monkeypatch):
    """The compiled GPU step's way, on the CPU: the step chooses the tokens (`generate.pick`, top-k as a tensor),
    writes them into the scheduler's `RowState` and moves each row's position on by its `advance`, rows finishing
    at different steps (a finished row's position stays: the cache holds the longest request and no more, so one
    that moved on would fall off its end). Greedy rows get transformers' tokens; seeded sampled rows with top-k get
    what the scheduler's own sampler gives them over the logits."""
    prompts = [prompt(40 + i, length) for i, length in enumerate((19, 3, 7))]
    greedy = [Request(p, n) for p, n in zip(prompts, (2, 18, 5))]
    sampled = [Request(p, n, SamplingParams(temperature=0.8, top_k=20), seed=7 + i)
               for i, (p, n) in enumerate(zip(prompts, (2, 18, 5)))]

    def generate(requests: list[Request]) -> list[list[int]]:
        llm.model.setup_cache(3, 21)
        s = Scheduler(llm.model, functools.partial(decode_step, kth=per_row_kth), None, [])
        jobs = [s.submit(request) for request in requests]
        run(s, jobs)
        return [job.output.token_ids for job in jobs]

    plain = generate(sampled)
    monkeypatch.setattr(Scheduler, "_chooses_tokens", lambda self, params, wants_logprobs: True)
    for job, ids, request in zip(generate(greedy), prompts, greedy):
        assert job == transformers_greedy(checkpoint[1], ids, request.max_new_tokens)
    assert generate(sampled) == plain


def test_more_requests_than_rows_wait_and_reuse_the_rows_freed(llm, checkpoint):
    s = scheduler(llm, rows=2)
    prompts = [prompt(10 + i, 3 + 2 * i) for i in range(5)]
    jobs = [s.submit(Request(p, 4 + 3 * (i % 3))) for i, p in enumerate(prompts)]
    rows_used = set()
    while not all(job.done for job in jobs):
        s.step()
        assert len(s.running) <= 2
        rows_used |= set(s.running)
    assert rows_used == {0, 1}
    for job, ids in zip(jobs, prompts):
        assert job.output.token_ids == transformers_greedy(checkpoint[1], ids, job.request.max_new_tokens)


def test_a_cancelled_request_frees_its_row_at_the_next_step(llm):
    s = scheduler(llm, rows=1)
    a = s.submit(Request(prompt(4, 6), 50))
    run(s, [a], steps=3)
    b = s.submit(Request(prompt(5, 6), 3))
    run(s, [b], steps=2)
    assert b.slot is None  # waiting: the one row is A's
    s.cancel(a)
    s.step()
    assert a.done and b.slot == 0 and len(a.output.token_ids) < 50


def test_greedy_rows_beside_sampled_rows_stay_greedy(llm, checkpoint):
    """Rows with temperature, top-k, top-p, min-p and a repetition penalty share the step with a greedy row."""
    s = scheduler(llm, rows=4)
    greedy = s.submit(Request(prompt(6, 7), 15))
    others = [s.submit(Request(prompt(7 + i, 4), 15, params)) for i, params in enumerate([
        SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.7, top_k=5, min_p=0.05),
        SamplingParams(temperature=1.3, repetition_penalty=1.3)])]
    run(s, [greedy, *others])
    assert greedy.output.token_ids == transformers_greedy(checkpoint[1], greedy.request.prompt, 15)
    assert any(job.output.token_ids != transformers_greedy(checkpoint[1], job.request.prompt, 15) for job in others)


def test_a_seeded_request_draws_the_same_tokens_whatever_runs_beside_it(llm):
    seeded = Request(prompt(11, 5), 12, SamplingParams(temperature=1.0), seed=42)
    s = scheduler(llm, rows=3)
    alone = s.submit(seeded)
    run(s, [alone])
    s = scheduler(llm, rows=3)
    companions = [s.submit(Request(prompt(12, 8), 12, SamplingParams(temperature=0.9))),
                  s.submit(Request(prompt(13, 3), 5))]
    run(s, companions, steps=2)
    beside = s.submit(seeded)
    run(s, [beside, *companions])
    assert beside.output.token_ids == alone.output.token_ids


def test_a_stop_token_inside_the_answer_ends_it_and_max_new_tokens_caps_it(llm, checkpoint):
    ids = prompt(14, 6)
    expected = transformers_greedy(checkpoint[1], ids, 10)
    stop = expected[4]
    s = scheduler(llm, rows=2)
    stopped = s.submit(Request(ids, 10, stop_token_ids=[stop]))
    capped = s.submit(Request(ids, 7))
    run(s, [stopped, capped])
    assert stopped.output.token_ids == expected[: expected.index(stop)]
    assert stopped.output.finish_reason == "stop"
    assert capped.output.token_ids == expected[:7] and capped.output.finish_reason == "length"


def test_logprobs_are_the_log_softmax_of_a_full_forward(llm, checkpoint):
    ids = prompt(15, 5)
    s = scheduler(llm, rows=2)
    job = s.submit(Request(ids, 6, logprobs=3))
    other = s.submit(Request(prompt(16, 9), 6))  # (a row without logprobs beside it)
    run(s, [job, other])
    tokens = job.output.token_ids
    with torch.no_grad():
        logits = checkpoint[1](torch.tensor([ids + tokens])).logits[0].float()
    expected = logits.log_softmax(-1)[len(ids) - 1: -1]  # [6, V]: the distribution each new token was drawn from
    for step, entry in enumerate(job.output.logprobs):
        assert entry.token == tokens[step]
        assert entry.logprob == pytest.approx(expected[step, tokens[step]].item(), abs=1e-4)
        top = expected[step].topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert other.output.logprobs == []


def test_a_request_longer_than_the_cache_is_refused_when_submitted(llm):
    s = scheduler(llm, rows=1, length=32)
    with pytest.raises(ValueError, match="needs 40 positions, more than the 32"):
        s.submit(Request(prompt(17, 30), 10))


def test_more_waiting_requests_than_the_limit_raise_queue_full(llm):
    s = scheduler(llm, rows=1, max_waiting=2)
    for i in range(2):
        s.submit(Request(prompt(18 + i, 3), 2))
    with pytest.raises(QueueFull):
        s.submit(Request(prompt(20, 3), 2))


def test_unseeded_sampling_neither_repeats_nor_moves_the_callers_random_state(llm):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    runs = [llm.generate(prompt(21, 4), max_new_tokens=12, temperature=1.0)[0].token_ids for _ in range(2)]
    assert torch.equal(torch.rand(3), expected)  # the caller's global generator was neither drawn from nor reseeded
    assert runs[0] != runs[1]


class _PaddedPrefills:
    """The decode step, with prefills padded to buckets as api.PrefillGraphs pads them for its CUDA graphs (run
    plainly here: the padding is what a CPU can check)."""

    def __init__(self, decode):
        self.decode, self.graphs = decode, PrefillGraphs(record=False)
        self.prefill = self.graphs.prefill

    def __call__(self, *args, **kwargs):
        return self.decode(*args, **kwargs)


def test_prefills_padded_to_graph_buckets_leave_every_answer_as_it_was(llm, checkpoint):
    """Prompts padded to 16/24 tokens, 3 prompts admitted at once padded to 4 rows (the 4th repeating the first):
    every request, those already decoding beside them included, still gets transformers' solo tokens."""
    llm.model.setup_cache(5, 128)
    decode = _PaddedPrefills(llm._decode_step)
    s = Scheduler(llm.model, decode, None, [], join=False)
    prompts = [prompt(40, 5), prompt(41, 17), prompt(42, 2), prompt(43, 11), prompt(44, 9)]
    first = s.submit(Request(prompts[0], 14))
    run(s, [first], steps=4)
    rest = [s.submit(Request(p, 10)) for p in prompts[1:4]]
    run(s, [first, *rest], steps=3)
    last = s.submit(Request(prompts[4], 8))
    jobs = [first, *rest, last]
    run(s, jobs)
    assert set(decode.graphs.buckets) == {(0, 1, 16), (0, 4, 24)}  # (the 5th joined alone, into a 16-token bucket)
    for job, ids in zip(jobs, prompts):
        assert job.output.token_ids == transformers_greedy(checkpoint[1], ids, job.request.max_new_tokens)


def test_prompts_joining_a_decode_step_get_their_solo_tokens(llm, checkpoint):
    """New prompts prefilled inside a decode step (model.Joining, with Scheduler(join=True)), alone and three at once,
    into rows below and above the running ones: every request still gets transformers' solo tokens."""
    llm.model.setup_cache(6, 128)
    s = Scheduler(llm.model, llm._decode_step, None, [], join=True)
    prompts = [prompt(50, 6), prompt(51, 13), prompt(52, 3), prompt(53, 9), prompt(54, 21), prompt(55, 4)]
    first, second = s.submit(Request(prompts[0], 20)), s.submit(Request(prompts[1], 5))
    run(s, [first, second], steps=2)  # (the first step admits both apart: nothing was decoding)
    steps = s.decode_steps
    joined = s.submit(Request(prompts[2], 12))
    run(s, [first], steps=5)  # the second finishes and frees its row
    assert second.done and s.decode_steps == steps + 5  # (joining took no step of its own)
    rest = [s.submit(Request(p, 6 + i)) for i, p in enumerate(prompts[3:])]
    jobs = [first, second, joined, *rest]
    run(s, jobs)
    assert {job.slot for job in rest} == {1, 3, 4}
    for job, ids in zip(jobs, prompts):
        assert job.output.token_ids == transformers_greedy(checkpoint[1], ids, job.request.max_new_tokens)


def test_a_seeded_request_draws_the_same_tokens_joined_or_apart(llm):
    llm.model.setup_cache(3, 128)
    answers = []
    for join in (False, True):
        s = Scheduler(llm.model, llm._decode_step, None, [], join=join)
        running = s.submit(Request(prompt(60, 7), 30, SamplingParams(temperature=0.9), seed=5))
        s.step()
        seeded = s.submit(Request(prompt(61, 10), 12, SamplingParams(temperature=1.1, top_k=40), seed=7))
        run(s, [running, seeded])
        answers.append((running.output.token_ids, seeded.output.token_ids))
    assert answers[0] == answers[1]


@torch.inference_mode()
def test_a_joined_step_padded_to_a_graph_bucket_chooses_and_writes_as_unpadded(llm):
    """PrefillGraphs.joined pads the joining prompts as for its CUDA graphs (2 prompts of 5 and 11 tokens -> 2 x 16;
    3 -> 4 rows): the tokens chosen and the cache written equal the unpadded step's."""
    model = llm.model
    model.setup_cache(8, 64)
    graphs = PrefillGraphs(record=False)
    token, position = torch.tensor([[7], [9], [11]]), torch.tensor([[3], [0], [5]])
    for lengths, rows in (((5, 11), (4, 6)), ((2, 9, 7), (3, 5, 7))):
        tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        for i, length in enumerate(lengths):
            tokens[i, :length] = torch.tensor(prompt(70 + i, length))
        joining = Joining(tokens, torch.tensor(rows), torch.tensor(lengths) - 1)
        padded = graphs.joined(model, token, position, None, None, None, joining)
        written = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
        plain = decode_step(model, token, position, True, joining=joining)
        assert padded.tolist() == plain.tolist()
        for layer, pair in zip(model.layers, written):
            for saved, now in zip(pair, (layer.attention.cache.k, layer.attention.cache.v)):
                for b in range(3):  # the step's rows at their positions, each prompt's row up to its length
                    torch.testing.assert_close(saved[b, :, position[b, 0]], now[b, :, position[b, 0]])
                for row, length in zip(rows, lengths):
                    torch.testing.assert_close(saved[row, :, :length], now[row, :, :length])
    assert set(graphs.buckets) == {(3, 2, 16), (3, 4, 16)}
    alone = Joining(tokens[:1], joining.rows[:1], joining.logits_at[:1])  # one prompt: a bucket of one
    padded = graphs.joined(model, token[:1], position[:1], None, None, None, alone)
    assert padded.tolist() == decode_step(model, token[:1], position[:1], True, joining=alone).tolist()
    assert (1, 1, 16) in graphs.buckets


def test_a_joining_request_that_ends_at_its_first_token_frees_its_row(llm, checkpoint):
    """Joined into a decode step: a request of max_new_tokens=1, and one whose first token is a stop token, end
    there; their rows go to the next waiting request, whose answer is still its solo one."""
    llm.model.setup_cache(3, 128)
    s = Scheduler(llm.model, llm._decode_step, None, [], join=True)
    running = s.submit(Request(prompt(80, 5), 12))
    s.step()
    one = s.submit(Request(prompt(81, 7), 1))
    first = transformers_greedy(checkpoint[1], prompt(82, 4), 1)[0]
    stopped = s.submit(Request(prompt(82, 4), 9, stop_token_ids=[first]))
    steps = s.decode_steps
    s.step()
    assert s.decode_steps == steps + 1  # both joined the step
    later = s.submit(Request(prompt(83, 6), 5))
    run(s, [running, one, stopped, later])
    assert (len(one.output.token_ids), one.output.finish_reason) == (1, "length")
    assert (stopped.output.token_ids, stopped.output.finish_reason) == ([], "stop")
    assert later.slot in (one.slot, stopped.slot)
    for job, seed, length in ((running, 80, 5), (one, 81, 7), (later, 83, 6)):
        assert job.output.token_ids == transformers_greedy(checkpoint[1], prompt(seed, length),
                                                           job.request.max_new_tokens)


def test_a_lone_request_is_held_for_company_only_while_enough_rows_decode(llm, checkpoint):
    """With hold=3 (and, here, HOLD_ROWS = 2): a lone request waits up to 3 steps for another; two arriving
    together go at once; with one row decoding nothing waits. Every answer is still the solo one."""
    llm.model.setup_cache(6, 128)
    s = Scheduler(llm.model, llm._decode_step, None, [], hold=3)
    s.HOLD_ROWS = 2
    prompts = [prompt(90 + i, 4 + i) for i in range(6)]
    running = [s.submit(Request(prompts[0], 30)), s.submit(Request(prompts[1], 30))]
    s.step()
    lone = s.submit(Request(prompts[2], 6))
    for held in range(3):
        s.step()
        assert lone.slot is None and lone.held == held + 1
    s.step()
    assert lone.slot is not None
    pair = [s.submit(Request(prompts[3], 6)), s.submit(Request(prompts[4], 6))]
    s.step()
    assert all(job.slot is not None and job.held == 0 for job in pair)
    jobs = running + [lone] + pair
    run(s, jobs)
    for job, ids in zip(jobs, prompts):
        assert job.output.token_ids == transformers_greedy(checkpoint[1], ids, job.request.max_new_tokens)
    one = s.submit(Request(prompts[0], 8))  # one row decoding, fewer than HOLD_ROWS: a lone request goes at once
    while one.slot is None:
        s.step()
    alone = s.submit(Request(prompts[5], 3))
    s.step()
    assert alone.slot is not None and alone.held == 0
    run(s, [one, alone])


def test_decode_steps_run_only_the_batch_sizes_warm_up_compiles(llm):
    """On a GPU `warm_up` compiles the decode step for each of `batch_sizes` before serving, so every step must run
    one of them: powers of two up to the rows the cache has, and on a GPU at least GPU_FEWEST_ROWS past one row."""
    s = scheduler(llm, 12)
    assert s.batch_sizes() == [1, 2, 4, 8, 12]
    seen, decode = [], s.decode
    s.decode = lambda model, token, *args, **kwargs: seen.append(token.shape[0]) or decode(model, token, *args,
                                                                                           **kwargs)
    jobs = []
    for i in range(12):  # requests arriving two steps apart, the later ones shorter: the batch grows, then shrinks
        jobs.append(s.submit(Request(prompt(120 + i, 3 + i), 40 - 3 * i)))
        s.step()
        s.step()
    run(s, jobs)
    assert set(seen) == {1, 2, 4, 8, 12}
    s.device = torch.device("cuda")  # (only the rule: nothing runs)
    assert s.batch_sizes() == [1, 8, 12] and s._batch_size(2) == 8 and s._batch_size(9) == 12
