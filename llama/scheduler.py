"""Continuous batching: the engine's one generation loop, shared by `Llama.generate`, `Llama.stream` and the server.

The KV cache holds `slots` rows. A request waits in a queue until a row is free; it is then prefilled into that
row (its prompt's keys and values are written there, next to rows that are mid-answer), its first token is chosen
from the prefill, and from the next step on it decodes with the others, each row at its own position. A request
that finishes (an end-of-sequence token, a stop string, max_new_tokens, or cancelled) leaves its row at once, and
the next waiting request takes the row. No computation mixes rows, so what a request generates does not depend on
what else is in the batch (in float32 on a CPU, exactly; bf16 matrix products on a GPU may round differently at
another batch size).

    step():  admit   waiting requests -> free rows: one prefill for all of them, first tokens chosen (with `join`,
                     while other rows are decoding, inside the decode step: `model.Joining`, the prompts' tokens
                     and the step's share one pass over the weights; with `hold`, a lone request may wait a few
                     steps for another to share its prefill)
             decode  (when none was admitted apart) one token for every row still generating (`decode_step`), or
                     with a speculator, 1 to k + 1 tokens a row from one verify step (speculative.py)
             read    the tokens of earlier launches -> each request's output (text, stop strings, finish)

Nothing in `admit` or `decode` waits for the GPU: positions are counted on the host, and the tokens go back to the
host through pinned memory. On a GPU `read` takes the tokens of the step before the newest, which the GPU has
already finished while it works on the newest one, so it is never left idle; a finish is thus seen one step late and
that row's extra token is dropped. The batch a decode step runs is the occupied rows rounded up to a power of two
(on a GPU at least 8 past one row; one compiled step and CUDA graph per size, `warm_up` makes them all before
serving). A speculative step needs each row's tokens on the host to propose the
next ones, so it reads them at once.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from llama.generate import (
    GenerationResult,
    RowParams,
    SamplingParams,
    exponential_race,
    prefill_step,
    sample_rows,
    to_device,
    verify_step,
)
from llama.model import Joining, Transformer
from llama.speculative import DraftModel, PromptLookup, accept
from llama.tokenizer import Tokenizer

MAX_LOGPROBS = 20  # top log-probabilities a request may ask for (OpenAI's limit)


@dataclass
class Request:
    """What to generate: a prompt of token ids and how to continue it (arguments already checked)."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    seed: int | None = None  # None: the scheduler's own random stream
    stop: Sequence[str] = ()  # stop strings (the text is cut before them)
    stop_token_ids: Sequence[int] = ()  # besides the model's end-of-sequence ids
    logprobs: int | None = None  # None, or also return each new token's log-probability and the top `logprobs`
    ignore_eos: bool = False  # generate max_new_tokens whatever the tokens (benchmarks)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits), and the most likely
    tokens at that step with theirs."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class Output:
    """One request's output: token ids, text, and why it stopped. Text is held back while it could still turn
    out to be the beginning of a stop string."""

    def __init__(self, tokenizer: Tokenizer | None, stop_ids: set[int], stop: list[str]):
        self.tokenizer, self.stop_ids, self.stop = tokenizer, stop_ids, stop
        self.decoder = tokenizer.stream_decoder() if tokenizer else None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self.emitted = 0  # characters of text already handed out
        self.finish_reason: str | None = None
        self.cut = False  # the text was cut at a stop string

    def push(self, tokens: list[int], final: bool, logprobs: list[TokenLogprob] | None = None) -> str:
        """Take the next tokens; return the text that can be shown now."""
        for i, token in enumerate(tokens):
            if self.finish_reason:
                break
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            self.token_ids.append(token)
            if logprobs:
                self.logprobs.append(logprobs[i])
            if self.decoder is not None:
                self._add_text(self.decoder.push(token))
        if not self.finish_reason and final:
            self.finish_reason = "length"
        if self.finish_reason and self.decoder is not None:
            self._add_text(self.decoder.flush())  # bytes held back for an unfinished character
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stop), default=0)
        piece = self.text[self.emitted: max(self.emitted, len(self.text) - hold)]
        self.emitted += len(piece)
        return piece

    def _add_text(self, new: str) -> None:
        if self.cut:
            return
        self.text += new
        for s in self.stop:
            index = self.text.find(s)
            if index >= 0:  # cut before the stop string; tokens already taken stay in token_ids
                self.text, self.finish_reason, self.cut = self.text[:index], "stop", True

    def result(self) -> GenerationResult:
        return GenerationResult(self.token_ids, self.text if self.tokenizer else None, self.finish_reason or "length")


