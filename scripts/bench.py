"""Decode speed of the engine and of transformers, side by side, on the same random-weight model.

    python scripts/bench.py                          # GPU: Llama-3.1-8B shape, bf16, batch 1/16/64
    python scripts/bench.py --tiny --device cpu      # CPU smoke test of the script itself (no timing claims)
    torchrun --nproc-per-node 2 scripts/bench.py --config configs/llama-3.1-70b.json --systems ours,ours-compiled
                                                     # tensor parallel: the engine alone, split over 2 GPUs

Prints one table: tok/s of each system (wall time of prompt 128 + 256 new tokens, prefill included; with --repeats N
the median of N timed calls, each printed), the ratio to transformers' default generate, and the share of the
batch-1 bandwidth limit (bytes of weights read per token over a device-to-device copy rate measured in the same
run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import quant  # noqa: E402
from llama.api import Llama  # noqa: E402
from llama.config import ModelConfig  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.tp import TensorParallel, shutdown  # noqa: E402
from llama.weights import hf_to_engine_name, load_targets  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320, "head_dim": 16, "bos_token_id": 1, "eos_token_id": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads once each: all but the embedding table (only one row is read),
    quantized layers' buffers (weights, scales, minimums) included."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sum(t.numel() * t.element_size() for n, t in tensors
               if "embed" not in n and not n.startswith("rope.") and ".cache." not in n and ".cpu_" not in n)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (the practical memory ceiling)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.randn(2**30 // 2, dtype=torch.bfloat16, device=device)  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * x.element_size() * 20 / (time.perf_counter() - start)


def matmul_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 2 * 8192**3 * 20 / (time.perf_counter() - start)


def randomize_(model: torch.nn.Module, device: torch.device) -> None:
    """Norm weights 1, everything else normal(0, 0.02), from seed 0: the same values on every rank."""
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=generator)


def random_engine_model(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                        tensor_parallel: TensorParallel | None = None) -> Transformer:
    """The engine's model (or, under tensor parallelism, this rank's part of it) with random weights, built
    without transformers: a 70B model does not fit on one GPU. Every rank draws from the same seed, so the
    replicated weights (embeddings, norms, output) agree across ranks."""
    with torch.device("meta"):
        model = Transformer(tensor_parallel.local_config(config) if tensor_parallel else config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    randomize_(model, device)
    model.rope.reset_parameters()
    if tensor_parallel:
        tensor_parallel.attach(model)
    return model.eval()


def build_models(config_json: dict, device: torch.device, dtype: torch.dtype, with_hf: bool):
    """transformers' model with random weights, and the engine's model holding the very same values."""
    import transformers

    hf_config = transformers.LlamaConfig(**config_json)
    with torch.device("meta"):  # no memory, no slow initialisation: weights are drawn below, on the device
        hf = transformers.LlamaForCausalLM(hf_config)
    hf = hf.to(dtype).to_empty(device=device)
    randomize_(hf, device)
    with torch.device(device):  # to_empty left the rotary buffers uninitialised: build them afresh
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)
    hf.eval()

    ours = random_engine_model(ModelConfig.from_hf_config(config_json), device, dtype)
    targets = load_targets(ours)
    with torch.no_grad():  # then take transformers' values, so that both compute the same function
        for name, tensor in hf.state_dict().items():
            engine_name = hf_to_engine_name(name)
            if engine_name in targets:
                targets[engine_name].copy_(tensor)
    return (hf if with_hf else None), ours


def time_ours(llm: Llama, prompts: list[list[int]], new_tokens: int, sampling: dict, repeats: int = 1) -> list[float]:
    """tok/s of each of `repeats` timed generate calls, after a warm-up one."""
    llm.generate(prompts, max_new_tokens=new_tokens, **sampling)  # warm-up (and compilation)
    rates = []
    for _ in range(repeats):
        sync(llm.device)
        start = time.perf_counter()
        results = llm.generate(prompts, max_new_tokens=new_tokens, **sampling)
        sync(llm.device)
        elapsed = time.perf_counter() - start
        assert all(len(r.token_ids) == new_tokens for r in results)
        rates.append(len(prompts) * new_tokens / elapsed)
    return rates


def time_hf(hf, prompts: list[list[int]], new_tokens: int, sampling: dict, static: bool, repeats: int) -> list[float]:
    device = hf.device
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts], device=device)  # left-padded
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, attention_mask=mask, pad_token_id=0,
                   do_sample=sampling["temperature"] > 0)
    if options["do_sample"]:
        options.update(temperature=sampling["temperature"], top_k=sampling["top_k"])
    if static:
        options["cache_implementation"] = "static"
    with torch.inference_mode():
        for _ in range(2 if static else 1):  # warm-up (static: compile, then settle the graphs)
            hf.generate(ids, **options)
        rates = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            out = hf.generate(ids, **options)
            sync(device)
            rates.append(len(prompts) * new_tokens / (time.perf_counter() - start))
            assert out.shape[1] == length + new_tokens
    return rates


def quantization_of(system: str, group_size: int) -> tuple:
    """"ours-compiled" -> (), "ours-int8" -> ("int8", None), "ours-compiled-int4" -> ("int4", group_size),
    "ours-compiled-int4-g128" -> ("int4", 128)."""
    parts = system.split("-")
    if parts[-1].startswith("g") and parts[-2] == "int4":
        return "int4", int(parts[-1][1:])
    return {"int8": ("int8", None), "int4": ("int4", group_size)}.get(parts[-1], ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIGS / "llama-3.1-8b.json"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test of this script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--systems", default="hf,hf-static,ours,ours-compiled",
                        help="hf, hf-static, ours, ours-compiled; ours* may end in -int8, -int4, -int4-g128")
    parser.add_argument("--group-size", type=int, default=64, help="int4 systems' group size")
    parser.add_argument("--modes", default="greedy,sample", help="greedy, and/or sample (T=0.8, top-k 200)")
    parser.add_argument("--varied", action="store_true", help="also batch 64 with prompt lengths 64..512")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed generate calls per figure, after one warm-up; the table shows their median and "
                             "the printed rows every call (single calls vary 2-7%% on an H100: docs/benchmarks.md)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--no-pdl", action="store_true",
                        help="launch the engine's Triton kernels without programmatic dependent launch (to compare)")
    args = parser.parse_args()
    if args.no_pdl:
        import llama.kernels

        llama.kernels.PDL = False

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config_json = json.loads(Path(args.config).read_text())
    if args.tiny:
        config_json |= TINY
    systems = args.systems.split(",")
    tensor_parallel = TensorParallel.from_environment()  # under torchrun: the engine split over the ranks
    if tensor_parallel:
        if any(s.startswith("hf") for s in systems):
            parser.error("under torchrun only the engine is measured: --systems ours,ours-compiled")
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        hf = None
        model = random_engine_model(ModelConfig.from_hf_config(config_json), device, dtype, tensor_parallel)
        if tensor_parallel.rank != 0:
            sys.stdout = open(os.devnull, "w")
    else:
        hf, model = build_models(config_json, device, dtype, with_hf=any(s.startswith("hf") for s in systems))
    # Bytes one device reads per token: its own part of the layers plus the (replicated) output matrix.
    step_bytes = weight_bytes(model)
    bandwidth, flops = copy_bandwidth(device), matmul_flops(device)
    limit = bandwidth / step_bytes  # batch-1 tokens/s if every step reads each weight once and nothing else
    ranks = tensor_parallel.world_size if tensor_parallel else 1
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} x {ranks}, torch "
          f"{torch.__version__}, transformers {__import__('transformers').__version__}")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s per device, bf16 matmul {flops / 1e12:.0f} TFLOP/s, "
          f"non-embedding weights read per device {step_bytes / 1e9:.2f} GB -> batch-1 limit {limit:.1f} tok/s")
    if tensor_parallel:  # the ideal split: every weight read once, by one of the devices, all reading at once
        replicated = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                         if "norm" in n or n.startswith("lm_head"))
        model_bytes = (step_bytes - replicated) * ranks + replicated
        print(f"whole model's non-embedding weights {model_bytes / 1e9:.2f} GB over {ranks} devices -> "
              f"{ranks}-device limit {ranks * bandwidth / model_bytes:.1f} tok/s (ours, output matrix replicated: "
              f"{limit:.1f})")

    generator = torch.Generator().manual_seed(0)
    vocab = config_json["vocab_size"]
    workloads = [(f"batch {b}", [torch.randint(0, vocab, (args.prompt_len,), generator=generator).tolist()] * b)
                 for b in map(int, args.batch_sizes.split(","))]
    if args.varied:
        lengths = torch.linspace(64, 512, 64).long().tolist()
        workloads.append(("batch 64, lengths 64..512",
                          [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]))
    llms, models = {}, {(): model}
    for system in (s for s in systems if s.startswith("ours")):
        mode = quantization_of(system, args.group_size)
        if mode not in models:
            models[mode] = quant.quantize_model(model, quant.QuantizationConfig.make(*mode))
        llms[system] = Llama(models[mode], max_seq_len=1024, compile="compiled" in system)
    for llm in llms.values():
        llm.eos_token_ids = []  # random weights: run every row the full length

    rows = []
    modes = {"greedy": ("greedy", {"temperature": 0.0, "top_k": None}),
             "sample": ("sample T=0.8 k=200", {"temperature": 0.8, "top_k": 200})}
    for mode, sampling in (modes[m] for m in args.modes.split(",")):
        for name, prompts in workloads:
            row = {"workload": name, "mode": mode}
            for system in systems:
                try:
                    if system.startswith("hf"):
                        rates = time_hf(hf, prompts, args.new_tokens, sampling, system == "hf-static", args.repeats)
                    else:
                        rates = time_ours(llms[system], prompts, args.new_tokens, sampling, args.repeats)
                    row[system] = statistics.median(rates)
                    if args.repeats > 1:
                        row[f"{system} calls"] = [round(rate, 1) for rate in rates]
                except Exception as e:  # report and go on: one failing system must not hide the others
                    print(f"{system} {name} {mode}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    row[system] = float("nan")
                gc.collect()
            rows.append(row)
            print(json.dumps(row), flush=True)

    header = ["workload", "mode", *systems, "best ours / hf", "batch-1 limit share"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        ours_best = max((row[s] for s in systems if s.startswith("ours")), default=float("nan"))
        base = row.get("hf", float("nan"))
        share = ours_best / limit if row["workload"] == "batch 1" else float("nan")
        ratio = f"{ours_best / base:.2f}x" if base == base else ""  # (no transformers row: no ratio)
        cells = [row["workload"], row["mode"], *(f"{row[s]:.1f}" for s in systems), ratio,
                 f"{share:.0%}" if share == share else ""]
        print("| " + " | ".join(cells) + " |")
    if len(models) > 1 or set(systems) - {"hf", "hf-static", "ours", "ours-compiled"}:
        print("\n| system | weights read per step (GB) | batch-1 limit (tok/s) | batch 1 greedy | share of limit |")
        print("|---|---|---|---|---|")
        greedy = next((row for row in rows if row["workload"] == "batch 1" and row["mode"] == "greedy"), {})
        for system in (s for s in systems if s.startswith("ours")):
            nbytes = weight_bytes(models[quantization_of(system, args.group_size)])
            speed = greedy.get(system, float("nan"))
            print(f"| {system} | {nbytes / 1e9:.2f} | {bandwidth / nbytes:.1f} | {speed:.1f} | "
                  f"{speed * nbytes / bandwidth:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bandwidth": bandwidth, "flops": flops,
                                               "weight_bytes": step_bytes}, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
