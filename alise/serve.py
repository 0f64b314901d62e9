"""An OpenAI-compatible HTTP server: ``python -m alise.serve --model smollm2 --port 8000``.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"stream": true`` sends server-sent
events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text;
``?format=json`` for JSON).

How it works: one engine-loop thread owns the stepping. HTTP handlers (asyncio, in uvicorn's event loop) never
wait on the engine: they check the request, tokenize it, and post it to the loop's inbox; the loop adds it with
``engine.add_request`` between steps, steps the engine while anything is unfinished, and after each step hands
every request's new token ids to that request's ``asyncio.Queue`` (``call_soon_threadsafe``). A finished request
is released (``engine.pop``) by the loop at once; a handler whose client disconnects (or that hits a ``stop``
string) posts an abort, which the loop applies before its next step, so its KV is freed within one step.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field (``param``
names it), 404 for an unknown model, 400 ``context_length_exceeded`` for a prompt that leaves no room in the
context, 503 with ``Retry-After`` while ``--max-queue`` requests already wait for a seat, 401 for a wrong
``--api-key``.

Needs the ``serve`` extra: ``pip install -e ".[serve]"`` (FastAPI and uvicorn).
"""

import argparse
import asyncio
import ctypes
import json
import logging
import os
import queue as thread_queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from alise.config import add_renamed_flag
from alise.sampling import SamplingParams
from alise.tokenizer import IncrementalDecoder

log = logging.getLogger("alise.serve")

DEFAULT_MAX_QUEUE = 256
RETRY_AFTER_S = 1
DEFAULT_COMPLETION_MAX_TOKENS = 16     # OpenAI's default for /v1/completions; chat defaults to the context left
MAX_STOP_STRINGS = 16

# -- errors -------------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error the client sees as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if not message.startswith(param) else message, param=param)

# -- the engine loop ----------------------------------------------------------------------------------------------

@dataclass
class Event:
    """What the loop hands a request's queue: new token ids, and at the end why it finished."""
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list | None = None
    accepted: bool = False               # the first event: the engine took the request (or refused it: error)

@dataclass
class _Stream:
    request_id: str
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    sent: int = 0

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:        # the event loop is closed: nobody is listening any more
            pass

@dataclass
class Counters:
    requests: int = 0
    finished: int = 0
    aborted: int = 0                 # client disconnects, stop strings, engine errors
    rejected_queue_full: int = 0
    rejected_bad_request: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0

# glibc's malloc, for a server that must come back to its resident size after load. A long-running process that
# allocates tensors of every size from several threads kept growing, ~110-430 MB per round of a 200-client soak:
# glibc raises its mmap threshold each time a large block is freed, after which blocks of that size come from
# the heap, where freed memory stays resident (fragmented). Pinning the threshold (``mallopt``) keeps large
# tensors in mmap'd memory, returned at free; ``malloc_trim`` when the loop goes idle returns the heap's free
# pages. Neither changes what the engine computes. (Setting MALLOC_MMAP_THRESHOLD_ in the environment wins.)
M_MMAP_THRESHOLD = -3             # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, pinned


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:         # not glibc (macOS, musl, Windows): nothing to tune
        return None


GLIBC = _glibc()


