"""Serving benchmark: M concurrent clients stream completions from the engine's OpenAI-compatible server.

    pip install --no-index --find-links .wheels starlette uvicorn httptools uvloop httpx  # GPU (offline): carry .wheels
    python scripts/bench_serve.py --compare          # GPU: Llama-3.1-8B shape, random bf16 weights, compiled
    python scripts/bench_serve.py --tiny --device cpu --clients 1,4 --requests 2 --prompt-len 8,16 --answer-len 4,8
                                                     # CPU smoke test of the script itself (no timing claims)
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --vocab-size 128256
                                                     # the clients alone, against a server already running

The server runs in this process, in a thread (`llama.server.make_app` over a random-weight model built as
scripts/bench.py builds it: no checkpoint is written), and the clients in a child process, so that parsing
thousands of server-sent events a second does not take the interpreter lock from the server's decode loop.

M clients send clients x `--requests` requests, each client the next one as soon as its last is answered (a closed
loop): prompts of random token ids and answer lengths drawn from a seeded uniform distribution, `ignore_eos` so that
every answer has exactly `max_tokens` tokens. A warm-up round (untimed, one request per client) comes first, so that
compilation for the batch sizes the run visits is not timed. Per request it records the time to the first token
and the gaps between the chunks that follow, each divided over the tokens the chunk carried (the answer's
`completion_tokens`, from `usage`, is what is counted). Printed per number of clients: output tok/s (all answer
tokens over the wall time from the first request sent to the last answer finished), requests/s, time to first
token and inter-token latency (p50, p99, mean).

`--compare` also measures, on the same model in the same process before the server starts, the static figures the
issue compares against: scripts/bench.py's batch-64 `generate` (prompt 128 + 256 new tokens, warm-up then timed)
and batch-1 decode's time per token, and prints the two targets: the largest client count's output tok/s at least
0.80 of the static batch's, and one client's mean inter-token latency at most 1.10 of batch-1 decode's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_THROUGHPUT = 0.80  # server output tok/s / static batch's tok/s, at least
TARGET_LATENCY = 1.10  # one client's mean inter-token latency / batch-1 decode's time per token, at most


# ---------------------------------------------------------------------------- the clients (no torch here)
@dataclass
class RequestRecord:
    prompt_tokens: int
    max_tokens: int
    sent: float  # perf_counter seconds
    finished: float = 0.0
    first_token: float = 0.0  # time to first token, seconds after `sent`
    completion_tokens: int = 0  # from the answer's usage
    gaps: list[float] = field(default_factory=list)  # one inter-token latency per token after the first chunk's


@dataclass
class Chunk:
    arrival: float  # perf_counter seconds
    listed: int | None  # token ids the chunk lists (`token_ids`, or `logprobs.tokens`); None: it lists none
    bare_finish: bool  # no text and a finish_reason: a closing chunk, which may or may not carry a token


def parse_chunk(payload: dict, arrival: float) -> Chunk | None:
    """A streamed chunk with a choice; None for one without (the closing usage chunk)."""
    choices = payload.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    listed = next((len(ids) for ids in (choice.get("token_ids"), (choice.get("logprobs") or {}).get("tokens"))
                   if isinstance(ids, list)), None)
    return Chunk(arrival, listed, not choice.get("text") and choice.get("finish_reason") is not None)


def tokens_per_chunk(chunks: list[Chunk], completion_tokens: int) -> list[int]:
    """The tokens each chunk carried, adding up to the answer's `completion_tokens` (from usage): the ids a chunk
    lists, else one each, with or without a bare closing chunk, whichever adds up; otherwise (a server that sends
    several tokens' text in one chunk without their ids) the tokens spread as evenly as whole numbers allow."""
    each = [1 if c.listed is None else c.listed for c in chunks]
    if sum(each) == completion_tokens:
        return each
    closing_empty = [0 if c.bare_finish and c.listed is None else n for c, n in zip(chunks, each)]
    if sum(closing_empty) == completion_tokens:
        return closing_empty
    carriers = [i for i, n in enumerate(closing_empty) if n] or list(range(len(chunks)))
    share, extra = divmod(completion_tokens, len(carriers))
    counts = [0] * len(chunks)
    for rank, i in enumerate(carriers):
        counts[i] = share + (rank < extra)
    return counts


async def stream_completion(client, url: str, model: str, prompt: list[int], max_tokens: int) -> RequestRecord:
    """One streamed completion, timed chunk by chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    record = RequestRecord(len(prompt), max_tokens, sent=time.perf_counter())
    chunks: list[Chunk] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"POST {url}/v1/completions: HTTP {response.status_code}: {text[:500]}")
        async for line in response.aiter_lines():
            now = time.perf_counter()  # before parsing: the chunk's arrival is what is timed
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            payload = json.loads(data)
            usage = payload.get("usage") or usage
            if chunk := parse_chunk(payload, now):
                chunks.append(chunk)
    record.finished = time.perf_counter()
    if not usage:
        raise RuntimeError("the stream ended without usage (asked for with stream_options.include_usage)")
    record.completion_tokens = usage["completion_tokens"]
    if record.completion_tokens != max_tokens:
        raise RuntimeError(f"an answer has {record.completion_tokens} tokens where max_tokens={max_tokens} "
                           f"(ignore_eos: true asks for exactly max_tokens)")
    arrivals = [(c.arrival, n) for c, n in zip(chunks, tokens_per_chunk(chunks, max_tokens)) if n]
    if not arrivals:
        raise RuntimeError("the stream carried no token")
    record.first_token = arrivals[0][0] - record.sent
    for (before, _), (after, count) in zip(arrivals, arrivals[1:]):
        record.gaps += [(after - before) / count] * count
    return record


def draw_requests(count: int, prompt_len: tuple[int, int], answer_len: tuple[int, int], vocab_size: int,
                  seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) for `count` requests: lengths uniform over each inclusive range."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))]
        requests.append((prompt, rng.randint(*answer_len)))
    return requests


async def closed_loop(url: str, model: str, requests: list[tuple[list[int], int]],
                      clients: int) -> list[RequestRecord]:
    """`clients` concurrent clients, each sending the next request of the list as soon as its last one is answered,
    until none is left. (A shared list rather than a fixed share per client: the run then drains over one answer at
    its end, not over the spread between the clients' totals.)"""
    import httpx

    pending = iter(requests)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as client:
        async def one_client() -> list[RequestRecord]:
            return [await stream_completion(client, url, model, prompt, n) for prompt, n in pending]

        per_client = await asyncio.gather(*(one_client() for _ in range(clients)))
    return [record for records in per_client for record in records]


def spread(args: argparse.Namespace, requests: list[tuple[list[int], int]], clients: int) -> list[RequestRecord]:
    """The closed loop, its clients and requests dealt out over `args.processes` processes (perf_counter is the
    system's monotonic clock, so their times compare)."""
    processes = min(args.processes, clients)
    if processes == 1:
        return run_loop(closed_loop(args.url, args.served_model_name, requests, clients))
    from concurrent.futures import ProcessPoolExecutor

    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        parts = pool.map(closed_loop_process, [args.url] * processes, [args.served_model_name] * processes,
                         [requests[i::processes] for i in range(processes)], shares)
        return [record for part in parts for record in part]


def closed_loop_process(url: str, model: str, requests: list[tuple[list[int], int]],
                        clients: int) -> list[RequestRecord]:
    return run_loop(closed_loop(url, model, requests, clients))


def run_loop(coroutine):
    """asyncio.run, on uvloop's faster event loop where it is installed (the GPU machine has it)."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    return uvloop.run(coroutine) if hasattr(uvloop, "run") else asyncio.run(coroutine)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    values = sorted(values)
    rank = (len(values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def summarize(clients: int, records: list[RequestRecord]) -> dict:
    wall = max(r.finished for r in records) - min(r.sent for r in records)
    tokens = sum(r.completion_tokens for r in records)
    first = [r.first_token for r in records]
    gaps = [gap for r in records for gap in r.gaps]
    return {"clients": clients, "requests": len(records), "seconds": wall, "output_tokens": tokens,
            "output_tok_s": tokens / wall, "requests_s": len(records) / wall,
            "prompt_tokens_mean": sum(r.prompt_tokens for r in records) / len(records),
            "ttft_p50": percentile(first, 50), "ttft_p99": percentile(first, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
            "itl_mean": sum(gaps) / len(gaps) if gaps else float("nan")}


def run_clients(args: argparse.Namespace) -> list[dict]:
    """For each number of clients: a warm-up round, then the timed closed loop. Prints a table, returns its rows."""
    rows = []
    for level, clients in enumerate(args.clients):
        seed = args.seed + 1000 * level
        warmup = draw_requests(clients * args.warmup, args.prompt_len, args.answer_len, args.vocab_size, seed)
        timed = draw_requests(clients * args.requests, args.prompt_len, args.answer_len, args.vocab_size, seed + 1)
        if warmup:
            spread(args, warmup, clients)
        records = spread(args, timed, clients)
        rows.append(summarize(clients, records))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| clients | requests | output tok/s | requests/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | "
          "ITL p99 (ms) | ITL mean (ms) |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['output_tok_s']:.1f} | {row['requests_s']:.2f} | "
              + " | ".join(f"{row[k] * 1e3:.2f}" for k in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "itl_mean"))
              + " |", flush=True)
    return rows


# ---------------------------------------------------------------------------- the server and the static figures
def make_server_app(llm, args: argparse.Namespace):
    """The server's Starlette app over an already-built model (its engine is run by this script's main thread)."""
    from llama.server import make_app

    return make_app(llm, served_model_name=args.served_model_name, max_batch_size=args.max_batch_size)


def start_server(app, host: str) -> tuple[object, threading.Thread, str]:
    """uvicorn serving `app` from a thread of this process, on a free port; returns (server, thread, url) once the
    app answers GET /health with 200."""
    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped before it started listening (its error is above)")
        time.sleep(0.05)
    url = f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    deadline = time.perf_counter() + 600
    while (status := httpx.get(f"{url}/health").status_code) != 200:
        if time.perf_counter() > deadline or not thread.is_alive():
            why = "after 10 minutes" if thread.is_alive() else "and the server stopped"
            raise RuntimeError(f"GET {url}/health answers {status} {why}")
        time.sleep(0.1)
    return server, thread, url


def static_figures(llm, args: argparse.Namespace, batch: int) -> dict:
    """scripts/bench.py's static batch (prompt 128 + 256 new tokens, greedy: warm-up, then timed) in tok/s, and
    batch-1 decode's time per token (llm.stats of one 256-token answer, after a warm-up)."""
    import torch
    from bench import time_ours

    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, args.vocab_size, (args.static_prompt_len,), generator=generator).tolist()
               for _ in range(batch)]
    greedy = {"temperature": 0.0, "top_k": None}
    batch_tok_s, = time_ours(llm, prompts, args.static_new_tokens, greedy)
    for _ in range(2):  # warm-up (batch 1 compiles its own graph), then the measured answer
        llm.generate(prompts[:1], max_new_tokens=args.static_new_tokens, **greedy)
    stats = llm.stats
    return {"batch": batch, "batch_tok_s": batch_tok_s, "batch1_itl": stats.decode_seconds / stats.decode_steps}


