"""`charlm serve`: a model behind the OpenAI completions protocol, and a page to try it, on Starlette + uvicorn.

Endpoints: GET /v1/models; POST /v1/completions (prompt, max_tokens, temperature, top_p, n, stop, seed,
stream, logprobs, echo; top_k as an extension); POST /v1/chat/completions answers that this is a
completion model; POST /charlm/complete fills the blank of "I love machine ___" (`charlm.sample.complete`);
GET / is the page. Every request is checked before it reaches the engine (`charlm.engine`), and every error
is a JSON body in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

A prompt is read as `charlm generate` reads it: as the start of a line (`charlm.sample.context_ids`), so
echo's first prompt token is scored given the line start; a prompt that starts with a newline is read as is,
and its first token has no context (logprob null, as in OpenAI's API).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from html import escape as html_escape
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.engine import Engine, Failed, Finished, Piece, QueueFull, Sampling, Sequence
from charlm.errors import CharlmError
from charlm.runtime import limit_threads
from charlm.sample import complete, context_ids

MAX_TOKENS = 4096
MAX_PROMPT_TOKENS = 8192
MAX_PROMPT_CHARS = 65536
MAX_PROMPTS = 16
MAX_CHOICES = 16
MAX_LOGPROBS = 5
MAX_STOPS = 4
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.25
# Fields of OpenAI's completions request that charlm accepts only at their no-op values.
NO_OP_FIELDS = {"best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                "logit_bias": (None, {}), "suffix": (None, "")}


class BadRequest(Exception):
    """A request that cannot be served as sent: 400 with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def model_id(checkpoint_folder: Path) -> str:
    """The name clients pass as `model`: the run's folder for run/best or run/last, else the folder's own."""
    folder = Path(checkpoint_folder)
    return folder.parent.name if folder.name in ("best", "last") and folder.parent.name else folder.name


def create_app(model, tokenizer, name: str, max_batch: int = 64, max_waiting: int = 64) -> Starlette:
    """The ASGI app serving `model` as `name`; its engine thread starts and stops with the app's lifespan."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_waiting=max_waiting)
    created = int(time.time())
    mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(engine.start)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    async def page(request: Request) -> Response:
        html = resources.files("charlm").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{model}}", html_escape(name)))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "charlm"}]})

    async def chat(request: Request) -> Response:
        return error_response(404, f"{name} is a completion model, not a chat model, so it is not served at "
                                   "v1/chat/completions; use v1/completions", param="model",
                              code="model_not_supported")

    async def completions(request: Request) -> Response:
        try:
            body = await _json_body(request)
            prompts, sampling, n, stream, include_usage = _parse_completion(body)
            sequences = _sequences(prompts, sampling, n, tokenizer)
            if len(sequences) > max_batch + max_waiting:
                raise BadRequest(f"{len(prompts)} prompt(s) x n={n} is {len(sequences)} completions; this server "
                                 f"holds at most {max_batch + max_waiting} at once", param="n")
        except BadRequest as exc:
            return error_response(400, str(exc), param=exc.param, code=exc.code)
        events: asyncio.Queue = asyncio.Queue()
        mailbox = mailboxes.setdefault(asyncio.get_running_loop(), _Mailbox(asyncio.get_running_loop()))
        for index, sequence in enumerate(sequences):
            sequence.emit = mailbox.emitter(events, index)
        try:
            engine.submit(sequences)
        except QueueFull as exc:
            return error_response(429, str(exc), kind="rate_limit_error", code="queue_full",
                                  headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        reply = _Reply(name, [index // n for index in range(len(sequences))], sampling.logprobs is not None)
        if stream:
            return StreamingResponse(_stream(reply, events, sequences, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(request, reply, events, sequences)

    async def fill_blank(request: Request) -> Response:
        try:
            body = await _json_body(request)
            text = body.get("text")
            top = body.get("top", 5)
            if not isinstance(text, str):
                raise BadRequest("text must be a string with one blank ___", param="text")
            if len(text) > MAX_PROMPT_CHARS:
                raise BadRequest(f"text is longer than {MAX_PROMPT_CHARS} characters", param="text")
            if not _is_int(top) or not 1 <= top <= 20:
                raise BadRequest("top must be an integer from 1 to 20", param="top")
        except BadRequest as exc:
            return error_response(400, str(exc), param=exc.param)
        try:
            found = await asyncio.wrap_future(engine.call(lambda: complete(model, tokenizer, text, top=top)))
        except CharlmError as exc:
            return error_response(400, str(exc), param="text")
        return JSONResponse({"completions": [{"text": c.text, "prob": c.prob} for c in found]})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, exc.detail or "not found")

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {exc}", kind="server_error")

    routes = [
        Route("/", page),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/charlm/complete", fill_blank, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: not_found, Exception: server_error})


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          max_waiting: int = 64, threads: int | None = None) -> None:
    """Load CHECKPOINT and serve it until SIGINT/SIGTERM, which finish the requests in flight first.
    `threads`: for the model's batched steps (default: the cores available)."""
    import uvicorn

    from charlm.checkpoint import load_model

    limit_threads(threads)
    model, tokenizer, ckpt = load_model(checkpoint)
    app = create_app(model, tokenizer, model_id(ckpt.folder), max_batch=max_batch, max_waiting=max_waiting)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                "stream_options", "logprobs", "echo", "user", *NO_OP_FIELDS}