def pin_mmap_threshold() -> None:
    """Keep large allocations out of the heap for this process (glibc only; see above)."""
    if GLIBC is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        GLIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class EngineLoop:
    """The one thread that steps the engine. Handlers talk to it only through ``submit`` and ``abort``."""

    def __init__(self, engine):
        self.engine = engine
        self.streams: dict[str, _Stream] = {}
        self.inbox: thread_queue.SimpleQueue = thread_queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopped = False
        self.in_flight = 0            # submitted, not finished or aborted (counted by the handlers' side)
        self.counters = Counters()
        self.error: str | None = None  # set if the loop itself died
        self.thread = threading.Thread(target=self._run, name="alise-engine-loop", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> _Stream:
        """Queue a request; its events arrive on the returned stream's queue (first one: accepted or refused)."""
        stream = _Stream(request_id, asyncio.Queue(), asyncio.get_running_loop())
        self.in_flight += 1           # only the event loop's thread changes it
        self.inbox.put(("add", stream, prompt_ids, params))
        self.wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Release the request (abort it if it runs) before the next step; harmless if it already finished."""
        self.inbox.put(("abort", request_id))
        self.wake.set()

    # -- the loop thread --

    def _run(self) -> None:
        engine = self.engine
        busy = False
        try:
            while not self.stopped:
                self.wake.clear()
                self._drain_inbox()
                was_busy, busy = busy, engine.has_unfinished()
                if was_busy and not busy and GLIBC is not None:
                    GLIBC.malloc_trim(0)     # idle after work: give the heap's free pages back (see GLIBC)
                if busy:
                    with engine.lock:
                        try:
                            engine.step()
                            self.counters.steps += 1
                        except Exception as e:       # a failed step fails the requests in it, not the server
                            log.exception("engine step failed")
                            self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                        self._harvest()
                else:
                    self.wake.wait(timeout=1.0)
        except BaseException as e:   # noqa: BLE001 - keep the reason for /health
            self.error = f"{type(e).__name__}: {e}"
            log.exception("engine loop died")
            self._fail_all(f"engine loop died: {self.error}")
            raise
        finally:
            self._fail_all("server shutting down")

    def _drain_inbox(self) -> None:
        engine = self.engine
        while True:
            try:
                item = self.inbox.get_nowait()
            except thread_queue.Empty:
                return
            if item[0] == "add":
                _, stream, prompt_ids, params = item
                try:
                    with engine.lock:
                        engine.add_request(prompt_ids, params, request_id=stream.request_id)
                        if engine.is_finished(stream.request_id):   # refused at once (e.g. longer than the KV pool)
                            out = engine.pop(stream.request_id)
                            stream.put(Event([], accepted=True, finish_reason=out.finish_reason, error=out.error))
                            continue
                except ValueError as e:
                    stream.put(Event([], accepted=True, finish_reason="abort", error=str(e)))
                    continue
                self.streams[stream.request_id] = stream
                stream.put(Event([], accepted=True))
            else:
                request_id = item[1]
                self.streams.pop(request_id, None)
                with engine.lock:
                    if engine.has_request(request_id):
                        engine.pop(request_id)

    def _harvest(self) -> None:
        """Hand every request's new tokens to its queue; release the ones that finished."""
        engine = self.engine
        for rid, stream in list(self.streams.items()):
            if not engine.has_request(rid):          # released behind our back
                del self.streams[rid]
                stream.put(Event([], finish_reason="abort", error="request was released"))
                continue
            new = engine.token_ids(rid, stream.sent)
            stream.sent += len(new)
            if engine.is_finished(rid):
                out = engine.pop(rid)
                stream.put(Event(new, finish_reason=out.finish_reason, error=out.error,
                                 prompt_logprobs=out.prompt_logprobs))
                del self.streams[rid]
            elif new:
                stream.put(Event(new))

    def _fail_all(self, message: str) -> None:
        engine = self.engine
        with engine.lock:
            for rid, stream in list(self.streams.items()):
                stream.put(Event([], finish_reason="abort", error=message))
                if engine.has_request(rid):
                    try:
                        engine.pop(rid)
                    except Exception:       # noqa: BLE001 - best effort while failing
                        log.exception("releasing %s failed", rid)
            self.streams.clear()

# -- request parsing ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    """A checked request: what to run, and how to answer."""
    kind: str                                  # "completion" | "chat"
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    stop: list[str] = field(default_factory=list)
    prompt_logprobs: bool = False
    echo_prompt: str | None = None

def _get(body: dict, name: str, types: tuple, default=None, what: str = ""):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise bad(name, f"must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise bad(name, f"must be {what}, got {json.dumps(value)[:80]}")
    return value

def _unsupported(body: dict, name: str, allowed=(None,), hint: str = "") -> None:
    if name in body and body[name] not in allowed:
        raise bad(name, f"not supported by this server{hint} (got {json.dumps(body[name])[:80]})")

class Parser:
    def __init__(self, engine, model_names: list[str]):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_names = model_names
        self.vocab_size = engine.model.config.vocab_size

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return                   # curl users may leave it out: there is one model
        if not isinstance(model, str):
            raise bad("model", f"must be a string, got {json.dumps(model)[:80]}")
        if model not in self.model_names:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model_names[0]!r}",
                           param="model", code="model_not_found")

    def completion(self, body: dict) -> Job:
        if "prompt" not in body or body["prompt"] is None:
            raise bad("prompt", "required (a string or a list of token ids)")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]                 # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise bad("prompt", "must not be empty")
            try:
                ids = self.tokenizer.encode(prompt)
            except Exception as e:   # noqa: BLE001 - e.g. a lone surrogate
                raise bad("prompt", f"could not be tokenized ({type(e).__name__})") from None
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            bad_ids = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad_ids:
                raise bad("prompt", f"token ids must be in [0, {self.vocab_size}), got {bad_ids[0]}")
            ids = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise bad("prompt", "only one prompt per request is supported (send several requests)")
        else:
            raise bad("prompt", "must be a non-empty string or a non-empty list of token ids")
        _unsupported(body, "suffix")
        _unsupported(body, "echo", (None, False))
        _unsupported(body, "best_of", (None, 1))
        _unsupported(body, "logprobs", (None, 0), ": only prompt_logprobs (an extension)")
        return self._job("completion", body, ids, DEFAULT_COMPLETION_MAX_TOKENS)

    def chat(self, body: dict) -> Job:
        messages = body.get("messages")
        if messages is None:
            raise bad("messages", "required (a non-empty list of {'role', 'content'} objects)")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "must be a non-empty list of {'role', 'content'} objects")
        flat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad("messages", f"messages[{i}] must be an object with 'role' and 'content'")
            content = m.get("content")
            if isinstance(content, list):      # OpenAI content parts: text only
                texts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):
                        raise bad("messages", f"messages[{i}].content: only text parts are supported")
                    texts.append(part["text"])
                content = "".join(texts)
            flat.append({"role": m.get("role"), "content": content} |
                        {k: v for k, v in m.items() if k not in ("role", "content")})
        try:
            text = self.tokenizer.apply_chat_template(flat)
            ids = self.tokenizer.encode(text, add_special_tokens=False)   # the template holds its own BOS
        except ValueError as e:
            raise bad("messages", str(e)) from None
        except Exception as e:   # noqa: BLE001 - a template that raised on these messages
            raise bad("messages", f"the chat template failed on them ({type(e).__name__}: {e})") from None
        _unsupported(body, "logprobs", (None, False), ": only prompt_logprobs (an extension)")
        _unsupported(body, "top_logprobs", (None, 0))
        _unsupported(body, "tools", (None, []))
        _unsupported(body, "tool_choice", (None, "none", "auto"))
        rf = body.get("response_format")
        if rf is not None and rf != {"type": "text"}:
            raise bad("response_format", "only {'type': 'text'} is supported")
        if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
            body = body | {"max_tokens": body["max_completion_tokens"]}
            name = "max_completion_tokens"
        else:
            name = "max_tokens"
        return self._job("chat", body, ids, None, max_tokens_name=name)

    def _job(self, kind: str, body: dict, ids: list[int], default_max_tokens: int | None,
             max_tokens_name: str = "max_tokens") -> Job:
        limit = self.engine.max_model_len
        where = "prompt" if kind == "completion" else "messages"
        if len(ids) >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the {where} has "
                                f"{len(ids)} tokens, which leaves no room for output. Shorten it.",
                           param=where, code="context_length_exceeded")
        room = limit - len(ids)
        n = body.get("n")
        if n is not None and (isinstance(n, bool) or n != 1):
            raise bad("n", f"only n=1 is supported, got {json.dumps(n)[:40]}")
        for name in ("presence_penalty", "frequency_penalty"):
            _unsupported(body, name, (None, 0, 0.0))
        _unsupported(body, "logit_bias", (None, {}))
        stream = _get(body, "stream", (bool,), False, "a bool")
        options = _get(body, "stream_options", (dict,), {}, "an object")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options", "include_usage must be a bool")
        max_tokens = _max_tokens(body, max_tokens_name, default_max_tokens, room)
        stop_strings, stop_ids = _stops(body)
        prompt_logprobs = body.get("prompt_logprobs")
        if prompt_logprobs is not None and not isinstance(prompt_logprobs, (bool, int)):
            raise bad("prompt_logprobs", "must be a bool")
        prompt_logprobs = bool(prompt_logprobs)
        top_k = body.get("top_k")
        if top_k == -1:           # vLLM's spelling of "off"
            top_k = 0
        fields = {"temperature": body.get("temperature"), "top_p": body.get("top_p"), "top_k": top_k,
                  "seed": body.get("seed"), "ignore_eos": body.get("ignore_eos")}
        try:
            params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_ids, prompt_logprobs=prompt_logprobs,
                                    **{k: v for k, v in fields.items() if v is not None})
        except ValueError as e:
            message = str(e)
            param = message.split(" ", 1)[0]
            raise bad(param if param in fields else "request", message) from None
        except TypeError as e:
            raise bad("request", str(e)) from None
        return Job(kind, ids, params, stream, include_usage, stop_strings, prompt_logprobs)

