"""`llama serve`: an OpenAI-compatible HTTP server over the scheduler's continuous batching.

    GET  /health                 200 once the model is loaded (503 while shutting down)
    GET  /v1/models              the one model served
    POST /v1/completions         a prompt (text or token ids) continued
    POST /v1/chat/completions    messages, through the checkpoint's chat format

Built on Starlette (routing, requests, streamed responses) served by uvicorn (HTTP/1.1, signals, graceful
shutdown): the small, well-kept ASGI pair under FastAPI, without FastAPI's pydantic layer, whose validation errors
(422, its own shape) are not the OpenAI errors clients expect; the fields are checked here instead, with the same
rules as the Python API and the command line (llama/arguments.py).

Two threads: uvicorn's event loop speaks HTTP; the engine (on the main thread under `llama serve`, see `serve`)
runs `Scheduler.step` while there is work and hands each request's new text to that request's queue on the event
loop (all of a step's updates in one call, which
wakes the loop once). A stream sends what its queue holds as one chunk, so a loop that falls behind sends fewer,
larger chunks rather than delaying the engine. A request is a `Job` of the scheduler
from the moment it is accepted; a streaming client that disconnects cancels its job, and the scheduler frees the
row at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llama.api import Llama
from llama.arguments import ArgumentError, check, check_stop
from llama.generate import SamplingParams
from llama.scheduler import MAX_LOGPROBS, Job, QueueFull, Request, Scheduler, Update
from llama.speculative import DEFAULT_SPECULATIVE_TOKENS

log = logging.getLogger("llama.server")
MAX_CHOICES = 16  # `n`, the choices per prompt
# OpenAI fields this server does not implement, with the values that ask for nothing (anything else is a 400)
UNSUPPORTED = {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "tools": (None, []),
               "functions": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
               "audio": (None,), "modalities": (None, ["text"])}


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error shape, naming the field (`param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


# ---------------------------------------------------------------------------- the engine
class Engine:
    """The scheduler, stepped by `run` while requests are in flight, on the thread that calls it (`serve`: the main
    thread, while uvicorn's event loop runs in another). With `speculation` (checked by `Llama._speculation`: the
    draft and k) every request is decoded speculatively (speculative.py)."""

    def __init__(self, llm: Llama, max_batch_size: int, max_waiting: int, debug: bool = False,
                 speculation: tuple[str | Llama, int] | None = None):
        llm._ensure_cache(max_batch_size, llm.max_seq_len)
        self.llm, self.max_waiting, self.debug, self.speculation = llm, max_waiting, debug, speculation
        self.scheduler = self._new_scheduler()
        self.queues: dict[Job, asyncio.Queue[Update]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set when it starts
        self.lock = threading.Lock()
        self.work = threading.Event()
        self.stopping = False

    def start(self) -> None:
        """At the app's startup, on its event loop."""
        self.loop = asyncio.get_running_loop()

    def submit(self, request: Request, queue: asyncio.Queue[Update]) -> Job:
        """Queue a request; each time it moves on, an `Update` is put in `queue` (the last with its
        finish_reason)."""
        with self.lock:
            job = self.scheduler.submit(request)
            self.queues[job] = queue
        self.work.set()
        return job

    def cancel(self, job: Job) -> None:
        with self.lock:
            self.queues.pop(job, None)
        self.scheduler.cancel(job)
        self.work.set()

    def stop(self) -> None:
        """Cancel whatever is still in flight and end `run`."""
        with self.lock:
            jobs = list(self.queues)
        for job in jobs:
            self.cancel(job)
        self.stopping = True
        self.work.set()

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Step the scheduler while there is work, until `stop` (or `until()`)."""
        while not (self.stopping or until()):
            if not self.scheduler.busy:
                self.work.wait(timeout=1.0)
                self.work.clear()
                continue
            try:
                updates = self.scheduler.step()
            except Exception as e:  # (out of memory, say): fail what is in flight, keep serving
                if self.debug:
                    log.error("generation failed:\n%s", "".join(traceback.format_exception(e)))
                else:
                    log.error("generation failed: %s (--debug or LLAMA_DEBUG=1 shows the traceback)",
                              "".join(traceback.format_exception_only(e)).strip())
                self._fail_all(e)
                continue
            with self.lock:
                deliveries = [(self.queues[u.job], u) for u in updates if u.job in self.queues]
                for update in updates:
                    if update.finish_reason:
                        self.queues.pop(update.job, None)
            if deliveries:
                self.loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail_all(self, error: Exception) -> None:
        """After a failed step: every job in flight ends with the error, and a fresh scheduler takes over."""
        with self.lock:
            queues, self.queues = self.queues, {}
            self.scheduler = self._new_scheduler()
        for job in queues:
            job.done, job.error = True, error
        self.loop.call_soon_threadsafe(_deliver, [(queue, Update(job, "", "error", len(job.output.token_ids)))
                                                  for job, queue in queues.items()])

    def _new_scheduler(self) -> Scheduler:
        llm = self.llm  # (its cache is set up: a draft model's is then set up to match, `Llama._speculator`)
        # New prompts join a decode step where that was measured to pay: the compiled GPU step (docs/benchmarks.md,
        # "Serving": 64 clients at 0.81 of the static batch joined, 0.77 apart)
        join = llm.device.type == "cuda" and getattr(llm._decode_step, "chooses_tokens", False)
        return Scheduler(llm.model, llm._decode_step, llm.tokenizer, llm.eos_token_ids, max_waiting=self.max_waiting,
                         speculator=llm._speculator(self.speculation), join=join)


def _deliver(deliveries: list[tuple[asyncio.Queue, Update]]) -> None:
    for queue, update in deliveries:
        queue.put_nowait(update)


# ---------------------------------------------------------------------------- parsing a request
@dataclass
class Parsed:
    """A checked request: the prompts (token ids) and how to continue them."""

    prompts: list[list[int]]
    choices: int  # `n`: answers per prompt
    max_tokens: int | None  # None: what is left of the context
    params: SamplingParams
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    ignore_eos: bool


def _field(body: dict, name: str, default: Any, rule: str | None = None, kind: type | tuple | None = None) -> Any:
    """body[name] (default when absent or null), checked by llama/arguments.py's `rule` or by type."""
    value = body.get(name)
    if value is None:
        return default
    if rule is not None:
        try:
            return check(rule, value)
        except ArgumentError as e:
            raise BadRequest(str(e).replace(rule, name, 1), name) from None
    if kind is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        names = {bool: "true or false", str: "a string", dict: "an object", int: "a whole number"}
        raise BadRequest(f"{name} must be {names.get(kind, kind)}, got {json.dumps(value)}", name)
    return value


