"""`llama serve` end to end: the real command as a subprocess, the official `openai` client (or plain HTTP) as the
client, and the Python API in this process as the reference. Everything runs in float32 on the CPU, where a
request's output does not depend on what else is in the batch, so the server's answers must equal
`Llama.generate`'s exactly (text, token counts, finish reasons)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from llama.api import Llama

NAME = "smollm2-test"  # --served-model-name
API_KEY = "s3cret-key"  # the small server's --api-key
STARTUP_SECONDS = 180  # loading the model, on 2 busy cores


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path  # its stderr

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(model: Path, log: Path, *flags: str) -> Server:
    """`python -m llama.cli serve ...` on a free port, once it has printed its `serving NAME at URL` line."""
    env = {key: value for key, value in os.environ.items() if key != "LLAMA_API_KEY"}
    env["HF_HUB_OFFLINE"] = "1"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "llama.cli", "serve", "--model", str(model), "--no-compile",
                                    "--port", "0", "--max-seq-len", "512", "--served-model-name", NAME, *flags],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_SECONDS)
    except queue.Empty:
        line = ""
    if not line.startswith(f"serving {NAME} at http://127.0.0.1:"):
        process.kill()
        pytest.fail(f"the server did not start: stdout {line!r}, stderr:\n{log.read_text()[-2000:]}")
    return Server(process, line.split()[3], log)


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    """The main server: up to 4 requests in a batch."""
    running = start_server(smollm2_dir, tmp_path_factory.mktemp("serve") / "stderr", "--max-batch-size", "4")
    yield running
    assert running.stop() == 0, running.log.read_text()[-2000:]


@pytest.fixture(scope="module")
def small_server(smollm2_dir, tmp_path_factory):
    """One row, one waiting place, and an API key."""
    running = start_server(smollm2_dir, tmp_path_factory.mktemp("serve") / "stderr", "--max-batch-size", "1",
                           "--max-waiting", "1", "--api-key", API_KEY)
    yield running
    assert running.stop() == 0, running.log.read_text()[-2000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def small_client(small_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{small_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(smollm2_dir) -> Llama:
    """The same checkpoint through the Python API, in this process (float32, CPU, eager like --no-compile)."""
    return Llama.from_pretrained(smollm2_dir, max_seq_len=512, progress=False)


def ids_of(reference: Llama, prompt: str) -> list[int]:
    return reference.tokenizer.encode(prompt, bos=reference.tokenizer.adds_bos)


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


QUESTION = [{"role": "user", "content": "What is 2+2? Answer with one number."}]  # greedy: 6 tokens, then <|im_end|>


# ---------------------------------------------------------------------------- the basics
def test_health_is_ok_and_models_lists_the_served_name(server, client):
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert [model.id for model in client.models.list()] == [NAME]


# "My favourite colour is" " blue." then <|im_end|>: finish_reason "stop"; the other runs to max_tokens: "length"
@pytest.mark.parametrize("prompt,as_ids", [("My favourite colour is", False), ("The capital of France is", True)],
                         ids=["text", "token-ids"])
def test_greedy_completion_equals_generate(client, reference, prompt, as_ids):
    ids = ids_of(reference, prompt)
    expected = reference.generate(prompt, max_new_tokens=12)[0]
    answer = client.completions.create(model=NAME, prompt=ids if as_ids else prompt, max_tokens=12, temperature=0)
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.model_dump(exclude_none=True) == usage_of(len(ids), len(expected.token_ids))


def test_greedy_chat_equals_generate_on_the_chat_format(client, reference):
    ids = reference.tokenizer.encode_chat(QUESTION)
    expected = reference.generate(ids, max_new_tokens=16)[0]
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0)
    assert expected.finish_reason == "stop"  # (the answer ends on its own, before max_tokens)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.model_dump(exclude_none=True) == usage_of(len(ids), len(expected.token_ids))


# ---------------------------------------------------------------------------- streaming
def test_streamed_completion_adds_up_to_the_whole_one_with_a_usage_chunk(client):
    whole = client.completions.create(model=NAME, prompt="Water boils at", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="Water boils at", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == whole.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert all(chunk.usage is None for chunk in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_streamed_chat_starts_with_the_role_and_adds_up_to_the_whole_answer(client):
    whole = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    *choice_chunks, usage_chunk = chunks
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in choice_chunks) == whole.choices[0].message.content
    finish = [chunk.choices[0].finish_reason for chunk in choice_chunks]
    assert finish == [None] * (len(finish) - 1) + ["stop"]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


# ---------------------------------------------------------------------------- continuous batching
BATCH_PROMPTS = [("Once upon a time", 16), ("def fibonacci(n):", 12), ("1, 2, 3, 4,", 6),
                 ("The recipe for pancakes:", 10), ("Water boils at", 4), ("The capital of France is", 8)]


def test_concurrent_requests_beyond_the_batch_each_get_their_solo_answer(client, reference):
    """6 streams at once on 4 rows: two wait, and join the batch as rows free up while the others still decode.
    None of the prompts reaches an end-of-sequence token within its max_tokens, so each runs its full length."""
    solo = [reference.generate(prompt, max_new_tokens=n)[0].text for prompt, n in BATCH_PROMPTS]
    start = threading.Barrier(len(BATCH_PROMPTS))
    texts, first_at, finished_at = [""] * 6, [0.0] * 6, [0.0] * 6

    def ask(index: int) -> None:
        prompt, max_tokens = BATCH_PROMPTS[index]
        start.wait()
        for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True):
            first_at[index] = first_at[index] or time.perf_counter()
            texts[index] += chunk.choices[0].text
            if chunk.choices[0].finish_reason:
                finished_at[index] = time.perf_counter()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(BATCH_PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert texts == solo
    # some request started only after another had finished (it waited for a row), while a third still decoded
    assert any(finished_at[j] < first_at[i] < finished_at[k] for i in range(6) for j in range(6) for k in range(6))


# ---------------------------------------------------------------------------- stopping
def test_stop_string_cuts_the_text_as_generate_does(client, reference):
    expected = reference.generate("1, 2, 3, 4,", max_new_tokens=12, stop=["6, 7"])[0]  # " 5, 6, 7, ..." -> " 5, "
    answer = client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["6, 7"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected.text, "stop") == (" 5, ", "stop")
    assert answer.usage.completion_tokens == len(expected.token_ids)


def test_stop_string_cuts_the_streamed_text_too(client):
    """The stream holds back text that could be the start of the stop string ("6, " of "6, 7")."""
    chunks = list(client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                            stop=["6, 7"], stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == " 5, "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_reached_finishes_with_length(client, reference):
    expected = reference.generate("Once upon a time", max_new_tokens=3)[0]
    answer = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected.text, "length")
    assert answer.usage.completion_tokens == 3


# ---------------------------------------------------------------------------- sampling
def test_seeded_sampling_repeats_and_equals_generate_with_that_seed(client, reference):
    expected = reference.generate("Once upon a time", max_new_tokens=12, temperature=1.0, seed=7)[0].text
    answers = [client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=7).choices[0].text for _ in range(2)]
    greedy = reference.generate("Once upon a time", max_new_tokens=12)[0].text
    assert answers == [expected, expected]
    assert expected != greedy  # (it did sample)


def test_seeded_sampling_is_the_same_beside_other_requests(client, reference):
    """The seeded request's draws are its own stream: an unseeded sampled request and a greedy one decoding in the
    same batch change nothing."""
    expected = reference.generate("Once upon a time", max_new_tokens=12, temperature=1.0, seed=7)[0].text
    others = [dict(prompt="Water boils at", max_tokens=12, temperature=1.0),
              dict(prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)]
    streams = [client.completions.create(model=NAME, stream=True, **other) for other in others]
    next(streams[0]), next(streams[1])  # both decoding
    seeded = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    for stream in streams:
        list(stream)
    assert seeded.choices[0].text == expected


# ---------------------------------------------------------------------------- log-probabilities
LOGPROB_TOLERANCE = 1e-4  # the server's decode steps (KV cache) against one full forward: float32 rounding only


def test_completion_logprobs_are_the_log_softmax_of_the_logits(client, reference):
    prompt = ids_of(reference, "The capital of France is")
    generated = reference.generate(prompt, max_new_tokens=6)[0].token_ids
    logprobs = reference.logits([prompt + generated])[0].log_softmax(-1)  # [T, V]
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    got = answer.choices[0].logprobs
    decode = reference.tokenizer.decode
    assert got.tokens == [decode([token]) for token in generated]
    for step, token in enumerate(generated):
        row = logprobs[len(prompt) - 1 + step]  # the logits that chose generated[step]
        assert got.token_logprobs[step] == pytest.approx(row[token].item(), abs=LOGPROB_TOLERANCE)
        top = row.topk(3)
        expected_top = {decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        assert got.top_logprobs[step] == pytest.approx(expected_top, abs=LOGPROB_TOLERANCE)
        assert max(got.top_logprobs[step], key=got.top_logprobs[step].get) == got.tokens[step]  # greedy: the top
    assert got.text_offset == [len("".join(got.tokens[:step])) for step in range(len(generated))]


def test_chat_logprobs_are_the_log_softmax_of_the_logits(client, reference):
    prompt = reference.tokenizer.encode_chat(QUESTION)
    generated = reference.generate(prompt, max_new_tokens=16)[0].token_ids
    logprobs = reference.logits([prompt + generated])[0].log_softmax(-1)
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0,
                                            logprobs=True, top_logprobs=2)
    entries = answer.choices[0].logprobs.content
    decode = reference.tokenizer.decode
    assert [entry.token for entry in entries] == [decode([token]) for token in generated]
    for step, (entry, token) in enumerate(zip(entries, generated)):
        row = logprobs[len(prompt) - 1 + step]
        assert entry.logprob == pytest.approx(row[token].item(), abs=LOGPROB_TOLERANCE)
        assert entry.bytes == list(entry.token.encode())
        top = row.topk(2)
        assert [t.token for t in entry.top_logprobs] == [decode([t]) for t in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=LOGPROB_TOLERANCE)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the top


# ---------------------------------------------------------------------------- bad requests
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# (what, path, body, status, param (the field named), a word the message must hold)
BAD_REQUESTS = [
    ("malformed JSON", COMPLETIONS, b'{"prompt": "hi",', 400, None, "JSON"),
    ("a body that is a list", COMPLETIONS, [{"prompt": "hi"}], 400, None, "object"),
    ("temperature hot", COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("top_p 0", COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p", "top_p"),
    ("max_tokens 0", COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("an unknown model", COMPLETIONS, {"model": "gpt-4o", "prompt": "hi"}, 400, "model", "gpt-4o"),
    ("a prompt longer than the context", COMPLETIONS, {"prompt": [1] * 600}, 400, "prompt", "512"),
    ("messages longer than the context", CHAT, {"messages": [{"role": "user", "content": "hi " * 600}]}, 400,
     "messages", "512"),
    ("messages missing", CHAT, {"model": NAME}, 400, "messages", "messages"),
    ("messages not a list", CHAT, {"messages": "hi"}, 400, "messages", "messages"),
    ("a token id outside the vocabulary", COMPLETIONS, {"prompt": [1, 2, 49152]}, 400, "prompt", "49152"),
    ("n=2 with temperature 0", COMPLETIONS, {"prompt": "hi", "n": 2, "temperature": 0}, 400, "n", "temperature"),
    ("echo (not supported)", COMPLETIONS, {"prompt": "hi", "echo": True}, 400, "echo", "not supported"),
    ("tools (not supported)", CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                     "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "not supported"),
    ("an unknown endpoint", "/v1/engines", None, 404, None, "/v1/engines"),
]


def send(url: str, path: str, body) -> httpx.Response:
    if body is None:
        return httpx.get(url + path)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("what,path,body,status,param,word", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_an_openai_error_naming_the_field(server, what, path, body, status, param, word):
    response = send(server.url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert word in error["message"] and (param is None or param in error["message"]), error["message"]


def test_server_still_answers_after_bad_requests(server, client, reference):
    for _, path, body, status, _, _ in BAD_REQUESTS:
        assert send(server.url, path, body).status_code == status
    answer = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert answer.choices[0].text == reference.generate("Once upon a time", max_new_tokens=4)[0].text


def test_unknown_model_is_a_bad_request_error_to_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert raised.value.body["param"] == "model" and raised.value.body["code"] == "model_not_found"


# ---------------------------------------------------------------------------- --api-key
def test_v1_requests_without_the_right_api_key_are_refused_with_401(small_server):
    response = httpx.post(f"{small_server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    error = response.json()["error"]
    assert response.status_code == 401 and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=NAME, prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_the_right_api_key_is_served(small_client, reference):
    answer = small_client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert answer.choices[0].text == reference.generate("Once upon a time", max_new_tokens=3)[0].text


def test_health_needs_no_api_key(small_server):
    assert httpx.get(f"{small_server.url}/health").status_code == 200


# ---------------------------------------------------------------------------- load and disconnection
def test_requests_beyond_the_waiting_limit_get_503_and_the_others_complete(small_client, reference):
    """One row and one waiting place. A long stream holds the row (its first chunk shows it is running); of 5
    requests sent at once, the first to arrive waits and the other 4 are refused (503, which the openai client raises
    as an InternalServerError). Closing the stream frees the row and the waiting request completes."""
    expected = reference.generate("Once upon a time", max_new_tokens=8)[0].text
    holder = small_client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=400, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    next(iter(holder))
    start = threading.Barrier(5)
    outcomes: list = [None] * 5
    refusals = threading.Semaphore(0)

    def ask(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = small_client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8,
                                                              temperature=0).choices[0].text
        except openai.APIStatusError as e:
            outcomes[index] = e
            refusals.release()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for _ in range(4):  # (the refusals come back while the row is still held)
        assert refusals.acquire(timeout=60)
    holder.close()
    for thread in threads:
        thread.join(timeout=120)
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    completed = [o for o in outcomes if isinstance(o, str)]
    assert len(refused) == 4 and completed == [expected]
    assert all(isinstance(e, openai.InternalServerError) and e.status_code == 503 for e in refused)
    assert all(e.body["code"] == "overloaded" and e.response.headers["Retry-After"] == "1" for e in refused)


@pytest.fixture(scope="module")
def seconds_per_token(small_client) -> float:
    """The small server's time for a token, from a 16-token answer (prefill and HTTP included: an overestimate)."""
    began = time.perf_counter()
    small_client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    return (time.perf_counter() - began) / 16


