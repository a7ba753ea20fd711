"""The `llama` command end to end, through subprocess, offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import official_config, shrink, write_hf_checkpoint

import llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args, env=None, input=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
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
    """On a CPU the command compiles the decode step by default; its text is the eager model's (the compiled
    layers agree within 1e-5, tests/test_kv_cache.py, far inside this prompt's top-2 margins)."""
    result = run("generate", "--model", str(smollm2_dir), "--prompt", "The capital of France is",
                 "--max-new-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False).generate(
        "The capital of France is", max_new_tokens=8)[0].text
    assert result.stdout == expected + "\n"
    assert "tok/s" in result.stderr and "compiling its decode step" in result.stderr


def test_without_a_cpp_compiler_the_cpu_default_decodes_eagerly(smollm2_dir):
    """torch.compile on a CPU needs a C++ compiler: a machine without one still runs the default command."""
    result = run("generate", "--model", str(smollm2_dir), "--prompt", "The capital of France is",
                 "--max-new-tokens", "2", "--device", "cpu",
                 env={"PATH": os.path.dirname(sys.executable), "CXX": "no-such-compiler"})
    assert result.returncode == 0, result.stderr
    assert "compiling" not in result.stderr and result.stdout.strip()


def test_generate_runs_a_prompts_file_as_a_batch(smollm2_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("The capital of France is\n1, 2, 3,\n")
    result = run("generate", "--model", str(smollm2_dir), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "4", "--no-compile")
    assert result.returncode == 0, result.stderr
    assert "--- [0] The capital of France is" in result.stdout and "--- [1] 1, 2, 3," in result.stdout
    assert "compiling" not in result.stderr


def test_chat_answers_once_with_prompt(smollm2_dir):
    result = run("chat", "--model", str(smollm2_dir), "--prompt", "What is the capital of France?",
                 "--temperature", "0", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


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


# ---------------------------------------------------------------------------- bad input: one line, before loading
def assert_fails_fast(result: subprocess.CompletedProcess, *named: str) -> None:
    """Exit code 2, one line on stderr that names what is wrong, no traceback, and nothing loaded."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("llama: error: "), result.stderr
    assert all(name in lines[0] for name in named), lines[0]
    assert "Traceback" not in result.stderr and "loading" not in result.stderr and not result.stdout


# (argv, what the message must name): every one fails before torch is imported, so each takes a fraction of a second
BAD_FLAGS = [
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "hot"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "--prompt", "hi", "--top-k", "2.5"], "--top-k"),
    (["generate", "--prompt", "hi", "--min-p", "2"], "--min-p must be in [0, 1]"),
    (["generate", "--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--prompt", "hi", "--max-seq-len", "-3"], "--max-seq-len must be >= 1"),
    (["generate", "--prompt", "hi", "--max-seq-len", "0"], "--max-seq-len must be >= 1"),
    (["generate", "--prompt", "hi", "--max-seq-len", "64", "--max-new-tokens", "64"], "--max-seq-len 64"),
    (["generate", "--prompt", "hi", "--seed", "-1"], "--seed"),
    (["generate", "--prompt", "hi", "--stop", ""], "--stop must not be an empty string"),
    (["generate", "--prompt", "hi", "--group-size", "64"], "--group-size needs --quantize int4"),
    (["generate", "--prompt", "hi", "--quantize", "int4", "--group-size", "48"], "--group-size"),
    (["generate", "--prompt", "hi", "--device", "gpu0"], "--device 'gpu0'"),
    (["generate", "--prompt", "hi", "--dtype", "fp8"], "--dtype"),
    (["generate", "--prompt", "hi", "--draft", "prompt-lookup", "--num-speculative-tokens", "0"],
     "--num-speculative-tokens must be in [1, 16], got 0"),
    (["generate", "--prompt", "hi", "--draft", "prompt-lookup", "--num-speculative-tokens", "17"],
     "--num-speculative-tokens must be in [1, 16], got 17"),
    (["chat", "--prompt", "hi", "--num-speculative-tokens", "2"], "--num-speculative-tokens needs --draft"),
    (["serve", "--draft", " "], "--draft must not be empty"),
    (["generate"], "--prompt"),
    (["chat", "--temperature", "-0.5"], "--temperature"),
    (["chat", "--model", "", "--prompt", "hi"], "--model must not be empty"),
    (["perplexity", "--text", "README.md", "--context", "1"], "--context must be >= 2"),
    (["perplexity", "--text", "README.md", "--context", "1024", "--max-seq-len", "512"], "--context 1024"),
    (["perplexity", "--text", "README.md", "--reference"], "--reference"),
    (["quantize", "--out", "somewhere"], "--quantize is required"),
    (["download", "not a repo"], "not a hub repo id"),
    (["download", "org/name", "--revision", ""], "--revision"),
    (["bogus"], "'bogus'"),
]


@pytest.mark.parametrize("argv,named", BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it_before_loading(argv, named):
    assert_fails_fast(run(*argv), named)


def test_sampling_flags_are_checked_by_the_api_ranges():
    """One definition of the ranges: the command's message is the API's, with the flag's spelling."""
    from llama.generate import SamplingParams

    with pytest.raises(ValueError) as api:
        SamplingParams(top_p=1.5).validate()
    line = run("generate", "--prompt", "hi", "--top-p", "1.5").stderr.strip()
    assert line == "llama: error: " + str(api.value).replace("top_p", "--top-p")


@pytest.mark.parametrize("device,available", [
    ("cuda", lambda torch: torch.cuda.is_available()), ("mps", lambda torch: torch.backends.mps.is_available()),
    ("cuda:7", lambda torch: torch.cuda.device_count() > 7),
], ids=["cuda", "mps", "cuda:7"])
def test_missing_device_is_one_line_before_loading(device, available):
    import torch

    if available(torch):
        pytest.skip(f"{device} is present on this machine")
    assert_fails_fast(run("generate", "--prompt", "hi", "--device", device), f"--device {device}")


@pytest.fixture
def files(tmp_path):
    """A folder, a missing path, a file that is not UTF-8, an empty file, and a file that is not a folder."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    return tmp_path


@pytest.mark.parametrize("name,named", [
    ("folder", "is a folder, not a file"), ("missing.txt", "no such file"), ("latin1.txt", "not UTF-8 text"),
    ("empty.txt", "holds no prompts"),
])
def test_bad_prompts_file_is_named_before_loading(files, name, named):
    assert_fails_fast(run("generate", "--prompts-file", str(files / name)), f"--prompts-file {files / name}", named)


@pytest.mark.parametrize("name,named", [
    ("folder", "is a folder, not a file"), ("missing.txt", "no such file"), ("latin1.txt", "not UTF-8 text"),
])
def test_bad_text_file_is_named_before_loading(files, name, named):
    assert_fails_fast(run("perplexity", "--text", str(files / name)), f"--text {files / name}", named)


def test_out_that_is_a_file_is_refused_before_loading(files):
    assert_fails_fast(run("quantize", "--quantize", "int8", "--out", str(files / "empty.txt")),
                      "--out", "not a folder")


def test_out_inside_a_file_is_refused_before_loading(files):
    assert_fails_fast(run("quantize", "--quantize", "int8", "--out", str(files / "empty.txt" / "q")),
                      "--out", "is a file")


def test_out_holding_another_checkpoint_is_refused(smollm2_dir):
    """save_quantized deletes the *.safetensors of --out: another model's folder must never be that."""
    assert_fails_fast(run("quantize", "--quantize", "int8", "--out", str(smollm2_dir)), "--out",
                      "holds another checkpoint")


def test_model_that_is_a_file_names_its_folder(smollm2_dir):
    assert_fails_fast(run("generate", "--prompt", "hi", "--model", str(smollm2_dir / "config.json")),
                      "--model", "is a file", str(smollm2_dir))


def test_model_folder_without_checkpoint_is_explained(files):
    assert_fails_fast(run("generate", "--prompt", "hi", "--model", str(files / "folder")), "--model",
                      "holds no checkpoint")


def test_max_seq_len_beyond_the_models_context_is_refused_before_loading(smollm2_dir):
    limit = json.loads((smollm2_dir / "config.json").read_text())["max_position_embeddings"]
    assert_fails_fast(run("generate", "--prompt", "hi", "--model", str(smollm2_dir), "--max-seq-len",
                          str(limit + 1)), f"--max-seq-len {limit + 1}", f"max_position_embeddings={limit}")


# ---------------------------------------------------------------------------- speculative decoding (--draft)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3,"  # an answer that repeats its prompt: prompt lookup's proposals are kept
SPECULATION = re.compile(r"speculation: (\d+) of (\d+) proposed tokens accepted \((\d+)%\)$")


def test_generate_with_prompt_lookup_prints_the_greedy_text_and_the_acceptance_rate(smollm2_dir):
    """Speculation changes how fast, not what: the text is the greedy one without it. The stats line counts the
    proposals as the API does for the same --num-speculative-tokens (2, not the default 4: it is passed on)."""
    result = run("generate", "--model", str(smollm2_dir), "--prompt", COUNTING, "--max-new-tokens", "16",
                 "--no-compile", "--draft", "prompt-lookup", "--num-speculative-tokens", "2")
    assert result.returncode == 0, result.stderr
    llm = llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)
    assert result.stdout == llm.generate(COUNTING, max_new_tokens=16)[0].text + "\n"
    llm.generate(COUNTING, max_new_tokens=16, draft="prompt-lookup", num_speculative_tokens=2)
    printed = SPECULATION.search(result.stderr.splitlines()[-1])
    assert printed and "tok/s" in result.stderr.splitlines()[-1], result.stderr
    assert (int(printed[1]), int(printed[2])) == (llm.stats.accepted_tokens, llm.stats.proposed_tokens)
    assert llm.stats.accepted_tokens > 0


def test_chat_with_the_model_itself_as_draft_accepts_every_proposal(smollm2_dir):
    """A draft with the model's own weights proposes the model's own greedy tokens: all are kept (100%), and the
    answer is the one without a draft. The draft model's loading is shown as the model's is."""
    question = "What is the capital of France?"
    result = run("chat", "--model", str(smollm2_dir), "--prompt", question, "--temperature", "0",
                 "--max-new-tokens", "12", "--no-compile", "--draft", str(smollm2_dir))
    assert result.returncode == 0, result.stderr
    llm = llama.Llama.from_pretrained(smollm2_dir, device="cpu", progress=False)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    assert result.stdout == llm.generate(ids, max_new_tokens=12)[0].text + "\n"
    assert f"loading the draft model {smollm2_dir}" in result.stderr
    printed = SPECULATION.search(result.stderr.splitlines()[-1])
    assert printed and printed[1] == printed[2] != "0" and printed[3] == "100", result.stderr


@pytest.fixture(scope="module")
def foreign_draft(tmp_path_factory):
    """A random checkpoint with another vocabulary (320 tokens; SmolLM2 has 49152) and a 256-position context."""
    folder = tmp_path_factory.mktemp("draft")
    write_hf_checkpoint(folder, shrink(official_config("llama-2-7b"), max_position_embeddings=256))
    return folder


def test_draft_with_another_vocabulary_is_one_line_naming_it(smollm2_dir, foreign_draft):
    """Found once both are loaded (the tokenizers are compared too): exit 2, one error line, no traceback."""
    result = run("generate", "--model", str(smollm2_dir), "--prompt", "hi", "--no-compile", "--draft",
                 str(foreign_draft))
    errors = [line for line in result.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert result.returncode == 2 and not result.stdout, result.stderr
    assert errors == [f"llama: error: --draft {foreign_draft}: its vocabulary has 320 tokens, the model's 49152; a "
                      f"draft model must share the model's tokenizer"], result.stderr


@pytest.mark.parametrize("name,named", [("no/such/folder", "no such folder"), ("empty", "holds no checkpoint")])
def test_missing_draft_checkpoint_is_one_line_before_loading(smollm2_dir, tmp_path, name, named):
    (tmp_path / "empty").mkdir()
    assert_fails_fast(run("generate", "--prompt", "hi", "--model", str(smollm2_dir), "--draft", str(tmp_path / name)),
                      f"--draft {tmp_path / name}", named)


def test_max_seq_len_beyond_the_drafts_context_is_refused_before_loading(smollm2_dir, foreign_draft):
    """The draft's cache holds as many positions as the model's."""
    assert_fails_fast(run("generate", "--prompt", "hi", "--model", str(smollm2_dir), "--max-seq-len", "512",
                          "--draft", str(foreign_draft)), f"--draft {foreign_draft}", "max_position_embeddings=256",
                      "--max-seq-len 512")


# config.json edits: each names the file and the key
BAD_CONFIGS = [
    ("[1, 2]", "expected a JSON object", None),
    ("null", "expected a JSON object", None),
    ("{not json", "not valid JSON", None),
    (dict(num_attention_heads=0), "num_attention_heads=0", None),
    (dict(hidden_size="banana"), "hidden_size='banana'", None),
    (dict(num_hidden_layers=-2), "num_hidden_layers=-2", None),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings='false'", None),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6", "num_key_value_heads=4"),
    (dict(hidden_size=100, num_attention_heads=3, num_key_value_heads=1, head_dim=None), "hidden_size=100",
     "num_attention_heads=3"),
    (dict(rope_scaling="linear"), "rope_scaling", None),
]


@pytest.mark.parametrize("edit,named,also", BAD_CONFIGS, ids=[str(edit) for edit, _, _ in BAD_CONFIGS])
def test_bad_config_names_the_file_and_the_key(smollm2_dir, tmp_path, edit, named, also):
    """A folder with a real config.json, edited, beside a placeholder model.safetensors: the config is read first."""
    config = json.loads((smollm2_dir / "config.json").read_text())
    text = edit if isinstance(edit, str) else json.dumps({k: v for k, v in {**config, **edit}.items()})
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "model.safetensors").write_bytes(b"")
    result = run("generate", "--prompt", "hi", "--model", str(tmp_path))
    assert_fails_fast(result, str(tmp_path / "config.json"), named, *([also] if also else []))


