"""Speculative decoding beside plain greedy decoding: the same model, the same run, the same text.

    python scripts/bench_speculative.py                       # CPU, SmolLM2 demo (real weights), prompt lookup
    python scripts/bench_speculative.py --ks 2,4,6 --repeats 3
    python scripts/bench_speculative.py --gpu                 # GPU, Llama-3.1-8B shape, random bf16, compiled
    python scripts/bench_speculative.py --gpu --tiny --device cpu   # smoke test of the GPU part's code

CPU: two input-grounded tasks through the chat format (rewrite a given 40-line function with one name changed, the
answer started with the new name; summarise a given passage), greedy, compiled. For each, plain decoding and
prompt lookup with each k in --ks, alternating, best of --repeats: tok/s (new tokens over the wall time of the
whole call, prefill included), the ratio to plain, the acceptance rate, tokens per verify step, and whether the
text is identical (it must be).

GPU: random weights cannot give a real acceptance rate, so this measures the machinery. (1) The compiled verify
step of k + 1 tokens beside one compiled decode step (CUDA events, batch 1, at position ~300). (2) An oracle
proposer that proposes exactly the tokens an earlier plain run chose: batch-1 tok/s of prompt 128 + 256 new tokens
with it, beside plain decoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import CONFIGS, TINY, random_engine_model, sync  # noqa: E402 (scripts/ is on sys.path above)

from llama.api import Llama  # noqa: E402
from llama.scheduler import Request, Scheduler  # noqa: E402

FUNCTION = '''def summarize_orders(orders, currency="EUR", minimum=0.0):
    """Group orders by customer and return one summary line per customer, largest total first."""
    totals = {}
    counts = {}
    largest = {}
    for order in orders:
        customer = order["customer"].strip().title()
        amount = float(order["amount"])
        if order.get("currency", currency) != currency:
            rate = order.get("rate", 1.0)
            amount = amount * rate
        if amount < minimum:
            continue
        totals[customer] = totals.get(customer, 0.0) + amount
        counts[customer] = counts.get(customer, 0) + 1
        if amount > largest.get(customer, 0.0):
            largest[customer] = amount
    lines = []
    for customer in sorted(totals, key=totals.get, reverse=True):
        total = totals[customer]
        count = counts[customer]
        average = total / count
        line = f"{customer}: {count} orders, {total:.2f} {currency}"
        line += f" (average {average:.2f}, largest {largest[customer]:.2f})"
        lines.append(line)
    if not lines:
        return "no orders"
    header = f"{len(lines)} customers, {sum(totals.values()):.2f} {currency} in all"
    return "\\n".join([header] + lines)


def print_summary(orders):
    text = summarize_orders(orders)
    for line in text.splitlines():
        print(line)
    return len(text.splitlines())
'''

PASSAGE_FILE = Path("/usr/share/common-licenses/GPL-3")


def tasks() -> dict[str, tuple[str, str]]:
    """name -> (the user's message, the start of the answer). The rename's answer is started with the renamed
    signature (prefilling the answer: a 135M model told only to rename tends to rewrite the code instead)."""
    passage = " ".join(PASSAGE_FILE.read_text().split("Preamble", 1)[1].split()[:330])
    return {
        "rename": ("Rewrite this Python code with the function summarize_orders renamed to customer_report. "
                   "Change nothing else.\n\n" + FUNCTION, "```python\ndef customer_report("),
        "summarise": ("Summarise the following passage, quoting its key sentences.\n\n" + passage, ""),
    }


def timed(llm: Llama, prompt: list[int], new_tokens: int, draft: str | None, k: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    result = llm.generate([prompt], max_new_tokens=new_tokens, draft=draft, num_speculative_tokens=k)[0]
    return time.perf_counter() - start, result.token_ids


def cpu_bench(args: argparse.Namespace) -> None:
    from llama.demo_model import ensure_demo_model

    torch.set_num_threads(args.threads)
    llm = Llama.from_pretrained(ensure_demo_model(), device="cpu", progress=False, compile=args.compile,
                                max_seq_len=2048)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"SmolLM2-135M-Instruct, float32, {args.threads} threads, compile={args.compile}, greedy, "
          f"{args.new_tokens} new tokens; torch {torch.__version__}")
    for name, (text, answer_start) in tasks().items():
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        prompt += llm.tokenizer.encode(answer_start, bos=False) if answer_start else []
        for k in ks:  # warm-up: compiles the verify shapes (k + 1 tokens a row) before anything is timed
            timed(llm, prompt, 16, "prompt-lookup", k)
        best: dict[int | None, float] = {}
        stats: dict[int, tuple[float, float]] = {}
        reference: list[int] | None = None
        for _ in range(args.repeats):
            for k in [None, *ks]:
                seconds, tokens = timed(llm, prompt, args.new_tokens, "prompt-lookup" if k else None, k or 4)
                if reference is None:
                    reference = tokens
                assert tokens == reference, f"{name}, k={k}: the text differs from plain greedy decoding"
                best[k] = min(best.get(k, float("inf")), seconds)
                if k:
                    s = llm.stats
                    stats[k] = (s.acceptance_rate or 0.0, s.decoded_tokens / max(s.decode_steps, 1))
        n = len(reference)
        print(f"\n{name}: prompt {len(prompt)} tokens, {n} new tokens (identical text in every run)")
        print(f"{'':>16} {'tok/s':>8} {'ratio':>7} {'accepted':>9} {'tok/step':>9}")
        plain = n / best[None]
        print(f"{'plain':>16} {plain:8.1f} {1.0:7.2f}")
        for k in ks:
            rate, per_step = stats[k]
            print(f"{f'lookup k={k}':>16} {n / best[k]:8.1f} {n / best[k] / plain:7.2f} {rate:9.0%} {per_step:9.2f}")
        if args.show:
            print(llm.tokenizer.decode(reference))


class Oracle:
    """Proposes exactly the tokens an earlier plain run chose (the machinery's cost at 100% acceptance)."""

    def __init__(self, reference: list[int], k: int):
        self.reference, self.k = reference, k

    def propose(self, owner: object, prompt: list[int], generated: list[int], k: int) -> list[int]:
        return self.reference[len(generated): len(generated) + k]


def gpu_bench(args: argparse.Namespace) -> None:
    from llama.config import ModelConfig
    from llama.generate import decode_step, verify_step

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig.from_hf_config(TINY if args.tiny else json.loads((CONFIGS / "llama-3.1-8b.json").read_text()))
    model = random_engine_model(config, device, dtype)
    llm = Llama(model, max_seq_len=1024, max_batch_size=1, compile=args.compile)
    k = args.k
    print(f"{'tiny' if args.tiny else 'Llama-3.1-8B shape'}, {dtype}, {device}, compile={args.compile}, k={k}; "
          f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))

    # (1) one verify step of k + 1 tokens beside one decode step, batch 1, at positions ~300
    llm._ensure_cache(1, 512)
    step = llm._decode_step
    verify = getattr(step, "verify", verify_step)
    position = 300
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    many = torch.zeros(1, k + 1, dtype=torch.long, device=device)
    at_one = torch.full((1, 1), position, device=device)
    at_many = (position + torch.arange(k + 1, device=device))[None]

    def decode() -> None:
        if step is decode_step:
            step(model, one, at_one, span=position + 1)
        else:
            step(model, one, at_one, True, span=position + 1)  # the step the scheduler runs: greedy, in the graph

    def verify_once() -> None:
        verify(model, many, at_many, span=position + k + 1)

    with torch.inference_mode():
        times = {name: time_calls(fn, device, args.calls) for name, fn in (("decode", decode),
                                                                             ("verify", verify_once),
                                                                             ("decode ", decode),
                                                                             ("verify ", verify_once))}
    decode_ms = min(times["decode"], times["decode "])
    verify_ms = min(times["verify"], times["verify "])
    print(f"decode step {decode_ms:.3f} ms; verify step of {k + 1} tokens {verify_ms:.3f} ms: "
          f"{verify_ms / decode_ms:.2f}x (target <= 1.25x)")

    # (2) the oracle proposer against plain decoding: prompt 128 + 256 new tokens, greedy
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
    new = args.new_tokens
    plain_s, plain = float("inf"), None
    for _ in range(args.repeats):  # the first run compiles
        seconds, plain, _ = run_scheduler(llm, prompt, new, None)
        plain_s = min(plain_s, seconds)
    agree = teacher_forced_agreement(llm, verify, prompt, plain, k)
    print(f"the plain run's tokens fed to verify steps of {k + 1}: the verify's argmax is the plain run's next token "
          f"at {agree:.1%} of positions (the rest: {dtype} rounding of a {k + 1}-row product vs a 1-row one)")
    # In bf16 the verify's choice can differ from the plain step's at a near-tie, and from there the two texts part:
    # the oracle is the speculative run's own text, found by running with the previous run's text until it repeats.
    reference, rounds = plain, 0
    for rounds in range(1, 6):
        _, tokens, rate = run_scheduler(llm, prompt, new, Oracle(reference, k))
        if tokens == reference:
            break
        reference = tokens
    oracle_s = min(run_scheduler(llm, prompt, new, Oracle(reference, k))[0] for _ in range(args.repeats))
    print(f"plain {new / plain_s:.1f} tok/s; oracle (k={k}) {new / oracle_s:.1f} tok/s: {plain_s / oracle_s:.2f}x "
          f"(target >= 3.2x); acceptance {rate:.0%} (oracle text found in {rounds} run(s); "
          f"{sum(a == b for a, b in zip(reference, plain))}/{new} tokens as the plain run's)")


def teacher_forced_agreement(llm: Llama, verify, prompt: list[int], plain: list[int], k: int) -> float:
    """The share of positions at which a verify step fed the plain run's own tokens chooses the plain run's next
    token (the cache still holds the plain run)."""
    device, agree, total = llm.device, 0, 0
    with torch.inference_mode():
        for i in range(0, len(plain) - k - 1, k + 1):
            tokens = torch.tensor([plain[i: i + k + 1]], device=device)
            at = (len(prompt) + i + torch.arange(k + 1, device=device))[None]
            chosen = verify(llm.model, tokens, at, span=len(prompt) + i + k + 1)[0].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(chosen, plain[i + 1: i + k + 2]))
            total += k + 1
    return agree / total


