"""A model larger than bf16 allows, quantized on one GPU: load time, peak GPU memory and batch-1 decode speed.

    python scripts/quantized_load.py --config configs/llama-3.1-70b.json --quantize int4 --prequantized
        random weights written as an int4 checkpoint (sharded safetensors, as `llama quantize` writes them: a bf16
        70B checkpoint, 141 GB, fits neither an 80 GB GPU nor the disk of the machine it ran on), loaded with
        `from_pretrained` and decoded compiled
    python scripts/quantized_load.py --config configs/llama-3.1-8b.json --quantize int4
        random weights written as a bf16 checkpoint (sharded), loaded with `quantize=`: quantized as it is read

The random weights are drawn on the GPU; a quantized layer's are drawn and quantized 8192 rows at a time, so
writing the int4 70B checkpoint never holds its dense weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import copy_bandwidth, randomize_, sync, weight_bytes  # noqa: E402

from llama import quant  # noqa: E402
from llama.api import Llama  # noqa: E402
from llama.config import ModelConfig  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.weights import save_quantized  # noqa: E402


@torch.no_grad()
def write_random_checkpoint(config_json: dict, folder: Path, quantization: quant.QuantizationConfig | None,
                            device: torch.device) -> None:
    """Norms 1, everything else normal(0, 0.02) (as bench.py draws them), written by save_quantized."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf_config(config_json)).to(torch.bfloat16)
        if quantization:
            quant.quantize_module_tree(model, quantization, torch.bfloat16)
    model = model.to_empty(device=device)
    randomize_(model, device)  # the dense parameters
    generator = torch.Generator(device=device).manual_seed(1)
    for layer in quant.quantized_layers(model).values():
        for start in range(0, layer.out_features, 8192):  # (a float32 block of at most 8192 rows at a time)
            rows = min(8192, layer.out_features - start)
            dense = torch.empty(rows, layer.in_features, device=device).normal_(0, 0.02, generator=generator)
            layer.load_rows_(start, dense)
    files = save_quantized(model, quantization, config_json, folder)
    print(f"wrote {len(files)} safetensors files, {sum(f.stat().st_size for f in files) / 1e9:.1f} GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-3.1-70b.json")
    parser.add_argument("--quantize", default="int4", choices=quant.MODES)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--prequantized", action="store_true", help="write the checkpoint already quantized")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder, removed)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script with a tiny --config")
    args = parser.parse_args()

    quantization = quant.QuantizationConfig.make(args.quantize, args.group_size)
    config_json = json.loads(Path(args.config).read_text())
    folder = Path(args.dir or tempfile.mkdtemp(prefix="quantized_load_"))
    start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    write_random_checkpoint(config_json, folder, quantization if args.prequantized else None, device)
    print(f"writing took {time.perf_counter() - start:.0f} s", flush=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    llm = Llama.from_pretrained(folder, device=device, progress=False, max_seq_len=1024, compile=not args.no_compile,
                                quantize=None if args.prequantized else args.quantize,
                                group_size=None if args.prequantized else args.group_size)
    loaded = time.perf_counter() - start
    peak = (lambda: torch.cuda.max_memory_allocated() / 2**30) if cuda else (lambda: float("nan"))
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else float("nan")
    print(f"loaded in {loaded:.0f} s ({'prequantized' if args.prequantized else 'quantized while read'}); "
          f"model {quant.held_bytes(llm.model) / 2**30:.1f} GiB on the device, peak while loading "
          f"{peak():.1f} GiB of {total:.0f} GiB", flush=True)
    llm.eos_token_ids = []
    prompt = torch.randint(0, config_json["vocab_size"], (128,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    llm.generate([prompt], max_new_tokens=args.new_tokens)  # warm-up (and compilation)
    print(f"first generate (compiles) {time.perf_counter() - start:.0f} s", flush=True)
    sync(device)
    start = time.perf_counter()
    llm.generate([prompt], max_new_tokens=args.new_tokens)
    sync(device)
    speed = args.new_tokens / (time.perf_counter() - start)
    nbytes, bandwidth = weight_bytes(llm.model), copy_bandwidth(device)
    print(f"batch 1, prompt 128 + {args.new_tokens} new tokens: {speed:.1f} tok/s; weights read per step "
          f"{nbytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e9:.0f} GB/s -> limit {bandwidth / nbytes:.1f} tok/s, "
          f"{speed * nbytes / bandwidth:.0%} of it; peak GPU memory {peak():.1f} GiB")
    if not args.dir:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