def _parse_completion(body: dict):
    """(prompts, Sampling, n, stream, include_usage) from a completions request, or BadRequest."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"unrecognized request argument: {unknown[0]}", param=unknown[0])
    for key, allowed in NO_OP_FIELDS.items():
        if key in body and body[key] not in allowed:
            raise BadRequest(f"{key} is not supported by charlm (leave it out)", param=key)
    if "model" in body and not isinstance(body["model"], str):
        raise BadRequest("model must be a string", param="model")
    if "user" in body and not isinstance(body["user"], str):
        raise BadRequest("user must be a string", param="user")
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise BadRequest("prompt must be a string or a non-empty list of strings", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    max_tokens = _field(body, "max_tokens", 16, _is_int, 0, MAX_TOKENS, "an integer")
    temperature = _field(body, "temperature", 1.0, _is_number, 0, 2, "a number")
    top_p = _field(body, "top_p", 1.0, _is_number, 0, 1, "a number")
    if top_p == 0:
        raise BadRequest("top_p must be greater than 0", param="top_p")
    top_k = _field(body, "top_k", 0, _is_int, 0, 1 << 30, "an integer (0 = off)")
    n = _field(body, "n", 1, _is_int, 1, MAX_CHOICES, "an integer")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _field(body, "logprobs", None, _is_int, 0, MAX_LOGPROBS, "an integer")
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 1 << 63):
        raise BadRequest("seed must be a non-negative integer", param="seed")
    stop = body.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not (isinstance(stops, (list, tuple)) and len(stops) <= MAX_STOPS
            and all(isinstance(s, str) and s for s in stops)):
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
    for key in ("stream", "echo"):
        if not isinstance(body.get(key, False), bool):
            raise BadRequest(f"{key} must be true or false", param=key)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    sampling = Sampling(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                        seed=seed, logprobs=logprobs, stop=tuple(stops), echo=body.get("echo", False))
    return prompts, sampling, n, body.get("stream", False), options.get("include_usage", False)


def _field(body: dict, key: str, default, check, low, high, kind: str):
    value = body.get(key, default)
    if value is None:
        value = default
    if not check(value) or not low <= value <= high:
        raise BadRequest(f"{key} must be {kind} from {low} to {high}, got {json.dumps(value)}", param=key)
    return value


def _sequences(prompts: list[str], sampling: Sampling, n: int, tokenizer):
    """One engine sequence per (prompt, choice); choice j of a seeded request uses seed + j."""
    sequences = []
    for prompt in prompts:
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"the prompt is longer than {MAX_PROMPT_CHARS} characters", param="prompt",
                             code="prompt_too_long")
        try:
            ids = context_ids(tokenizer, prompt)
            own = len(tokenizer.encode(prompt))
        except CharlmError as exc:
            reason = str(exc).split(";")[0]  # the rest is the CLI's advice
            raise BadRequest(f"the prompt cannot be read by this model: {reason}", param="prompt",
                             code="unknown_characters") from None
        if len(ids) > MAX_PROMPT_TOKENS:
            raise BadRequest(f"the prompt is {len(ids)} tokens, over the limit of {MAX_PROMPT_TOKENS}",
                             param="prompt", code="prompt_too_long")
        for choice in range(n):
            seed = None if sampling.seed is None else sampling.seed + choice
            sequences.append(Sequence(ids, own, replace(sampling, seed=seed), emit=lambda event: None))
    return sequences


class _Mailbox:
    """Carries engine events to the event loop's queues: what the engine posts during a step is delivered by
    one wake-up of the loop, not one per token per request (each a write to the loop's wake-up socket)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple]] = []

    def emitter(self, events: asyncio.Queue, index: int):
        """An engine-thread callback that hands (choice index, event) to `events`."""
        def emit(event) -> None:
            with self._lock:
                self._items.append((events, (index, event)))
                first = len(self._items) == 1
            if first:
                self._loop.call_soon_threadsafe(self._deliver)
        return emit

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for events, item in items:
            events.put_nowait(item)


class _Reply:
    """OpenAI's completion objects for one request: each choice's text, logprobs, finish reason and usage.
    `prompt_of[i]` is the prompt of choice i (prompt tokens count once per prompt, as OpenAI counts them)."""

    def __init__(self, name: str, prompt_of: list[int], with_logprobs: bool):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.name = name
        self.prompt_of = prompt_of
        self.with_logprobs = with_logprobs
        choices = len(prompt_of)
        self.texts = [""] * choices
        self.logprobs = [_empty_logprobs() for _ in range(choices)]
        self.offsets = [0] * choices  # characters of token text so far, for text_offset
        self.finish: list[str | None] = [None] * choices
        self.prompt_tokens = [0] * choices
        self.completion_tokens = [0] * choices

    def add(self, index: int, piece: Piece) -> dict | None:
        """Record a piece of choice `index`; returns its logprobs fragment (None without logprobs)."""
        self.texts[index] += piece.text
        if not self.with_logprobs:
            return None
        fragment = _empty_logprobs()
        for token in piece.tokens:
            fragment["tokens"].append(token.text)
            fragment["token_logprobs"].append(token.logprob)
            fragment["top_logprobs"].append(token.top)
            fragment["text_offset"].append(self.offsets[index])
            self.offsets[index] += len(token.text)
        for key, values in fragment.items():
            self.logprobs[index][key].extend(values)
        return fragment

    def end(self, index: int, finished: Finished) -> None:
        self.finish[index] = finished.reason
        self.prompt_tokens[index] = finished.prompt_tokens
        self.completion_tokens[index] = finished.completion_tokens

    def usage(self) -> dict:
        per_prompt = {}
        for index, count in enumerate(self.prompt_tokens):
            per_prompt.setdefault(self.prompt_of[index], count)
        prompt, completion = sum(per_prompt.values()), sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        doc = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
               "choices": choices}
        if usage is not None:
            doc["usage"] = usage
        return doc

    def whole(self) -> dict:
        """The non-streamed response."""
        choices = [{"index": index, "text": text, "finish_reason": self.finish[index],
                    "logprobs": self._final_logprobs(index) if self.with_logprobs else None}
                   for index, text in enumerate(self.texts)]
        return self.chunk(choices, self.usage())

    def _final_logprobs(self, index: int) -> dict:
        """A stop string cuts the text inside or before the last tokens: keep those that begin before the cut."""
        logprobs = self.logprobs[index]
        if self.finish[index] != "stop":
            return logprobs
        keep = sum(1 for offset in logprobs["text_offset"] if offset < len(self.texts[index]))
        return {key: values[:keep] for key, values in logprobs.items()}