def scheduler_alone(scheduler, requests: list[tuple[list[int], int]], in_flight: int) -> float:
    """Output tok/s of the closed-loop workload run on the scheduler directly (no HTTP, no second thread): what
    the server could reach. Run twice: the first visits the batch sizes (compiling for them)."""
    from llama.scheduler import Request

    for _ in range(2):
        pending, live, tokens = iter(requests), set(), 0

        def submit_next() -> None:
            for prompt, max_tokens in pending:
                live.add(scheduler.submit(Request(prompt, max_tokens, ignore_eos=True)))
                return

        for _ in range(in_flight):
            submit_next()
        start = time.perf_counter()
        while live:
            for update in scheduler.step():
                if update.finish_reason:
                    live.discard(update.job)
                    tokens += update.tokens
                    submit_next()
        elapsed = time.perf_counter() - start
    return tokens / elapsed


def timing_steps(engine) -> list[tuple[float, str]]:
    """From now on, each of the engine's scheduler steps that takes over 0.2 s (a compilation or a graph recorded
    during the run, say) is appended to the list returned: its seconds, and what it was."""
    scheduler = engine.scheduler
    slow, step = [], scheduler.step

    def timed():
        start, steps, rows, waiting = time.perf_counter(), scheduler.decode_steps, max(scheduler.running, default=-1), \
            len(scheduler.waiting)
        updates = step()
        if (seconds := time.perf_counter() - start) > 0.2:
            kind = "decode" if scheduler.decode_steps > steps else "prefill"
            slow.append((seconds, f"{kind}: highest row {rows} before, {waiting} waiting, highest row "
                                  f"{max(scheduler.running, default=-1)} after"))
        return updates

    engine.scheduler.step = timed
    return slow