def _parse_common(body: dict, prompts: list[list[int]], chat: bool) -> Parsed:
    max_tokens = _field(body, "max_completion_tokens", None, "max_new_tokens") if chat else None
    max_tokens = _field(body, "max_tokens", max_tokens if chat else 16, "max_new_tokens")  # OpenAI's defaults
    top_k = body.get("top_k")
    top_k = None if top_k in (None, -1, 0) else _field(body, "top_k", None, "top_k")  # -1 or 0: off (vLLM's)
    try:
        params = SamplingParams(_field(body, "temperature", 1.0, "temperature"), top_k,
                                _field(body, "top_p", 1.0, "top_p"), _field(body, "min_p", 0.0, "min_p"),
                                _field(body, "repetition_penalty", 1.0, "repetition_penalty"))
    except ArgumentError as e:  # (a field given a value of the wrong type, caught above: here for the ranges)
        raise BadRequest(str(e)) from None
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, 0, kind=(int, float)) != 0:
            raise BadRequest(f"{name} is not supported (use repetition_penalty)", name)
    if _field(body, "logit_bias", {}, kind=dict):
        raise BadRequest("logit_bias is not supported", "logit_bias")
    for name, off in UNSUPPORTED.items():  # (fields that would change the answer: refused, not ignored)
        if body.get(name) not in off:
            raise BadRequest(f"{name} is not supported", name)
    try:
        stop = check_stop(body.get("stop"))
    except ArgumentError as e:
        raise BadRequest(str(e), "stop") from None
    stream = _field(body, "stream", False, kind=bool)
    options = _field(body, "stream_options", {}, kind=dict)
    if options and not stream:
        raise BadRequest("stream_options needs stream: true", "stream_options")
    include_usage = _field(options, "include_usage", False, kind=bool)
    if chat:
        logprobs = _field(body, "top_logprobs", 0, kind=int) if _field(body, "logprobs", False, kind=bool) else None
        name = "top_logprobs"
    else:
        logprobs, name = _field(body, "logprobs", None, kind=int), "logprobs"
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise BadRequest(f"{name} must be in [0, {MAX_LOGPROBS}], got {logprobs}", name)
    choices = _field(body, "n", 1, kind=int)
    if not 1 <= choices <= MAX_CHOICES:
        raise BadRequest(f"n must be in [1, {MAX_CHOICES}], got {choices}", "n")
    if choices > 1 and params.temperature == 0:
        raise BadRequest("n > 1 needs temperature > 0 (greedy answers would all be the same)", "n")
    seed = _field(body, "seed", None, "seed")
    ignore_eos = _field(body, "ignore_eos", False, kind=bool)
    return Parsed(prompts, choices, max_tokens, params, seed, stop, stream, include_usage, logprobs, ignore_eos)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