def _empty_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


async def _collect(request: Request, reply: _Reply, events: asyncio.Queue, sequences: list[Sequence]) -> Response:
    """Wait for every choice to end; a client that disconnects meanwhile cancels its sequences."""
    pending = len(sequences)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        while pending:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return Response(status_code=499)  # nobody is listening
            index, event = getter.result()
            if isinstance(event, Failed):
                return error_response(500, event.message, kind="server_error")
            if isinstance(event, Piece):
                reply.add(index, event)
            else:
                reply.end(index, event)
                pending -= 1
    finally:
        watcher.cancel()
        for sequence in sequences:
            sequence.cancel()
    return JSONResponse(reply.whole())


async def _stream(reply: _Reply, events: asyncio.Queue, sequences: list[Sequence], include_usage: bool):
    """Server-sent events: one chunk per piece of a choice, its finish reason last, then [DONE]. Events that
    are already waiting go out in one write. When the client goes away Starlette cancels this generator, and
    `finally` cancels its sequences."""
    pending = len(sequences)
    try:
        while pending:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            out = []
            for index, event in batch:
                if isinstance(event, Failed):
                    out.append(_sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                              "code": None}}))
                    pending = 0
                    break
                if isinstance(event, Piece):
                    fragment = reply.add(index, event)
                    if event.text or fragment:
                        out.append(_sse(reply.chunk([{"index": index, "text": event.text, "finish_reason": None,
                                                      "logprobs": fragment}])))
                else:
                    reply.end(index, event)
                    pending -= 1
                    out.append(_sse(reply.chunk([{"index": index, "text": "", "finish_reason": event.reason,
                                                  "logprobs": _empty_logprobs() if reply.with_logprobs else None}])))
            if pending == 0 and include_usage and all(reply.finish):
                out.append(_sse(reply.chunk([], reply.usage())))
            if pending == 0:
                out.append("data: [DONE]\n\n")
            yield "".join(out)
    finally:
        for sequence in sequences:
            sequence.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def _sse(doc: dict) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"