ADMISSIONS = {  # how new requests are prefilled: (from CUDA graphs, inside a decode step, steps a lone one waits)
    "launched": (False, False, 0),  # apart, their kernels launched one by one
    "apart": (True, False, 0),  # apart, replayed from a CUDA graph of their bucket (api.PrefillGraphs)
    "grouped": (True, False, 8),  # apart, from a graph; a lone one waits up to 8 steps for company (Scheduler.hold)
    "joined": (True, True, 0),  # inside the next decode step, from a graph (model.Joining); `llama serve`'s on a GPU
}


def admit(llm, scheduler, admission: str) -> None:
    graphs, join, hold = ADMISSIONS[admission]
    if hasattr(llm._decode_step, "prefill_graphs"):
        prefill = llm._decode_step.prefill_graphs
        prefill.max_tokens = prefill.MAX_TOKENS if graphs else 0
    scheduler.join = join and scheduler.device.type == "cuda"
    scheduler.hold = hold


def client_command(args: argparse.Namespace, url: str, json_path: str, processes: int) -> list[str]:
    """This script, as the clients alone against `url`, with this run's workload flags."""
    pair = "{},{}".format
    return [sys.executable, __file__, "--url", url, "--vocab-size", str(args.vocab_size), "--processes", str(processes),
            "--served-model-name", args.served_model_name, "--clients", ",".join(map(str, args.clients)),
            "--requests", str(args.requests), "--warmup", str(args.warmup), "--prompt-len", pair(*args.prompt_len),
            "--answer-len", pair(*args.answer_len), "--seed", str(args.seed), "--json", json_path]