# ---------------------------------------------------------------------------- the app
def make_app(llm: Llama, served_model_name: str, max_batch_size: int, max_waiting: int = 256,
             api_key: str | None = None, debug: bool = False, draft: str | Llama | None = None,
             num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS) -> Starlette:
    """The ASGI app serving `llm` under `served_model_name`; its engine, `app.state.engine`, is the caller's to run
    (`engine.run()`, best on the main thread: see `serve`). When the server shuts down, what is still in flight is
    cancelled and `run` returns. `draft` and `num_speculative_tokens` are `Llama.generate`'s: every request is
    decoded speculatively with them (the answers are the same; nothing in the API changes)."""
    engine = Engine(llm, max_batch_size, max_waiting, debug, llm._speculation(draft, num_speculative_tokens))
    tokenizer, vocab_size = llm.tokenizer, llm.config.vocab_size
    created = int(time.time())

    def tokens_of(prompt: Any, param: str) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise BadRequest(f"{param} is text, but this model has no tokenizer: send token ids", param)
            if not prompt:
                raise BadRequest(f"{param} is empty", param)
            return tokenizer.encode(prompt, bos=tokenizer.adds_bos)
        if _is_ids(prompt):
            if not all(0 <= t < vocab_size for t in prompt):
                raise BadRequest(f"{param} has token ids outside the vocabulary [0, {vocab_size})", param)
            return list(prompt)
        raise BadRequest(f"{param} must be a string, a list of token ids, or a list of those, got "
                         f"{json.dumps(prompt)[:60]}", param)

    def completion_prompts(body: dict) -> list[list[int]]:
        if "prompt" not in body or body["prompt"] is None:
            raise BadRequest("prompt is required", "prompt")
        prompt = body["prompt"]
        if _is_ids(prompt) or isinstance(prompt, str):
            return [tokens_of(prompt, "prompt")]
        if isinstance(prompt, list) and prompt:
            return [tokens_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        raise BadRequest(f"prompt must be a string, a list of token ids, or a list of those, got "
                         f"{json.dumps(prompt)[:60]}", "prompt")

    def chat_prompt(body: dict) -> list[list[int]]:
        if tokenizer is None:
            raise BadRequest("this model has no tokenizer, so no chat format: use /v1/completions with token ids",
                             "messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
        plain = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a role (a string)", f"messages[{i}]")
            content = message.get("content")
            if isinstance(content, list):  # parts: [{"type": "text", "text": ...}]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                     f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                                 f"messages[{i}].content")
            plain.append({"role": message["role"], "content": content})
        try:
            return [tokenizer.encode_chat(plain)]
        except Exception as e:  # (a chat template refusing a role, say)
            raise BadRequest(f"messages: the chat format refused them: {e}", "messages") from None

    async def body_of(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served_model_name:
            raise BadRequest(f"model {json.dumps(model)} is not served here; this server serves "
                             f"{json.dumps(served_model_name)}", "model", code="model_not_found")
        return body

    def submit(parsed: Parsed, param: str, queue: asyncio.Queue[Update]) -> list[Job]:
        jobs = []
        context = llm.max_seq_len
        for prompt in parsed.prompts:
            if parsed.max_tokens is None and len(prompt) >= context:
                raise BadRequest(f"{param} has {len(prompt)} tokens, leaving no room to answer in this server's "
                                 f"context of {context} positions (--max-seq-len)", param)
            if parsed.max_tokens is not None and len(prompt) + parsed.max_tokens > context:
                raise BadRequest(f"{param} has {len(prompt)} tokens; with max_tokens={parsed.max_tokens} that is "
                                 f"{len(prompt) + parsed.max_tokens} positions, more than this server's context "
                                 f"of {context} (--max-seq-len)", param)
        try:
            for prompt in parsed.prompts:
                max_tokens = parsed.max_tokens if parsed.max_tokens is not None else context - len(prompt)
                for choice in range(parsed.choices):
                    seed = None if parsed.seed is None else parsed.seed + choice
                    jobs.append(engine.submit(Request(prompt, max_tokens, parsed.params, seed, parsed.stop,
                                                      logprobs=parsed.logprobs, ignore_eos=parsed.ignore_eos),
                                              queue))
        except QueueFull as e:
            for job in jobs:
                engine.cancel(job)
            raise BadRequest(f"the server is busy: {e}; try again shortly", status=503, kind="server_error",
                             code="overloaded") from None
        return jobs

    async def generate(request: HTTPRequest, chat: bool) -> Response:
        if engine.stopping:
            raise BadRequest("the server is shutting down", status=503, kind="server_error")
        body = await body_of(request)
        prompts = chat_prompt(body) if chat else completion_prompts(body)
        parsed = _parse_common(body, prompts, chat)
        queue: asyncio.Queue[Update] = asyncio.Queue()
        jobs = submit(parsed, "messages" if chat else "prompt", queue)
        reply = Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", served_model_name, chat, jobs,
                      tokenizer, parsed)
        if parsed.stream:
            return StreamingResponse(_events(reply, queue, engine), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            finished, looked = 0, time.monotonic()
            while finished < len(jobs):
                try:
                    finished += bool((await asyncio.wait_for(queue.get(), timeout=0.5)).finish_reason)
                except asyncio.TimeoutError:
                    pass
                # Every half second, not only when the queue is quiet: a decoding job sends an update every step
                if finished < len(jobs) and time.monotonic() - looked >= 0.5:
                    looked = time.monotonic()
                    if await request.is_disconnected():  # (the finally below cancels the jobs)
                        return Response(status_code=204)
            return JSONResponse(reply.whole())
        finally:
            for job in jobs:
                if not job.done:
                    engine.cancel(job)

    async def completions(request: HTTPRequest) -> Response:
        return await _answering(generate(request, chat=False))

    async def chat_completions(request: HTTPRequest) -> Response:
        return await _answering(generate(request, chat=True))

    async def models(request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": served_model_name, "object": "model",
                                                         "created": created, "owned_by": "llamaref",
                                                         "max_model_len": llm.max_seq_len}]})

    async def health(request: HTTPRequest) -> Response:
        if engine.stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def not_found(request: HTTPRequest, exc: Exception) -> Response:
        return BadRequest(f"no such endpoint: {request.method} {request.url.path}", status=404).response()

    async def method_not_allowed(request: HTTPRequest, exc: Exception) -> Response:
        return BadRequest(f"{request.method} is not allowed on {request.url.path}", status=405).response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    exception_handlers={404: not_found, 405: method_not_allowed},
                    lifespan=lifespan)
    app.state.engine = engine
    if api_key is not None:
        app.add_middleware(_BearerToken, api_key=api_key)
    return app