def time_a_short_answer(small_client) -> float:
    began = time.perf_counter()
    answer = small_client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    return time.perf_counter() - began


# 4 tokens take ~4 token-times (~6 measured); waiting for an abandoned 400-token request would take ~390
FREED_ROW_BOUND = 100  # token-times


def test_a_client_that_disconnects_mid_stream_frees_its_row(small_client, seconds_per_token):
    """On one row: a 400-token stream read for 3 chunks, then closed; the next request is admitted at once rather
    than after the 400 tokens (ignore_eos makes the stream run its full length if it is not cancelled)."""
    stream = small_client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=400, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    waited = time_a_short_answer(small_client)
    assert waited < FREED_ROW_BOUND * seconds_per_token, (waited, seconds_per_token)


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row(small_client, seconds_per_token):
    """The same without streaming: the client times out after a second and closes the connection."""
    impatient = small_client.with_options(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=NAME, prompt="Once upon a time", max_tokens=400, temperature=0,
                                     extra_body={"ignore_eos": True})
    waited = time_a_short_answer(small_client)
    assert waited < FREED_ROW_BOUND * seconds_per_token, (waited, seconds_per_token)


# ---------------------------------------------------------------------------- shutting down
def test_sigterm_lets_the_stream_in_flight_finish_and_exits_0(smollm2_dir, tmp_path, reference):
    expected = reference.generate("Once upon a time", max_new_tokens=32)[0]
    assert expected.finish_reason == "length"
    own = start_server(smollm2_dir, tmp_path / "stderr", "--max-batch-size", "2")
    try:
        events = []
        body = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{own.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            own.process.send_signal(signal.SIGTERM)
            refused = False  # new connections are refused while the stream goes on
            for _ in range(30):
                try:
                    httpx.get(f"{own.url}/health", timeout=1)
                except httpx.ConnectError:
                    refused = own.process.poll() is None
                    break
                except httpx.TransportError:  # (a connection caught as the socket closed: look again)
                    pass
                time.sleep(0.1)
            events += [line for line in lines if line.startswith("data: ")]
        assert refused
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
        assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected.text
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert own.process.wait(timeout=35) == 0
        assert own.log.read_text().splitlines()[-1].endswith("stopped")
    finally:
        own.stop()


# ---------------------------------------------------------------------------- speculative decoding
def test_server_with_prompt_lookup_answers_as_generate_does(smollm2_dir, tmp_path, reference):
    """`--draft prompt-lookup`: every request is decoded speculatively (the server counts the proposals it verified,
    and says so when it stops), and a greedy answer is generate's without speculation, token for token. The prompt's
    answer repeats it, so proposals are kept."""
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3,"
    expected = reference.generate(prompt, max_new_tokens=16)[0]
    own = start_server(smollm2_dir, tmp_path / "stderr", "--max-batch-size", "2", "--draft", "prompt-lookup")
    try:
        client = openai.OpenAI(base_url=f"{own.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    finally:
        assert own.stop() == 0, own.log.read_text()[-2000:]
    assert answer.choices[0].text == expected.text
    assert answer.usage.completion_tokens == len(expected.token_ids)
    *_, counted, stopped = own.log.read_text().splitlines()
    accepted, proposed = map(int, re.fullmatch(r"speculation: (\d+) of (\d+) proposed tokens accepted \(\d+%\)",
                                               counted).groups())
    assert 0 < accepted <= proposed and stopped == "stopped"


# ---------------------------------------------------------------------------- bad flags
def test_bad_serve_flags_are_one_line_each_before_loading(smollm2_dir):
    """--port out of range, a port already in use, --max-batch-size 0: exit 2 with one line naming the flag. The
    three run side by side (each imports torch, none loads the model)."""
    command = [sys.executable, "-m", "llama.cli", "serve", "--model", str(smollm2_dir), "--no-compile"]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        in_use = str(taken.getsockname()[1])
        cases = [(["--port", "70000"], "--port"), (["--port", in_use], "--port"),
                 (["--port", "0", "--max-batch-size", "0"], "--max-batch-size")]
        processes = [subprocess.Popen(command + flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for flags, _ in cases]
        results = [process.communicate(timeout=120) for process in processes]
    for process, (stdout, stderr), (flags, named) in zip(processes, results, cases):
        lines = stderr.splitlines()
        assert process.returncode == 2, (flags, stderr)
        assert len(lines) == 1 and lines[0].startswith("llama: error: ") and named in lines[0], (flags, stderr)
        assert "loading" not in stderr and not stdout, (flags, stderr)