def serve_and_measure(args: argparse.Namespace) -> None:
    import torch
    from bench import CONFIGS, TINY, random_engine_model  # (scripts/ is on sys.path: this script lives there)

    from llama.api import Llama  # (importing bench put the repository on sys.path)
    from llama.config import ModelConfig

    config_json = json.loads(Path(args.config or CONFIGS / "llama-3.1-8b.json").read_text())
    if args.tiny:
        config_json |= TINY
    args.vocab_size = config_json["vocab_size"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile = device.type == "cuda" if args.compile is None else args.compile
    model = random_engine_model(ModelConfig.from_hf_config(config_json), device, dtype)
    llm = Llama(model, tokenizer=None, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
                compile=compile)
    llm.eos_token_ids = []  # random weights: every answer runs its full length (the server's ignore_eos as well)
    # The server's cache from the start, so that the static runs and the server share one cache and the compiled
    # graphs made for it (a decode step reads each row's positions only, so the cache's length costs no time)
    llm._ensure_cache(args.max_batch_size, args.max_seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {config_json['num_hidden_layers']} layers, "
          f"hidden {config_json['hidden_size']}, {dtype}, {'compiled' if compile else 'eager'}", flush=True)
    http = [f"{p} {'yes' if importlib.util.find_spec(p) else 'no'}" for p in ("httptools", "uvloop")]
    print(f"uvicorn {__import__('uvicorn').__version__}, {', '.join(http)} (uvicorn uses them when present)",
          flush=True)

    app = make_server_app(llm, args)
    if args.fewest_rows:
        app.state.engine.scheduler.GPU_FEWEST_ROWS = args.fewest_rows
    app.state.engine.scheduler.warm_up(lambda line: print(line, flush=True))  # (as `llama serve` does)
    server, thread, url = start_server(app, args.host)
    # (everything that runs the model runs on this, the main, thread, as under `llama serve`: see llama.server.serve)
    static = static_figures(llm, args, max(args.clients)) if args.compare else None
    if static:
        print(json.dumps(static), flush=True)
        # The same workload without HTTP: the scheduler stepped directly, a new request as soon as one finishes
        requests = draw_requests(max(args.clients) * args.requests, args.prompt_len, args.answer_len,
                                 args.vocab_size, args.seed + 1)
        for admission in args.admission:
            admit(llm, app.state.engine.scheduler, admission)
            alone = scheduler_alone(app.state.engine.scheduler, requests, max(args.clients))
            static[f"scheduler_tok_s_{admission}"] = static["scheduler_tok_s"] = alone
            print(f"scheduler alone, {max(args.clients)} requests in flight, admission {admission}: {alone:.1f} "
                  f"tok/s ({alone / static['batch_tok_s']:.2f} of the static batch's)", flush=True)
    print(f"serving at {url}", flush=True)
    scheduler = app.state.engine.scheduler
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        json_path = str(Path(folder) / "clients.json")
        try:
            for admission, (processes, interval) in itertools.product(args.admission, args.variants):
                admit(llm, scheduler, admission)
                sys.setswitchinterval(interval)  # (how soon a thread waiting for the interpreter lock gets it)
                print(f"admission {admission}; clients in {processes} process(es); the server's switch interval "
                      f"{interval * 1e3:g} ms", flush=True)
                steps, tokens, start = scheduler.decode_steps, scheduler.decoded_tokens, time.perf_counter()
                slow = timing_steps(app.state.engine)
                clients = subprocess.Popen(client_command(args, url, json_path, processes))
                app.state.engine.run(until=lambda: clients.poll() is not None)  # (serving while the clients run)
                if clients.returncode != 0:
                    sys.exit(f"the clients failed (exit code {clients.returncode}; their error is above)")
                steps, tokens = scheduler.decode_steps - steps, scheduler.decoded_tokens - tokens
                print(f"engine, warm-ups included: {tokens / (time.perf_counter() - start):.0f} tok/s decoded, "
                      f"{tokens / max(steps, 1):.1f} rows per decode step; {len(slow)} steps over 0.2 s "
                      f"(compiling, recording graphs), {sum(seconds for seconds, _ in slow):.1f} s together",
                      flush=True)
                for seconds, what in slow[:12]:
                    print(f"  {seconds:.2f} s, {what}", flush=True)
                rows = json.loads(Path(json_path).read_text())["rows"]
                runs.append({"admission": admission, "client_processes": processes, "switch_interval": interval,
                             "rows": rows})
                if static:
                    compare(rows, static)
        finally:
            server.should_exit = True
            thread.join(timeout=60)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "static": static}, indent=1))