async def _answering(work) -> Response:
    try:
        return await work
    except BadRequest as e:
        return e.response()


class _BearerToken:
    """With --api-key: /v1/ requests need `Authorization: Bearer KEY` (401 otherwise); /health stays open."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
                response = BadRequest("a valid API key is needed: Authorization: Bearer KEY", status=401,
                                      code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- responses
class Reply:
    """The response to one request, whole or as stream chunks: one choice per job."""

    def __init__(self, id: str, model: str, chat: bool, jobs: list[Job], tokenizer, parsed: Parsed):
        self.id, self.model, self.chat, self.jobs = id, model, chat, jobs
        self.tokenizer, self.parsed = tokenizer, parsed
        self.created = int(time.time())
        self.sent = [0] * len(jobs)  # per choice, tokens already streamed
        self.text_offset = [0] * len(jobs)  # per choice, characters of token text already given offsets

    def head(self, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.parsed.prompts) * self.parsed.choices
        completion = sum(len(job.output.token_ids) for job in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        failed = next((job for job in self.jobs if job.error is not None), None)
        if failed is not None:
            raise BadRequest(f"generation failed: {failed.error}", status=500, kind="server_error")
        choices = []
        for index, job in enumerate(self.jobs):
            output = job.output
            choice: dict[str, Any] = {"index": index, "finish_reason": output.finish_reason or "length",
                                      "logprobs": self.logprobs(index, output.logprobs)}
            text = output.text if self.tokenizer else ""
            choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
            if self.tokenizer is None:  # (token ids only: the model has no tokenizer to make text)
                choice["token_ids"] = output.token_ids
            choices.append(choice)
        return {**self.head(), "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, update: Update | None) -> dict | None:
        """The stream chunk for a job's update (None when there is nothing to send); no update: the opening chunk
        of a chat answer (its role)."""
        if update is None:
            choice: dict[str, Any] = {"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}
        else:
            output = update.job.output
            new = slice(self.sent[index], update.tokens)  # (the engine may have appended more since)
            self.sent[index] = update.tokens
            ids, entries = output.token_ids[new], output.logprobs[new] if output.logprobs else []
            if not (update.text or update.finish_reason or (self.tokenizer is None and ids)):
                return None
            choice = {"index": index, "logprobs": self.logprobs(index, entries) if entries else None,
                      "finish_reason": update.finish_reason}
            if self.chat:
                choice["delta"] = {"content": update.text} if update.text else {}
            else:
                choice["text"] = update.text
            if self.tokenizer is None:
                choice["token_ids"] = ids
        chunk = {**self.head(chunk=True), "choices": [choice]}
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    def logprobs(self, index: int, entries) -> dict | None:
        """OpenAI's shapes: for chat, a list of {token, logprob, bytes, top_logprobs}; for completions, parallel
        lists of tokens, logprobs and {token: logprob} maps."""
        if self.parsed.logprobs is None:
            return None

        def text(token: int) -> str:
            return self.tokenizer.decode([token]) if self.tokenizer else str(token)

        if self.chat:
            return {"content": [{"token": text(e.token), "logprob": e.logprob, "bytes": list(text(e.token).encode()),
                                 "top_logprobs": [{"token": text(t), "logprob": v, "bytes": list(text(t).encode())}
                                                  for t, v in e.top]} for e in entries]}
        tokens = [text(e.token) for e in entries]
        offsets = []  # where each token's text starts in the answer (its tokens' texts, end to end)
        for token in tokens:
            offsets.append(self.text_offset[index])
            self.text_offset[index] += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{text(t): v for t, v in e.top} for e in entries], "text_offset": offsets}


async def _events(reply: Reply, queue: asyncio.Queue, engine: Engine) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of new text, the usage if asked, then [DONE]. If the client goes away,
    Starlette cancels this generator, and the jobs are cancelled with it."""
    index_of = {job: i for i, job in enumerate(reply.jobs)}
    try:
        if reply.chat:  # the role comes first, before any text
            for index in range(len(reply.jobs)):
                yield _sse(reply.chunk(index, None))
        finished = 0
        while finished < len(reply.jobs):
            updates = [await queue.get()]
            while not queue.empty():  # (all that is waiting: one chunk per job)
                updates.append(queue.get_nowait())
            failed = next((update.job.error for update in updates if update.job.error is not None), None)
            if failed is not None:
                error = {"message": f"generation failed: {failed}", "type": "server_error", "param": None,
                         "code": None}
                yield _sse({"error": error})
                break
            for update in _merged(updates):
                finished += bool(update.finish_reason)
                chunk = reply.chunk(index_of[update.job], update)
                if chunk is not None:
                    yield _sse(chunk)
        else:
            if reply.parsed.include_usage:
                yield _sse({**reply.head(chunk=True), "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
    finally:
        for job in reply.jobs:
            if not job.done:
                engine.cancel(job)


def _merged(updates: list[Update]) -> list[Update]:
    """Consecutive updates of each job as one: their text joined, the state of the last."""
    merged: dict[Job, Update] = {}
    for update in updates:
        before = merged.get(update.job)
        merged[update.job] = update if before is None else update._replace(text=before.text + update.text)
    return list(merged.values())


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


# ---------------------------------------------------------------------------- running it
GRACE_SECONDS = 30  # how long a shutdown waits for the requests in flight


def serve(llm: Llama, host: str, port: int, served_model_name: str, max_batch_size: int, max_waiting: int,
          api_key: str | None, on_ready: Callable[[str], None], debug: bool = False, draft: str | Llama | None = None,
          num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS) -> Engine:
    """Serve until Ctrl-C or SIGTERM: then stop accepting, let the requests in flight finish (up to
    GRACE_SECONDS, then cancel them) and return the engine (its scheduler's counts). With `debug`, a failed step
    logs its traceback; with `draft`, requests are decoded speculatively (`make_app`).

    The engine steps on this (the main) thread and uvicorn's event loop runs in another: compiled CPU kernels ran
    at ~22 tok/s on the demo model from a second thread against ~37-43 from the main one (same code, no
    recompilation), and on a GPU CUDA graph trees are kept per thread: graphs recorded from two threads for one
    compiled step broke each other (AssertionError), so whatever runs the model should run here."""
    import uvicorn

    app = make_app(llm, served_model_name, max_batch_size, max_waiting, api_key, debug, draft, num_speculative_tokens)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()
                on_ready(f"http://{_url_host(bound[0])}:{bound[1]}")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACE_SECONDS, lifespan="on")
    server = Server(config)
    http = threading.Thread(target=server.run, name="llama-http", daemon=True)

    def shut_down(sig: int, frame) -> None:
        """Ctrl-C or SIGTERM: a graceful shutdown; a second one: at once. (uvicorn off the main thread installs
        no handlers; its own would re-raise the signal afterwards, and SIGTERM would exit with 143, not 0.)"""
        server.force_exit = server.should_exit
        server.should_exit = True

    previous = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # (compiled on a GPU: every batch size's decode step before the first request, not in the middle of serving)
        app.state.engine.scheduler.warm_up(lambda line: print(line, file=sys.stderr, flush=True))
        http.start()
        app.state.engine.run(until=lambda: not http.is_alive())
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return app.state.engine



def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
