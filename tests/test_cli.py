"""The `llama` command end to end, through subprocess, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args, env=None, input=None):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "llama", *args], capture_output=True, text=True, env=environment,
                          input=input, timeout=300)


@pytest.fixture(scope="module")
def hub_cache(smollm2_dir, tmp_path_factory):
    """A Hugging Face hub cache holding the demo model as repo `local/smollm2`, as huggingface_hub lays it out."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--local--smollm2"
    shutil.copytree(smollm2_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def test_generate_prints_the_greedy_continuation_and_speed(smollm2_dir):
    result = run("generate", "--model", str(smollm2_dir), "--prompt", "The capital of France is",
                 "--max-new-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False).generate(
        "The capital of France is", max_new_tokens=8)[0].text
    assert result.stdout == expected + "\n"
    assert "tok/s" in result.stderr


def test_generate_runs_a_prompts_file_as_a_batch(smollm2_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("The capital of France is\n1, 2, 3,\n")
    result = run("generate", "--model", str(smollm2_dir), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "--- [0] The capital of France is" in result.stdout and "--- [1] 1, 2, 3," in result.stdout


def test_chat_answers_once_with_prompt(smollm2_dir):
    result = run("chat", "--model", str(smollm2_dir), "--prompt", "What is the capital of France?",
                 "--temperature", "0", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_interactive_chat_keeps_history_and_ends_on_eof(smollm2_dir):
    result = run("chat", "--model", str(smollm2_dir), "--temperature", "0", "--max-new-tokens", "8",
                 input="Hello!\nWhat did I just say?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 3  # two questions answered, then the prompt that met end-of-file


def test_bad_argument_is_one_line_not_a_traceback(smollm2_dir):
    result = run("generate", "--model", str(smollm2_dir), "--prompt", "hi", "--top-p", "2")
    assert result.returncode == 2
    assert "top_p must be in (0, 1]" in result.stderr and "Traceback" not in result.stderr


def test_download_finds_the_model_in_the_local_hub_cache_offline(hub_cache):
    result = run("download", "local/smollm2", env={"HF_HUB_CACHE": str(hub_cache)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(hub_cache / "models--local--smollm2" / "snapshots" / COMMIT)


def test_model_accepts_a_repo_id_resolved_through_the_cache(hub_cache):
    result = run("generate", "--model", "local/smollm2", "--prompt", "The capital of France is",
                 "--max-new-tokens", "3", env={"HF_HUB_CACHE": str(hub_cache)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_unreachable_repo_gets_an_explanation(hub_cache):
    result = run("download", "meta-llama/Llama-3.1-8B-Instruct", env={"HF_HUB_CACHE": str(hub_cache)})
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr and "Traceback" not in result.stderr


def test_missing_folder_or_bad_repo_id_is_explained():
    result = run("generate", "--model", "./no/such/folder", "--prompt", "hi")
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("error,explanation", [
    ("GatedRepoError", "gated repository: accept its license"),
    ("RepositoryNotFoundError", "not found on the Hugging Face Hub, or it is private"),
    ("LocalEntryNotFoundError", "cannot be reached"),
])
def test_hub_failures_are_explained_in_one_paragraph(monkeypatch, error, explanation):
    import huggingface_hub
    import huggingface_hub.errors as errors

    from llama.hub import HubError, download

    def fail(*args, **kwargs):
        cls = getattr(errors, error)
        if error == "LocalEntryNotFoundError":
            raise cls("simulated")
        exception = cls.__new__(cls)  # as raised for an HTTP 401/403/404, without building a response object
        Exception.__init__(exception, "simulated")
        raise exception

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(HubError, match=explanation):
        download("meta-llama/Llama-3.1-8B-Instruct")