@dataclass(eq=False)
class Job:
    """A request inside the scheduler: its row, where its next token goes, what it has produced."""

    request: Request
    output: Output
    generator: torch.Generator | None  # its own random stream when it has a seed
    slot: int | None = None  # its cache row, once admitted
    position: int = 0  # where the token it decodes next is written
    launched: int = 0  # tokens whose computation has been launched (the first comes from the prefill)
    received: int = 0  # tokens read back on the host
    cancelled: bool = False
    held: int = 0  # steps it waited with a row free (`Scheduler.hold`)
    done: bool = False  # finished (output.finish_reason says why) or cancelled; its row is free again
    error: Exception | None = None  # what ended it, when a step failed

    @property
    def generating(self) -> bool:
        return not self.done and self.launched < self.request.max_new_tokens


class Update(NamedTuple):
    """What a step did for a job: the text it can show now, and the job's state right then."""

    job: Job
    text: str
    finish_reason: str | None  # set on the job's last update
    tokens: int  # len(job.output.token_ids) after this update


@dataclass
class RowState:
    """What a decode step reads of each of the cache's rows besides the cache, at fixed addresses: a compiled
    step's CUDA graph reads its inputs in place only there (an input elsewhere is first copied to where the graph
    was recorded, at every replay: a kernel of its own). A step that chooses the tokens itself, with no prompts
    joining it (`Scheduler._choosing_step`), also writes `tokens` and moves `positions` on by `advance`
    (`generate.decode_step`); after any other step the scheduler does both."""

    tokens: Tensor  # [slots] long: each row's latest token
    positions: Tensor  # [slots] long: the position it goes to
    advance: Tensor  # [slots] long: 1 for a row still generating, 0 for one done (it stays inside the cache)
    temperature: Tensor  # [slots, 1] float32 (0: greedy)
    top_k: Tensor  # [slots] long (no top-k: the vocabulary's size)
    race: Tensor  # [slots, V] float32: a sampling step's random draws (`exponential_race`)

    @classmethod
    def new(cls, slots: int, vocab_size: int, device: torch.device) -> RowState:
        long = dict(dtype=torch.long, device=device)
        return cls(*(torch.empty(slots, **long) for _ in range(3)), torch.empty(slots, 1, device=device),
                   torch.empty(slots, **long), torch.empty(slots, vocab_size, device=device)).reset()

    def reset(self) -> RowState:
        """Every row greedy, at token 0 and position 0, not moving on."""
        for buffer in (self.tokens, self.positions, self.advance, self.temperature):
            buffer.zero_()
        self.top_k.fill_(self.race.shape[1])
        self.race.fill_(1)
        return self


@dataclass
class _Launch:
    """A prefill or decode step on its way: the jobs it produced a token for, and the copy of those tokens."""

    jobs: list[tuple[Job, int]]  # (job, its index in the tensors below)
    read: Callable[[], list]  # waits for the copy; -> [tokens [n, T], (logprobs [n, T], top ids, top logprobs)?]
    counts: list[int] | None = None  # tokens of each row that count (a speculative step's); None: all T


