"""Decode speed of the same short answer with the cache sized for a short and for a long max_new_tokens.

    python scripts/decode_length.py                             # CPU: the demo model (SmolLM2-135M), float32
    python scripts/decode_length.py --compile
    python scripts/decode_length.py --device cuda [--compile]   # Llama-3.1-8B shape, random bf16 weights

`Llama.generate` allocates the KV cache for len(prompt) + max_new_tokens positions (rounded up to a power of two),
so an answer of 32 tokens is decoded over a cache of 256 slots with max_new_tokens 100 and of 8,192 with 8,000.
Both decode the same tokens (in float32; in bf16 another cache length can change the order of a sum and so a
near-tie of random weights); a step that reads only the slots in use costs the same in both (issue 12: within
10%). Prints the decode tok/s of each (best of --repeats, the sizes alternating, after a warm-up that also
compiles) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import random_engine_model  # noqa: E402

from llama.api import Llama  # noqa: E402
from llama.config import ModelConfig  # noqa: E402
from llama.scheduler import Request, Scheduler  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load(device: torch.device, compile: bool, config: str | None, max_seq_len: int) -> tuple[Llama, list[int]]:
    """The demo model and a chat question on a CPU; a random-weight model (config.json) and 128 random prompt
    tokens on a GPU, or wherever --config is given."""
    if config is None and device.type == "cpu":
        from llama.demo_model import ensure_demo_model

        llm = Llama.from_pretrained(ensure_demo_model(), device=device, progress=False, compile=compile,
                                    max_seq_len=max_seq_len)
        messages = [{"role": "user", "content": "Tell me about the history of Paris."}]
        return llm, llm.tokenizer.encode_chat(messages)
    config_json = json.loads(Path(config or CONFIGS / "llama-3.1-8b.json").read_text())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_engine_model(ModelConfig.from_hf_config(config_json), device, dtype)
    prompt = torch.randint(0, config_json["vocab_size"], (128,), generator=torch.Generator().manual_seed(0))
    return Llama(model, max_seq_len=max_seq_len, compile=compile), prompt.tolist()


def decode(llm: Llama, prompt: list[int], max_new_tokens: int, answer_tokens: int,
           whole_cache: bool = False) -> tuple[float, list[int]]:
    """Greedy decoding of `answer_tokens` tokens with the cache `generate` allocates for `max_new_tokens` (the
    loop `generate` runs, stopped after the answer): decode tok/s (the prefill excluded) and the tokens. With
    `whole_cache`, each step is not told the slots in use and reads the whole cache, as before issue 12."""
    llm._release_cache()
    llm._ensure_cache(1, len(prompt) + max_new_tokens)  # (rounded up to a power of two)
    step = llm._decode_step
    if whole_cache:
        def step(*args, span=None, **kwargs):
            return llm._decode_step(*args, **kwargs)
    scheduler = Scheduler(llm.model, step, None, [])
    job = scheduler.submit(Request(prompt, max_new_tokens))
    while not job.received:  # the prefill's token
        scheduler.step()
    start, first = time.perf_counter(), job.received
    while job.received < answer_tokens:
        scheduler.step()
    elapsed = time.perf_counter() - start
    scheduler.cancel(job)
    return (job.received - first) / elapsed, job.output.token_ids[:answer_tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--config", help="a config.json for a random-weight model (default on a GPU: Llama-3.1-8B)")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", default="100,8000", help="the cache sizes to compare, short first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--whole-cache", action="store_true", help="steps read the whole cache (before issue 12)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths = [int(n) for n in args.max_new_tokens.split(",")]
    # room for the prompt (at most 128 tokens here) and the longest cache
    llm, prompt = load(device, args.compile, args.config, max_seq_len=192 + max(lengths))
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} CPU threads, compile={args.compile}, "
          f"{'whole cache read, ' if args.whole_cache else ''}prompt "
          f"{len(prompt)} tokens, answer {args.answer_tokens} tokens", flush=True)

    warm_up = {}
    for max_new_tokens in lengths:  # the first run of each cache size compiles for it (with --compile)
        start = time.perf_counter()
        decode(llm, prompt, max_new_tokens, args.answer_tokens, args.whole_cache)
        warm_up[max_new_tokens] = time.perf_counter() - start
    # The sizes alternate, so that a slow spell of a shared machine slows both; the best run of each counts.
    cache_length = {}
    for max_new_tokens in lengths:
        llm._release_cache()
        llm._ensure_cache(1, len(prompt) + max_new_tokens)
        cache_length[max_new_tokens] = llm._cache_shape[1]
    runs: dict[int, list[tuple[float, list[int]]]] = {n: [] for n in lengths}
    for _ in range(args.repeats):
        for max_new_tokens in lengths:
            runs[max_new_tokens].append(decode(llm, prompt, max_new_tokens, args.answer_tokens, args.whole_cache))
    for max_new_tokens, measured in runs.items():
        print(f"max_new_tokens {max_new_tokens:>6}: cache of {cache_length[max_new_tokens]} positions, decode "
              f"{max(r[0] for r in measured):.1f} tok/s (best of {args.repeats}: "
              f"{', '.join(f'{r[0]:.1f}' for r in measured)}; warm-up {warm_up[max_new_tokens]:.1f} s)")
    short, long = runs[lengths[0]], runs[lengths[-1]]
    same = "the same tokens" if short[0][1] == long[0][1] else "DIFFERENT tokens"
    print(f"ratio {lengths[-1]} / {lengths[0]}: {max(r[0] for r in long) / max(r[0] for r in short):.3f} ({same})")


if __name__ == "__main__":
    main()