def time_calls(fn, device: torch.device, calls: int) -> float:
    """Milliseconds per call, after warm-up calls (the first compiles)."""
    for _ in range(3):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls * 1e3


def run_scheduler(llm: Llama, prompt: list[int], new_tokens: int, speculator) -> tuple[float, list[int], float]:
    """One request through the scheduler (as Llama.generate runs it): wall seconds, tokens, acceptance rate."""
    llm._ensure_cache(1, len(prompt) + new_tokens)
    scheduler = Scheduler(llm.model, llm._decode_step, None, [], seed=0, speculator=speculator)
    sync(llm.device)
    start = time.perf_counter()
    job = scheduler.submit(Request(prompt, new_tokens, ignore_eos=True))
    for _ in scheduler.run([job]):
        pass
    seconds = time.perf_counter() - start
    assert len(job.output.token_ids) == new_tokens
    return seconds, job.output.token_ids, scheduler.accepted_tokens / max(scheduler.proposed_tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU machinery figures (random weights)")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: a tiny model (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", default="2,3,4,6,8", help="CPU: the num_speculative_tokens to try")
    parser.add_argument("--k", type=int, default=4, help="GPU: num_speculative_tokens")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128, help="GPU: prompt tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="GPU: timed calls of each step")
    parser.add_argument("--show", action="store_true", help="CPU: print each task's answer")
    args = parser.parse_args()
    gpu_bench(args) if args.gpu else cpu_bench(args)


if __name__ == "__main__":
    main()