BAD_ENVIRONMENTS = [
    ({"LLAMA_DEBUG": "maybe"}, "LLAMA_DEBUG='maybe'"),
    ({"HF_HUB_OFFLINE": "ture"}, "HF_HUB_OFFLINE='ture'"),
    ({"RANK": "x"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be less than WORLD_SIZE"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
    ({"HF_HOME": "README.md"}, "HF_HOME='README.md'"),
]


@pytest.mark.parametrize("env,named", BAD_ENVIRONMENTS, ids=[str(env) for env, _ in BAD_ENVIRONMENTS])
def test_bad_environment_variable_is_named(env, named):
    assert_fails_fast(run("generate", "--prompt", "hi", env=env), named)


def test_llama_cache_that_is_a_file_is_named(files):
    assert_fails_fast(run("generate", "--prompt", "hi", env={"LLAMA_CACHE": str(files / "empty.txt")}),
                      "$LLAMA_CACHE", "set LLAMA_CACHE to another folder")


def test_llama_cache_folder_holding_other_files_is_left_alone(files):
    folder = files / "cache" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    assert_fails_fast(run("generate", "--prompt", "hi", env={"LLAMA_CACHE": str(files / "cache")}),
                      str(folder), "notes.txt")
    assert (folder / "notes.txt").read_text() == "mine"


def test_half_written_demo_folder_is_converted_again(smollm2_dir, tmp_path):
    """A cache folder holding only some of the demo model's files (here config.json) is converted again, into the
    very files a fresh conversion writes."""
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    shutil.copy(smollm2_dir / "config.json", folder)
    result = run("generate", "--prompt", "The capital of France is", "--max-new-tokens", "1",
                 env={"LLAMA_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "incomplete; converting it again" in result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).read_bytes() == (smollm2_dir / name).read_bytes(), name


def test_unknown_config_key_is_one_warning_line(smollm2_dir, tmp_path):
    for path in smollm2_dir.iterdir():
        (tmp_path / path.name).symlink_to(path)
    config = json.loads((smollm2_dir / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**config, "frobnication_level": 3}))
    result = run("generate", "--prompt", "hi", "--model", str(tmp_path), "--max-new-tokens", "1")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "frobnication_level" in line]
    assert warned == [f"llama: warning: {tmp_path / 'config.json'}: keys not used by this engine: frobnication_level"]


# ---------------------------------------------------------------------------- unexpected errors and --debug
def run_with_failing_download(*args, raising="ZeroDivisionError()", env=None):
    """The real command, with the download command's body replaced by one that raises."""
    code = (f"import sys, llama.cli as cli\ndef fail(args): raise {raising}\ncli._download = fail\n"
            f"sys.exit(cli.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def test_unexpected_error_is_one_line_with_a_hint_and_exit_code_1():
    result = run_with_failing_download("download", "org/name", raising="ZeroDivisionError('division by zero')")
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["llama: error: unexpected ZeroDivisionError: division by zero (run with "
                                          "--debug (or LLAMA_DEBUG=1) for the traceback)"]


@pytest.mark.parametrize("argv,env", [(["--debug", "download", "org/name"], None),
                                      (["download", "org/name", "--debug"], None),
                                      (["download", "org/name"], {"LLAMA_DEBUG": "1"})])
def test_debug_shows_the_traceback(argv, env):
    result = run_with_failing_download(*argv, env=env)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "in fail" in result.stderr


def test_keyboard_interrupt_exits_130():
    assert run_with_failing_download("download", "org/name", raising="KeyboardInterrupt()").returncode == 130


# ---------------------------------------------------------------------------- help and version
def test_bare_command_prints_the_help():
    result = run()
    assert result.returncode == 2
    assert result.stdout.startswith("usage: llama") and "generate" in result.stdout and "examples:" in result.stdout


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.returncode == 0 and result.stdout.split()[:2] == ["llama", version("llamaref")]


def test_help_lists_examples_and_environment_variables():
    help = run("--help").stdout
    for variable in ("LLAMA_CACHE", "LLAMA_DEBUG", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "RANK", "WORLD_SIZE"):
        assert variable in help.split("environment variables:")[1], variable
    assert "llama generate --prompt" in help.split("examples:")[1]


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "quantize", "perplexity", "download"])
def test_every_option_shows_its_default(command):
    result = run(command, "--help")
    assert result.returncode == 0
    options = result.stdout.split("options:\n")[1].split("\n\n")[0]
    # each option's entry: from a line starting with "  -" to the next one
    entries = ["  -" + entry for entry in ("\n" + options).split("\n  -")[1:]]
    assert len(entries) > 1
    for entry in entries:
        if entry.lstrip().startswith("-h, --help"):
            continue
        assert "default" in entry or "(required" in entry, entry


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["download", "local/smollm2"]])
def test_help_and_download_do_not_import_torch(argv, hub_cache):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "llama", *argv], capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                            HF_HUB_CACHE=str(hub_cache)))
    assert result.returncode == 0, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")]
    assert "llama.cli" in imported and "torch" not in imported