class Scheduler:
    """Continuous batching over a model whose cache is set up for `slots` rows of `length` positions.

    `submit` and `cancel` may be called from any thread; `step` from one thread only. A request too long for the
    cache is refused at `submit` (a ValueError); `max_waiting` bounds the queue (`QueueFull`). With a
    `speculator` (speculative.py) each decode step verifies the tokens it proposes."""

    HOLD_ROWS = 32  # rows decoding from which a lone new request may be held (`hold`)
    GPU_FEWEST_ROWS = 8  # a GPU's decode steps of more than one row run at least this many (`_batch_size`)

    def __init__(self, model: Transformer, decode: Callable[..., Tensor], tokenizer: Tokenizer | None,
                 eos_token_ids: Sequence[int], seed: int | None = None, max_waiting: int | None = None,
                 speculator: PromptLookup | DraftModel | None = None, join: bool = False, hold: int = 0):
        cache = model.layers[0].attention.cache
        assert cache is not None, "set up the model's cache first"
        self.model, self.decode, self.tokenizer = model, decode, tokenizer
        self.verify = getattr(decode, "verify", verify_step)
        self.prefill = getattr(decode, "prefill", prefill_step)
        self.speculator = speculator
        if isinstance(speculator, DraftModel):
            draft_cache = speculator.model.layers[0].attention.cache
            assert draft_cache is not None and draft_cache.k.shape[::2] == cache.k.shape[::2], \
                "set up the draft's cache with the model's rows and length"
        self.slots, self.length = cache.k.shape[0], cache.k.shape[2]
        self.device = model.embed_tokens.weight.device
        # New prompts may join a decode step (`_may_join`): on a GPU the step reads every weight once for a few rows
        # and the prompts' tokens ride along (a CPU computes each token's products anyway). Off unless asked for;
        # `llama serve` asks on a compiled GPU: on an H100, 8B shape, 64 clients got 0.81-0.84 of the static
        # batch's tok/s joined against 0.77 apart (docs/benchmarks.md, "Serving").
        self.join = join
        # A lone new request may wait up to `hold` steps for another to be prefilled with, while at least HOLD_ROWS
        # rows decode: a prefill of one prompt costs about a decode step of all of them (on an H100, 8B shape: ~8
        # ms against 7.3 ms for 64 rows; 4 prompts ~14 ms), a row left empty a step 1/64 of one. Off unless asked for:
        # hold=8 gave the server 0.76 of the static batch against 0.77-0.78 without (the scheduler alone 0.81).
        self.hold = hold
        self.eos_token_ids = set(eos_token_ids)
        self.max_waiting = max_waiting
        self.generator = torch.Generator(device=self.device)
        # (no seed: one from the OS; torch.seed() would also reseed the caller's global generator)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Job] = {}  # slot -> job
        self.free = list(range(self.slots))  # a heap: the lowest free row first keeps the batch compact
        self.launches: deque[_Launch] = deque()
        self.vocab_size = model.lm_head.out_features
        with torch.inference_mode():  # (as the tensors made in `step`: a compiled step would recompile for others)
            # the decode step's own buffers where it keeps them (`CompiledDecodeStep.row_state`: the same from one
            # scheduler to the next, so that its CUDA graphs read them in place)
            make = getattr(decode, "row_state", RowState.new)
            self.rows: RowState = make(self.slots, self.vocab_size, self.device)
        self._advancing: tuple | None = None  # the rows that `rows.advance` moves on (a step's B rows: True)
        self.seen: Tensor | None = None  # [slots, V] bool, tokens each row has seen (for repetition penalties)
        self.lock = threading.Lock()
        self._row_params: tuple[tuple[Job | None, ...], RowParams, Tensor] | None = None
        self.decode_steps = 0
        self.decoded_tokens = 0  # tokens produced by decode steps (rows generating, summed over steps)
        self.proposed_tokens = 0  # speculative tokens proposed to verify steps
        self.accepted_tokens = 0  # and those of them kept

    # ------------------------------------------------------------------------ from any thread
    def submit(self, request: Request) -> Job:
        """Queue a request; the next `step` admits it if a row is free."""
        need = len(request.prompt) + request.max_new_tokens
        if need > self.length:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; with max_new_tokens="
                             f"{request.max_new_tokens} it needs {need} positions, more than the {self.length} "
                             f"of the cache (max_seq_len)")
        stop_ids = set(request.stop_token_ids) | (set() if request.ignore_eos else self.eos_token_ids)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed)
        job = Job(request, Output(self.tokenizer, stop_ids, list(request.stop)), generator)
        with self.lock:
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit)")
            self.waiting.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job; its row is freed at the next step."""
        job.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.launches)

    # ------------------------------------------------------------------------ the loop (one thread)
    @torch.inference_mode()
    def step(self) -> list[Update]:
        """Admit, decode, read (see the module's docstring); -> (job, new text) for each job that moved on."""
        for job in [j for j in self.running.values() if j.cancelled]:
            self._retire(job)
        jobs = self._take_waiting()
        if jobs and self._may_join(jobs):
            self._decode(jobs)
        elif jobs:  # (a step that admits without joining does not decode: the new rows' first tokens come sooner)
            self._admit(jobs)
        elif self.speculator is None or not self._speculate():
            self._decode()
        return self._read()

    def _take_waiting(self) -> list[Job]:
        """The waiting jobs that the free rows can take (none while a lone one is held, `hold`)."""
        with self.lock:
            jobs = []
            if self.hold and len(self.waiting) == 1 and self.waiting[0].held < self.hold and self.free \
                    and sum(job.generating for job in self.running.values()) >= self.HOLD_ROWS:
                self.waiting[0].held += 1
                return jobs
            while self.waiting and len(jobs) < len(self.free):
                job = self.waiting.popleft()
                if job.cancelled:
                    job.done = True
                else:
                    jobs.append(job)
        return jobs

    def _may_join(self, jobs: list[Job]) -> bool:
        """Whether these new jobs' prompts can join the next decode step (`model.Joining`), rather than be prefilled
        in a step of their own: `join` is on, rows are decoding, no speculator, and no job wants what only the
        separate steps do (log-probabilities, a repetition penalty, whose prompt tokens count as seen)."""
        everyone = jobs + [job for job in self.running.values() if job.generating]
        return self.join and self.speculator is None and len(everyone) > len(jobs) \
            and all(job.request.logprobs is None and job.request.params.repetition_penalty == 1 for job in everyone)

    def _place(self, jobs: Sequence[Job]) -> tuple[Tensor, Tensor, Tensor]:
        """Give new jobs their rows: -> their prompts right-padded [n, T], lengths [n] and rows [n], on the device."""
        for job in jobs:
            job.slot = heapq.heappop(self.free)
            self.running[job.slot] = job
        prompts = [job.request.prompt for job in jobs]
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.zeros(len(jobs), int(lengths.max()), dtype=torch.long)  # right-padded [n, T]
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
        slots = to_device(torch.tensor([job.slot for job in jobs]), self.device)
        return to_device(tokens, self.device), to_device(lengths, self.device), slots

    def _started(self, jobs: Sequence[Job], slots: Tensor, lengths: Tensor, first: Tensor) -> None:
        """New jobs' first tokens [n] chosen: from the next step on, each decodes at its prompt's end."""
        self.rows.tokens[slots] = first
        self.rows.positions[slots] = lengths
        for job in jobs:
            job.position, job.launched = len(job.request.prompt), 1

    def _admit(self, jobs: list[Job]) -> None:
        tokens, lengths, slots = self._place(jobs)
        logits = self.prefill(self.model, tokens, lengths - 1, slots).float()  # [n, V]
        if isinstance(self.speculator, DraftModel):
            self.speculator.admit(tokens, lengths, slots)

        params = RowParams.of([job.request.params for job in jobs], self.device)
        if "penalty" in params.uses and self.seen is None:
            self.seen = torch.zeros(self.slots, self.vocab_size, dtype=torch.bool, device=self.device)
        seen = None
        if self.seen is not None:  # (as transformers: the prompt's tokens count as seen)
            self.seen[slots] = False
            for job in jobs:
                self.seen[job.slot, to_device(torch.tensor(job.request.prompt), self.device)] = True
            seen = self.seen[slots]
        race = self._random(jobs, params, (self.vocab_size,), exponential_race)
        chosen = sample_rows(logits, params, seen, race)  # [n]
        if self.seen is not None:
            self.seen[slots, chosen] = True
        self._started(jobs, slots, lengths, chosen)
        self._launch(list(zip(jobs, range(len(jobs)))), chosen[:, None], logits[:, None])

    def _decode(self, joining: Sequence[Job] = ()) -> None:
        """A decode step for the rows generating; with `joining`, new jobs' prompts are prefilled in the same
        step (`model.Joining`: one pass over the weights for both) and their first tokens chosen."""
        generating = [job for job in self.running.values() if job.generating]
        if not generating:
            return
        # (before the new jobs take their rows: a row they take is a free row of this step; joined, at least 2
        # rows, as PrefillGraphs.joined says why)
        rows = self._rows(2 if joining else 1)
        B = len(rows)
        span = max(job.position for job in self.running.values()) + 1
        join = None
        if joining:
            tokens, lengths, slots = self._place(joining)
            join = Joining(tokens, slots, lengths - 1)
        everyone = rows + list(joining)  # the rows of the tokens chosen: the step's B, then the prompts'
        params, top_k = self._params(everyone)
        # Which rows advance goes to the device when the rows change, not at every step
        key = tuple(job is not None and job.generating for job in rows)
        if self._advancing != key:
            self._advancing = key
            self.rows.advance[:B] = to_device(torch.tensor(key, dtype=torch.long), self.device)
        wants_logprobs = any(job.request.logprobs is not None for job in generating)
        token, position = self.rows.tokens[:B, None], self.rows.positions[:B, None]  # [B, 1] each
        in_step = self._chooses_tokens(params, wants_logprobs)
        if in_step and join is None:  # (the step writes the next step's token and position itself)
            # every input from `rows`, greedy or not: one CUDA graph reads them all in place
            self._random(everyone, params, (self.vocab_size,), exponential_race, out=self.rows.race[:B])
            chosen, logits = self._choosing_step(B, params, top_k, span), None
        else:
            race = self._random(everyone, params, (self.vocab_size,), exponential_race)
            if in_step:
                chosen = self.decode(self.model, token, position, True, race, params.temperature, top_k, span=span,
                                     joining=join)
                logits = None
            else:
                logits = self.decode(self.model, token, position, span=span, joining=join).float()  # [B (+ n), V]
                chosen = sample_rows(logits, params, None if self.seen is None else self.seen[:B], race)
            self.rows.tokens[:B] = chosen[:B]  # (a copy: a CUDA graph's output is overwritten by its next replay)
            self.rows.positions[:B] += self.rows.advance[:B]  # (rows done generating stay where they are, in the cache)
        if self.seen is not None:
            self.seen[torch.arange(B, device=self.device), self.rows.tokens[:B]] = True
        for job in generating:
            job.position += 1
            job.launched += 1
        self.decode_steps += 1
        self.decoded_tokens += len(generating)
        if join is None:  # (the copy to the host is queued before the next step, which writes `tokens` anew)
            self._launch([(job, job.slot) for job in generating], self.rows.tokens[:B, None],
                         logits[:, None] if wants_logprobs else None)
            return
        self._started(joining, slots, lengths, chosen[B:])
        self._launch([(job, job.slot) for job in generating] + [(job, B + i) for i, job in enumerate(joining)],
                     chosen[:, None].clone(), None)

    def _chooses_tokens(self, params: RowParams, wants_logprobs: bool) -> bool:
        """Whether the decode step chooses the rows' tokens itself (`generate.pick`): a compiled step on a GPU, for
        temperature and top-k (the sampler's other rules, and log-probabilities, need the logits here)."""
        return getattr(self.decode, "chooses_tokens", False) and self.device.type == "cuda" and not wants_logprobs \
            and params.uses <= {"sampling", "top_k"}

    def _choosing_step(self, B: int, params: RowParams, top_k: Tensor, span: int) -> Tensor:
        """A decode step of the first B rows that chooses their tokens and writes the next step's inputs itself,
        every input from `self.rows` (`generate.decode_step`): greedy and sampled steps replay one CUDA graph."""
        rows = self.rows
        return self.decode(self.model, rows.tokens[:B, None], rows.positions[:B, None], True, rows.race[:B],
                           params.temperature, top_k, span=span, advance=rows.advance[:B, None])

    def _speculate(self) -> bool:
        """A verify step (speculative.py) for the rows still generating; False (nothing done) when no row has a
        proposal, so that a plain decode step runs instead."""
        rows = self._rows()
        B, k = len(rows), self.speculator.k
        # Proposals may not take a row past max_new_tokens: a step emits at most (proposals + 1) tokens
        budget = [min(k, job.request.max_new_tokens - job.launched - 1) if job and job.generating else 0
                  for job in rows]
        if not any(budget):
            return False
        params, _ = self._params(rows)
        positions = [job.position if job else 1 for job in rows]  # where each row's latest token goes
        span = max(positions) + 1
        if isinstance(self.speculator, DraftModel):
            # each row's two latest tokens (the first was generated or is the prompt's last), at positions - 1, +0
            latest = [([job.request.prompt[-1]] + job.output.token_ids[-2:])[-2:] if job else [0, 0] for job in rows]
            races = self._random(rows, params, (k, self.vocab_size), exponential_race)
            proposals, q = self.speculator.propose(self._on_device(latest),
                                                   self._on_device([[p - 1, p] for p in positions]), span, params,
                                                   races)
            counts = budget
        else:
            lists = [self.speculator.propose(job, job.request.prompt, job.output.token_ids, n) if n else []
                     for job, n in zip(rows, budget)]
            counts = [len(proposal) for proposal in lists]
            if not any(counts):
                return False
            k, q = max(counts), None  # (the verify step is as wide as the longest proposal)
            proposals = self._on_device([p + [0] * (k - len(p)) for p in lists])  # [B, k]
        # The row's latest token and its proposals, at the positions that follow (past the cache: its last slot,
        # where only padding or a free row's tokens go)
        tokens = torch.cat([self.rows.tokens[:B, None], proposals], dim=1)  # [B, k+1]
        at = self._on_device([[min(p + j, self.length - 1) for j in range(k + 1)] for p in positions])
        generating = [job for job in rows if job is not None and job.generating]
        wants_logprobs = any(job.request.logprobs is not None for job in generating)
        if not params.uses & {"sampling", "penalty"} and not wants_logprobs:
            # Every row greedy: the verify step returns each position's argmax, and a proposal is kept while it
            # equals the argmax before it; the new tokens are then the argmaxes up to the first that differs
            chosen = self.verify(self.model, tokens, at, span=span + k, choose=True)  # [B, k+1]
            logits = None
            chosen_host, proposed = chosen.tolist(), proposals.tolist()
            emitted = []
            for row in range(B):
                n = 0
                while n < counts[row] and proposed[row][n] == chosen_host[row][n]:
                    n += 1
                emitted.append(n + 1)
        else:
            logits = self.verify(self.model, tokens, at, span=span + k).float()  # [B, k+1, V]
            # (drawn for the k the speculator proposes, whatever the longest proposal now: a seeded job's draws
            # must not depend on the rows beside it)
            uniform = self._random(rows, params, (self.speculator.k,), _uniform)
            uniform = torch.ones(B, k, device=self.device) if uniform is None else uniform[:, :k]
            race = self._random(rows, params, (self.vocab_size,), exponential_race)
            chosen, emitted_tensor = accept(logits, proposals, self._on_device(counts), q, params,
                                            None if self.seen is None else self.seen[:B], uniform, race)
            chosen_host, emitted = chosen.tolist(), emitted_tensor.tolist()  # (the next step's proposals need them)
        for job in generating:
            n = emitted[job.slot]
            job.position += n
            job.launched += n
            self.decoded_tokens += n
            self.proposed_tokens += counts[job.slot]
            self.accepted_tokens += n - 1
        ends = [job.position if job is not None and job.generating else p for job, p in zip(rows, positions)]
        self.rows.positions[:B] = self._on_device(ends)
        self.rows.tokens[:B] = self._on_device([chosen_host[row][emitted[row] - 1] for row in range(B)])
        if self.seen is not None:
            for job in generating:
                self.seen[job.slot, chosen[job.slot, :emitted[job.slot]]] = True
        self.decode_steps += 1
        if logits is not None and wants_logprobs:
            self._launch([(job, job.slot) for job in generating], chosen, logits, emitted)
        else:  # (the tokens are on the host already)
            self.launches.append(_Launch([(job, job.slot) for job in generating], lambda: [chosen_host], emitted))
        return True

    def _on_device(self, values: list) -> Tensor:
        return to_device(torch.tensor(values), self.device)

    def _rows(self, fewest: int = 1) -> list[Job | None]:
        """The rows a decode step runs: the occupied rows (up to the highest), as `_batch_size` rounds them (None:
        a free row)."""
        B = self._batch_size(max(fewest, max(self.running) + 1))
        return [self.running.get(slot) for slot in range(B)]

    def _batch_size(self, rows: int) -> int:
        """The batch a decode step of `rows` rows runs: a power of two (one compiled step, and CUDA graph, per size);
        on a GPU, past one row, at least GPU_FEWEST_ROWS: a step reads every weight once, so 8 rows cost what 2 do,
        and each size is a compilation (`warm_up`)."""
        B = 1 << (rows - 1).bit_length()
        if B > 1 and self.device.type == "cuda":
            B = max(B, self.GPU_FEWEST_ROWS)
        return min(self.slots, B)

    def batch_sizes(self) -> list[int]:
        """Every batch size a decode step may run."""
        return sorted({self._batch_size(rows) for rows in range(1, self.slots + 1)})

    @torch.inference_mode()
    def warm_up(self, report: Callable[[str], None] = lambda line: None) -> None:
        """Compile, and record as a CUDA graph, the decode step of each of `batch_sizes` now, where the step is
        compiled on a GPU, and the prefills of one prompt and of two (the layers, compiled for every length, compile
        a size of 1 apart), with `join` also the steps that one and two prompts join (`api.PrefillGraphs.joined`).
        A shape first met while serving would stop every row while it compiles: up to a minute for the 8B shape on
        an H100, ~15 s for a prefill's (docs/benchmarks.md, Serving). `report` gets a line per shape."""
        if not (getattr(self.decode, "chooses_tokens", False) and self.device.type == "cuda"):
            return
        sizes = self.batch_sizes()
        report(f"compiling the decode step for {len(sizes)} batch sizes ({', '.join(map(str, sizes))} rows), once each")
        for B in sizes:
            start = time.perf_counter()
            params, top_k = self._params([None] * B)
            self.rows.advance[:B] = 0  # (no row moves on; free rows' tokens are written again when rows start)
            self._advancing = None
            for _ in range(2):  # (the first run compiles, the second records the graph)
                self._choosing_step(B, params, top_k, span=1)
            torch.cuda.synchronize(self.device)
            report(f"decode step for {B} rows ready in {time.perf_counter() - start:.1f} s")
        B = self._batch_size(2)
        joins = self.join and B > 1  # (a step that prompts join has 2 rows at least)
        T = min(16, self.length)
        for n in (1, 2)[:self.slots]:  # (prompts of T tokens, into rows no request holds yet)
            start = time.perf_counter()
            prompts = torch.zeros(n, T, dtype=torch.long, device=self.device)
            rows, last = torch.arange(n, device=self.device), torch.full_like(prompts[:, 0], T - 1)
            self.prefill(self.model, prompts, last, rows)
            if joins:
                params, top_k = self._params([None] * (B + n))
                self.decode(self.model, self.rows.tokens[:B, None], self.rows.positions[:B, None], True, None,
                            params.temperature, top_k, span=64,  # (any span past 1: a size of 1 compiles apart)
                            joining=Joining(prompts, rows, last))
            torch.cuda.synchronize(self.device)
            report(f"prefill{' and decode step' if joins else ''} of {n} prompt(s) ready in "
                   f"{time.perf_counter() - start:.1f} s")
        self._row_params = None

    def _params(self, rows: list[Job | None]) -> tuple[RowParams, Tensor]:
        """The rows' sampling parameters, and each row's top-k as a tensor [B] (no top-k: V), sent to the device
        when the rows change, not at every step; the temperatures and top-k in `self.rows` (where they fit)."""
        key = tuple(rows)  # (the jobs themselves, compared by identity: an id() can be reused by a later job)
        if self._row_params is None or self._row_params[0] != key:
            params = RowParams.of([job.request.params if job else SamplingParams() for job in rows], self.device)
            top_k = torch.where(params.top_k > 0, params.top_k, self.vocab_size)[:, 0]
            if len(rows) <= self.slots:
                B = len(rows)
                self.rows.temperature[:B], self.rows.top_k[:B] = params.temperature, top_k
                params, top_k = replace(params, temperature=self.rows.temperature[:B]), self.rows.top_k[:B]
            self._row_params = key, params, top_k
        return self._row_params[1], self._row_params[2]

    def _random(self, rows: Sequence[Job | None], params: RowParams, shape: tuple[int, ...],
                draw: Callable[..., Tensor], out: Tensor | None = None) -> Tensor | None:
        """A step's random draws for these rows (None: a free row), [len(rows), *shape] (into `out` where given),
        or None when no row samples: the scheduler's stream for all rows, then each seeded job's row from its own
        generator, seeded afresh from (its seed, the index of the token it chooses next, what the draws are for).
        So a seed repeats a job's output whatever else runs beside it, even where the rows beside it change what a
        step is (a verify step or a decode step, how many tokens it proposes)."""
        if "sampling" not in params.uses:
            return None
        size = (len(rows), *shape)
        draws = draw(size, self.device, self.generator) if out is None else draw(size, self.device, self.generator, out)
        for index, job in enumerate(rows):
            if job is not None and job.generator is not None and job.request.params.temperature > 0 \
                    and job.generating:
                key = f"{job.request.seed}:{job.launched}:{draw.__name__}:{shape}".encode()
                job.generator.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) >> 1)
                draws[index] = draw(shape, self.device, job.generator)
        return draws

    def _launch(self, jobs: list[tuple[Job, int]], chosen: Tensor, logits: Tensor | None,
                counts: list[int] | None = None) -> None:
        """Start copying a step's tokens chosen [n, T] (and their log-probabilities, from logits [n, T, V], for the
        jobs that want them) to the host."""
        tensors = [chosen]
        wanted = max((job.request.logprobs for job, _ in jobs if job.request.logprobs is not None), default=None)
        if wanted is not None and logits is not None:
            logprobs = logits.log_softmax(dim=-1)
            top = logprobs.topk(max(wanted, 1), dim=-1)
            tensors += [logprobs.gather(-1, chosen[..., None])[..., 0], top.indices, top.values]
        copies = [_copy_to_host(t) for t in tensors]
        self.launches.append(_Launch(jobs, lambda: [copy() for copy in copies], counts))

    def _read(self) -> list[Update]:
        updates = []
        # On a GPU leave the newest launch in flight while rows are still generating (see the module docstring),
        # unless the next step's proposals need its tokens
        lag = 1 if self.device.type == "cuda" and self.speculator is None \
            and any(j.generating for j in self.running.values()) else 0
        while len(self.launches) > lag:
            launch = self.launches.popleft()
            tensors = launch.read()  # the host's wait for the device (and, speculating, `_speculate`'s)
            for job, index in launch.jobs:
                if job.done:
                    continue
                if job.cancelled:
                    self._retire(job)
                    continue
                count = len(tensors[0][index]) if launch.counts is None else launch.counts[index]
                tokens = tensors[0][index][:count]
                job.received += count
                logprobs = None
                if job.request.logprobs is not None and len(tensors) > 1:
                    n = job.request.logprobs
                    logprobs = [TokenLogprob(token, tensors[1][index][t], list(zip(tensors[2][index][t][:n],
                                                                                 tensors[3][index][t][:n])))
                                for t, token in enumerate(tokens)]
                final = job.received >= job.request.max_new_tokens
                piece = job.output.push(tokens, final, logprobs)
                if job.output.finish_reason:
                    self._retire(job)
                updates.append(Update(job, piece, job.output.finish_reason, len(job.output.token_ids)))
        return updates

    def _retire(self, job: Job) -> None:
        job.done = True
        if job.slot is not None and self.running.get(job.slot) is job:
            del self.running[job.slot]
            heapq.heappush(self.free, job.slot)

    def run(self, jobs: Sequence[Job]) -> Iterator[list[Update]]:
        """Step until `jobs` are done, yielding each step's updates."""
        while not all(job.done for job in jobs):
            yield self.step()


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator) -> Tensor:
    """Uniform draws in (0, 1] (speculative.accept keeps a proposal when u * q <= p: never when p = 0)."""
    return 1 - torch.rand(shape, device=device, generator=generator)


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler's `max_waiting`."""


def _copy_to_host(tensor: Tensor) -> Callable[[], list]:
    """Start copying a tensor to the host without waiting; the returned function waits, then lists it."""
    if tensor.device.type != "cuda":
        return tensor.tolist
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return host.tolist()

    return wait