def _max_tokens(body: dict, name: str, default: int | None, room: int) -> int:
    """The request's output budget, at most the ``room`` its prompt leaves in the context."""
    max_tokens = body.get(name)
    if max_tokens is None:
        return min(default or room, room)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1:
        return min(max_tokens, room)   # the engine stops at the context anyway; say "length"
    raise bad(name, f"must be an int >= 1, got {json.dumps(max_tokens)[:40]}")

def _stops(body: dict) -> tuple[list[str], list[int]]:
    """``stop`` (strings and token ids) and the ``stop_token_ids`` extension: (stop strings, stop token ids)."""
    stop = body.get("stop")
    stop_strings, stop_ids = [], []
    if stop is not None:
        items = [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
        if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS or not all(
                (isinstance(s, str) and s) or (isinstance(s, int) and not isinstance(s, bool) and s >= 0)
                for s in items):
            raise bad("stop", f"must be a non-empty string, a token id, or a list of at most "
                              f"{MAX_STOP_STRINGS} of those")
        stop_strings = [s for s in items if isinstance(s, str)]
        stop_ids = [s for s in items if isinstance(s, int)]
    extra_ids = body.get("stop_token_ids")
    if extra_ids is not None:
        if not isinstance(extra_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in extra_ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        stop_ids += extra_ids
    return stop_strings, stop_ids

# -- detokenizing, stop strings ------------------------------------------------------------------------------------

class TextStream:
    """Token ids in, text deltas out: incremental detokenizing, ``stop`` strings cut at their first match, and
    text that might begin a stop string held back until it cannot."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = stop
        self.text = ""
        self.emitted = 0
        self.num_tokens = 0
        self.stopped = False

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """The text that may be sent now; ``self.stopped`` once a stop string was found (nothing after it)."""
        for t in token_ids:
            self.num_tokens += 1
            self.text += self.decoder.push(t)
            if self.stop and self._cut():
                return self._take(len(self.text))
        if final:
            self.text += self.decoder.flush()
            if self.stop and self._cut():
                return self._take(len(self.text))
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def _cut(self) -> bool:
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.stopped = True
        return True

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

# -- the app -------------------------------------------------------------------------------------------------------

class Server:
    """Everything the handlers share: the engine, its loop, the parser, the limits."""

    def __init__(self, llm, model_name: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 api_key: str | None = None, extra_names: list[str] | None = None):
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        engine = llm.engine if hasattr(llm, "engine") else llm
        self.engine = engine
        name = model_name or engine.config.model
        self.model_names = [name] + [n for n in (extra_names or []) if n != name]
        self.max_queue = max_queue
        self.api_key = api_key
        self.parser = Parser(engine, self.model_names)
        self.loop = EngineLoop(engine)
        self.created = int(time.time())

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def queue_full(self) -> bool:
        """Submitted, unfinished requests beyond the engine's seats count as queued."""
        return self.loop.in_flight - self.engine.config.max_num_seqs >= self.max_queue

    def metrics(self) -> dict:
        engine = self.engine
        stats = engine.stats()
        total, used = stats.kv_blocks_total, stats.kv_blocks_used
        c = self.loop.counters
        return {"model": self.model_name, "scheduler_policy": engine.config.policy,
                "requests_waiting": stats.num_waiting,
                "requests_running": stats.num_running, "requests_in_flight": self.loop.in_flight,
                "max_num_seqs": engine.config.max_num_seqs, "max_queue": self.max_queue,
                "kv_blocks_used": used, "kv_blocks_total": total,
                "kv_usage": used / total if total else 0.0, "requests_total": c.requests,
                "requests_finished_total": c.finished, "requests_aborted_total": c.aborted,
                "requests_rejected_queue_full_total": c.rejected_queue_full,
                "requests_rejected_bad_total": c.rejected_bad_request, "prompt_tokens_total": c.prompt_tokens,
                "generation_tokens_total": c.generation_tokens, "engine_steps_total": c.steps}

def _prometheus(m: dict) -> str:
    lines = []
    for key, value in m.items():
        if isinstance(value, str):
            continue
        kind = "counter" if key.endswith("_total") and key != "kv_blocks_total" else "gauge"
        lines += [f"# TYPE alise_{key} {kind}", f"alise_{key} {value}"]
    lines += ["# TYPE alise_scheduler_info gauge",
              f'alise_scheduler_info{{policy="{m["scheduler_policy"]}",model="{m["model"]}"}} 1']
    return "\n".join(lines) + "\n"

def create_app(server: Server):
    """The FastAPI app over ``server``; its engine loop starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        if not server.loop.thread.is_alive():
            server.loop.start()
        yield
        server.loop.stop()

    app = FastAPI(title="alise", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        if exc.status == 400:
            server.loop.counters.rejected_bad_request += 1
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    _add_info_routes(app, server)
    _add_generation_routes(app, server)
    return app

def _add_info_routes(app, server: Server) -> None:
    """``GET /health``, ``/v1/models`` and ``/metrics``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSONResponse({"status": "error", "error": server.loop.error or "engine loop not running"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(server, request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": server.created, "owned_by": "alise",
             "max_model_len": server.engine.max_model_len} for name in server.model_names]}

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        m = server.metrics()
        if format == "json":
            return m
        return PlainTextResponse(_prometheus(m))

def _add_generation_routes(app, server: Server) -> None:
    """``POST /v1/completions`` and ``/v1/chat/completions``."""
    from fastapi import Request

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_body(server, request)
        return await _generate(server, request, body, server.parser.completion(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(server, request)
        return await _generate(server, request, body, server.parser.chat(body))

def _check_auth(server: Server, request) -> None:
    if server.api_key and request.headers.get("authorization") != f"Bearer {server.api_key}":
        raise ApiError(401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key")

async def _read_body(server: Server, request) -> dict:
    _check_auth(server, request)
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", param="body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", param="body")
    server.parser.check_model(body)
    return body

async def _generate(server: Server, request, body: dict, job: Job):
    """Run a checked request: 503 when the engine is down or the queue is full; else submit it, wait until the
    engine accepts it, and answer with one JSON body or a stream of server-sent events."""
    from fastapi.responses import Response, StreamingResponse
    loop = server.loop
    if not loop.alive:
        raise ApiError(503, f"the engine is not running ({loop.error})", type="server_error",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    if server.queue_full():
        loop.counters.rejected_queue_full += 1
        raise ApiError(503, f"the server's queue is full ({server.max_queue} requests wait for a seat); "
                            f"retry later", type="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    call = _Call(server, request, job, model=body.get("model") or server.model_name)
    try:
        first = await _next(call.stream.queue, call.disconnected)
    except ClientGone:
        call.release("disconnect")
        return Response(status_code=499)
    except BaseException:
        call.release("disconnect")
        raise
    if first.error:               # the engine refused it: a bad request, nothing started
        call.release(None, count=False)
        raise ApiError(400, first.error, param="prompt" if job.kind == "completion" else "messages")
    loop.counters.prompt_tokens += len(job.prompt_ids)
    if not job.stream:
        return await call.complete()
    return StreamingResponse(call.sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": call.rid})

class _Call:
    """One generation request on the server: submitted to the engine loop, its events turned into text, and
    released exactly once (finished, or aborted: a client that went away, a stop string)."""

    def __init__(self, server: Server, request, job: Job, model: str):
        self.loop, self.job, self.model = server.loop, job, model
        self.rid = f"{'cmpl' if job.kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.disconnected = asyncio.ensure_future(_wait_disconnect(request))
        self.stream = self.loop.submit(job.prompt_ids, job.params, self.rid)
        self.loop.counters.requests += 1
        self.done = False
        self.text = TextStream(server.engine.tokenizer, job.stop)
        self.created = int(time.time())
        # the client may go away at any point, even before a streaming body starts: abort at once
        self.disconnected.add_done_callback(lambda f: None if f.cancelled() else self.release("disconnect"))

    def release(self, reason: str | None, count: bool = True) -> None:
        """Once per request: ``reason`` None when the loop released it (finished), else abort it now."""
        if self.done:
            return
        self.done = True
        self.loop.in_flight -= 1
        self.disconnected.cancel()
        if reason is None:
            self.loop.counters.finished += count
        else:
            self.loop.counters.aborted += 1
            self.loop.abort(self.rid)

    def _ended(self, last: Event | None) -> None:
        """After the last event read: a finished request the loop released; else a stop string ended it."""
        self.release(None if last is not None and last.finish_reason is not None else "stop string")
        self.loop.counters.generation_tokens += self.text.num_tokens

    async def complete(self):
        """The whole answer as one JSON body."""
        from fastapi.responses import Response
        try:
            pieces, reason, last = [], None, None
            async for event in _events(self.stream.queue, self.disconnected):
                pieces.append(self.text.push(event.token_ids, final=event.finish_reason is not None))
                last = event
                if self.text.stopped:
                    reason = "stop"
                    break
                if event.finish_reason is not None:
                    reason = event.finish_reason
                    break
        except ClientGone:
            self.release("disconnect")
            return Response(status_code=499)      # nobody reads it
        except BaseException:
            self.release("disconnect")
            raise
        self._ended(last)
        if last is not None and last.error and reason == "abort":
            raise ApiError(500, last.error, type="server_error")
        return _final_body(self.job, self.rid, self.model, self.created, "".join(pieces), reason,
                           self.text.num_tokens, last.prompt_logprobs if last is not None else None)

    async def sse(self):
        """The answer as server-sent events: a chunk per text delta, the final chunk(s), ``[DONE]``."""
        job, reason, last = self.job, None, None
        try:
            if job.kind == "chat":
                yield _sse(self._chunk({"role": "assistant", "content": ""}, None))
            async for event in _events(self.stream.queue, self.disconnected):
                delta = self.text.push(event.token_ids, final=event.finish_reason is not None)
                last = event
                if self.text.stopped:
                    reason = "stop"
                elif event.finish_reason is not None:
                    reason = event.finish_reason
                if delta:
                    yield _sse(self._chunk(delta, None))
                if reason is not None:
                    break
            self._ended(last)
            for line in self._sse_end(reason, last):
                yield line
        except ClientGone:
            pass
        finally:              # disconnected (cancelled, or a failed send): abort at once
            self.release("disconnect")

    def _chunk(self, delta, reason: str | None) -> dict:
        return _chunk(self.job, self.rid, self.model, self.created, delta, reason)

    def _sse_end(self, reason: str | None, last: Event | None) -> list[str]:
        """The final chunk (finish reason, usage, an error, prompt log-probs), then ``[DONE]``."""
        job = self.job
        usage = _usage(len(job.prompt_ids), self.text.num_tokens)
        end = self._chunk("" if job.kind == "completion" else {}, reason)
        if last is not None and last.error and reason == "abort":
            end["error"] = {"message": last.error, "type": "server_error"}
        if job.prompt_logprobs and last is not None:
            end["choices"][0]["prompt_logprobs"] = last.prompt_logprobs
        if job.include_usage:
            lines = [_sse(end), _sse(self._chunk(None, None) | {"choices": [], "usage": usage})]
        else:
            lines = [_sse(end | {"usage": usage})]
        return lines + ["data: [DONE]\n\n"]

async def _wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

class ClientGone(Exception):
    pass

async def _next(q: asyncio.Queue, disconnected: asyncio.Future) -> Event:
    if not q.empty():
        return q.get_nowait()
    get = asyncio.ensure_future(q.get())
    try:
        await asyncio.wait({get, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    if get.done() and not get.cancelled():
        return get.result()
    raise ClientGone()

async def _events(q: asyncio.Queue, disconnected: asyncio.Future):
    while True:
        event = await _next(q, disconnected)
        # a burst of steps while we were busy: merge what is queued into one event
        while not q.empty() and event.finish_reason is None:
            more = q.get_nowait()
            event = Event(event.token_ids + more.token_ids, more.finish_reason, more.error, more.prompt_logprobs)
        yield event
        if event.finish_reason is not None:
            return

def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

def _chunk(job: Job, rid: str, model: str, created: int, delta, reason: str | None) -> dict:
    if job.kind == "completion":
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    else:
        content = {"content": delta} if isinstance(delta, str) else (delta or {})
        choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

def _final_body(job: Job, rid: str, model: str, created: int, text: str, reason: str | None, num_tokens: int,
                prompt_logprobs) -> dict:
    if job.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        obj = "chat.completion"
    if job.prompt_logprobs:
        choice["prompt_logprobs"] = prompt_logprobs
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": _usage(len(job.prompt_ids), num_tokens)}

# -- command line --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m alise.serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions "
                    "with streaming, /v1/models, /health, /metrics). Needs: pip install -e '.[serve]'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="registry name (smollm2) or an HF-style folder")
    ap.add_argument("--served-model-name", default=None,
                    help="the name clients pass as 'model' (default: the --model argument)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("ALISE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $ALISE_API_KEY, else no key)")
    ap.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                    help="requests allowed to wait for a seat beyond --max-num-seqs; more get 503 + Retry-After")
    e = ap.add_argument_group("engine (the LLM(...) options; README, 'Use it from Python')")
    e.add_argument("--policy", default="alise", choices=["fcfs", "alise"],
                   help="fcfs, or alise: shortest predicted remaining work first")
    add_renamed_flag(e, "--scheduler", "--policy", choices=["fcfs", "alise"])
    e.add_argument("--kv-dtype", default="auto", choices=["auto", "bf16", "int8", "int4"],
                   help="KV cache page format (auto: the model's dtype)")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights and activations (auto: bfloat16 where the hardware computes it fast)")
    e.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--max-num-seqs", type=int, default=64, help="seats: sequences in one step")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step")
    e.add_argument("--max-model-len", type=int, default=None, help="context cap (default: the model's)")
    e.add_argument("--kv-cache-blocks", type=int, default=None, help="KV pool size in blocks")
    e.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV pool size in GiB (default: 1 on CPU, 90%% of free memory on CUDA)")
    e.add_argument("--swap-space-gb", type=float, default=1.0, help="host memory for preempted requests' KV")
    e.add_argument("--embedder", default="model", choices=["model", "minilm"],
                   help="the alise length predictor's prompt embedder")
    add_renamed_flag(e, "--predictor", "--embedder", choices=["model", "minilm"])
    e.add_argument("--predictor-history", default=None,
                   help="JSONL {prompt, output_len} that warm-starts the length predictor")
    e.add_argument("--compile", action="store_true",
                   help="CPU: compile the decode step with torch.compile (faster; a minute or two at first use)")
    e.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap

LLM_OPTIONS = ("policy", "kv_dtype", "dtype", "backend", "device", "max_num_seqs", "max_num_batched_tokens",
               "max_model_len", "kv_cache_blocks", "kv_cache_memory_gb", "swap_space_gb", "embedder",
               "predictor_history", "compile", "seed")

def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        import uvicorn
        import fastapi  # noqa: F401
    except ImportError:
        ap.error("the server needs FastAPI and uvicorn: pip install -e '.[serve]'")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from alise import LLM
    pin_mmap_threshold()        # before the model and the pool are allocated
    try:
        llm = LLM(args.model, **{k: getattr(args, k) for k in LLM_OPTIONS})
        server = Server(llm, model_name=args.served_model_name or args.model, max_queue=args.max_queue,
                        api_key=args.api_key)
    except ValueError as e:
        ap.error(str(e))
    log.info("serving %s (dtype %s, policy %s, %d KV blocks) on http://%s:%d/v1", server.model_name,
             llm.engine.dtype, args.policy, llm.engine.stats().kv_blocks_total, args.host, args.port)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_keep_alive=30)

if __name__ == "__main__":
    main()