def compare(rows: list[dict], static: dict) -> None:
    """The server's figures beside the static ones, and the issue's two targets."""
    print("\n| figure | server | static | server / static | target | |\n|---|---|---|---|---|---|")
    most = max(rows, key=lambda row: row["clients"])
    ratio = most["output_tok_s"] / static["batch_tok_s"]
    print(f"| output tok/s: {most['clients']} clients / static batch {static['batch']} | {most['output_tok_s']:.1f} | "
          f"{static['batch_tok_s']:.1f} | {ratio:.2f} | >= {TARGET_THROUGHPUT:.2f} | "
          f"{'pass' if ratio >= TARGET_THROUGHPUT else 'FAIL'} |")
    single = next((row for row in rows if row["clients"] == 1), None)
    if single:
        ratio = single["itl_mean"] / static["batch1_itl"]
        print(f"| inter-token latency (ms): 1 client, mean / batch-1 decode | {single['itl_mean'] * 1e3:.2f} | "
              f"{static['batch1_itl'] * 1e3:.2f} | {ratio:.2f} | <= {TARGET_LATENCY:.2f} | "
              f"{'pass' if ratio <= TARGET_LATENCY else 'FAIL'} |")


# ---------------------------------------------------------------------------- command line
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="model shape (default configs/llama-3.1-8b.json)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test of this script)")
    parser.add_argument("--device", help="default cuda if present, else cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on a GPU")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the server's (and cache's) rows")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--clients", default="1,64", help="numbers of concurrent clients, one run each")
    parser.add_argument("--requests", type=int, default=8,
                        help="timed requests per client (the run sends clients x this, back to back)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per client first")
    parser.add_argument("--prompt-len", default="64,256", help="prompt tokens: min,max (uniform)")
    parser.add_argument("--answer-len", default="128,384", help="answer tokens (max_tokens): min,max (uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="also the static batch and batch-1 figures")
    parser.add_argument("--static-prompt-len", type=int, default=128)
    parser.add_argument("--static-new-tokens", type=int, default=256)
    parser.add_argument("--url", help="load-test the server already running here (no model is built)")
    parser.add_argument("--vocab-size", type=int, help="with --url: prompt token ids are drawn below this")
    parser.add_argument("--served-model-name", default="random", help="the requests' `model`")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--variants", default="1:0.005",
                        help="runs in turn, PROCESSES:SECONDS,...: the clients spread over this many processes (one "
                             "Python process parses ~10k chunks/s at most), the server's sys.setswitchinterval")
    parser.add_argument("--admission", default="joined",
                        help=f"how new requests are prefilled, {', '.join(ADMISSIONS)} (see ADMISSIONS); "
                             "several, comma-separated: the server runs with each in turn (and with --compare, "
                             "the scheduler alone first, once with each)")
    parser.add_argument("--fewest-rows", type=int, help="the server's decode steps of more than one row run at least "
                        "this many (Scheduler.GPU_FEWEST_ROWS, default 8): fewer batch sizes to compile first, ~90 s "
                        "each for the 8B shape on an H100")
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)  # (a client run's, internal)
    args = parser.parse_args()

    def counts(flag: str, text: str, size: int | None) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or (size and len(values) != size) or min(values) < 1:
            parser.error(f"{flag} {text!r}: expected {f'{size} ' if size else ''}whole numbers >= 1, "
                         f"comma-separated")
        if size == 2 and values[0] > values[1]:
            parser.error(f"{flag} {text!r}: min > max")
        return values

    args.clients = counts("--clients", args.clients, None)
    try:
        args.variants = [(int(p), float(s)) for p, s in (pair.split(":") for pair in args.variants.split(","))]
    except ValueError:
        parser.error(f"--variants {args.variants!r}: expected PROCESSES:SECONDS pairs, comma-separated")
    args.admission = args.admission.split(",")
    if not set(args.admission) <= set(ADMISSIONS):
        parser.error(f"--admission {','.join(args.admission)!r}: expected {', '.join(ADMISSIONS)}, comma-separated")
    args.prompt_len = counts("--prompt-len", args.prompt_len, 2)
    args.answer_len = counts("--answer-len", args.answer_len, 2)
    for flag in ("requests", "max_batch_size", "max_seq_len", "static_prompt_len", "static_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.url:
        if args.compare or args.tiny:
            parser.error("--url measures a running server: --compare and --tiny build a model of their own")
        if not args.vocab_size:
            parser.error("--url needs --vocab-size (the prompts are random token ids below it)")
        import httpx

        try:
            rows = run_clients(args)
        except (OSError, httpx.HTTPError, RuntimeError) as e:  # no server there, a broken stream, an HTTP error
            sys.exit(f"bench_serve.py: error: --url {args.url}: {type(e).__name__}: {e}")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
        return
    for package in ("starlette", "uvicorn", "httpx"):  # checked before the model is built (minutes on a GPU)
        try:
            __import__(package)
        except ImportError:
            parser.error(f"{package} is not installed: pip install starlette uvicorn httpx (on a machine without a "
                         f"network: pip install --no-index --find-links .wheels starlette uvicorn httpx)")
    if args.prompt_len[1] + args.answer_len[1] > args.max_seq_len:
        parser.error(f"--prompt-len max + --answer-len max = {args.prompt_len[1] + args.answer_len[1]}: more "
                     f"than --max-seq-len {args.max_seq_len}")
    if args.compare and args.static_prompt_len + args.static_new_tokens > args.max_seq_len:
        parser.error("--static-prompt-len + --static-new-tokens: more than --max-seq-len")
    serve_and_measure(args)


if __name__ == "__main__":
    main()
