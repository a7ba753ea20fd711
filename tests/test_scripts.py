"""The benchmark script runs end to end on a tiny model on CPU (a smoke test: no speed is asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_on_a_tiny_model_and_prints_its_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--device", "cpu", "--systems",
         "hf,ours,ours-compiled", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "3", "--json",
         str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| batch")]
    assert len(table) == 4  # 2 batch sizes x (greedy, sampled)
    assert "nan" not in "".join(table)  # every system produced a figure
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    for row in rows:  # each figure is the median of its 3 timed calls (printed to 0.1 tok/s)
        for system in ("hf", "ours", "ours-compiled"):
            calls = row[f"{system} calls"]
            assert len(calls) == 3 and abs(row[system] - statistics.median(calls)) <= 0.05, (system, row)


def test_bench_runs_split_over_two_ranks(tmp_path):
    """The tensor-parallel mode of the benchmark (the engine alone under torchrun), smoke-tested with gloo."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         str(ROOT / "scripts" / "bench.py"), "--tiny", "--device", "cpu", "--systems", "ours,ours-compiled",
         "--batch-sizes", "1", "--new-tokens", "4"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2, torch" in result.stdout  # printed once, by rank 0
    table = [line for line in result.stdout.splitlines() if line.startswith("| batch")]
    assert len(table) == 2 and "nan |" not in "".join(line.split("nanx")[0] for line in table)


def test_decode_length_decodes_the_same_tokens_with_a_short_and_a_long_cache(smollm2_dir, tmp_path):
    """scripts/decode_length.py on the demo model: the answer is the same whatever cache was allocated (a step
    reads the slots in use, whose contents do not depend on the cache's length); the speeds are not asserted."""
    import os

    from llama.demo_model import DEMO_MODEL_NAME

    (tmp_path / DEMO_MODEL_NAME).symlink_to(smollm2_dir)  # the script loads the demo model from $LLAMA_CACHE
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "decode_length.py"), "--max-new-tokens", "20,600",
         "--answer-tokens", "6", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, LLAMA_CACHE=str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(the same tokens)" in result.stdout and "cache of 256 positions" in result.stdout


def test_bench_serve_streams_every_answer_in_full_from_the_in_process_server(tmp_path):
    """scripts/bench_serve.py on a tiny model on CPU: the server runs in the script's process, clients in a child;
    every answer has exactly its max_tokens (the clients check each against usage), so the tokens counted per
    level lie between requests x the shortest and requests x the longest answer drawn. No speed is asserted."""
    import json

    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--tiny", "--device", "cpu", "--clients", "1,3",
         "--requests", "2", "--prompt-len", "4,8", "--answer-len", "3,6", "--compare", "--static-prompt-len", "4",
         "--static-new-tokens", "4", "--admission", "apart,grouped", "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert [run["admission"] for run in runs] == ["apart", "grouped"]  # the server ran once with each
    for run in runs:
        rows = run["rows"]
        assert [row["clients"] for row in rows] == [1, 3]
        for row in rows:
            assert row["requests"] == 2 * row["clients"]
            assert 3 * row["requests"] <= row["output_tokens"] <= 6 * row["requests"]
    targets = [line for line in result.stdout.splitlines() if line.startswith(("| output tok/s", "| inter-token"))]
    assert len(targets) == 4 and "nan" not in "".join(targets)  # both comparisons printed for each, with figures
