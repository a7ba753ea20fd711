"""CPU decode speed of the engine on the SmolLM2 demo model, 2 threads: dense, int8 or int4, eager or compiled.

    python scripts/cpu_decode.py                          # float32, eager
    python scripts/cpu_decode.py --quantize int8 --compile
    python scripts/cpu_decode.py --quantize int4 --group-size 32 --compile

Prints prefill and decode tok/s of 128 new tokens (after a 32-token warm-up, which also compiles); compare with
`../shared/tools/llama-cpp-anchor.sh bench` run just before or after, with nothing else using the CPUs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama.api import Llama  # noqa: E402
from llama.demo_model import ensure_demo_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = Llama.from_pretrained(ensure_demo_model(), device="cpu", progress=False, quantize=args.quantize,
                                group_size=args.group_size, compile=args.compile, max_seq_len=512)
    llm.eos_token_ids = []  # decode the full length
    prompt = "Write a short story about a robot who learns to paint."
    start = time.perf_counter()
    llm.generate(prompt, max_new_tokens=32)
    print(f"warm-up {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for _ in range(2):
        llm.generate(prompt, max_new_tokens=args.new_tokens)
        print(f"{args.quantize or 'float32'}{' compiled' if args.compile else ''}: {llm.stats.summary()}")


if __name__ == "__main__":
    main()
