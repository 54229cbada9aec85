"""`cmat serve`: model.dir (+ a PEFT adapter) behind an OpenAI-compatible chat-completions API.

Run it:
    cmat serve                                        # model.dir + serve.adapter on 127.0.0.1:8000
    cmat serve --set serve.adapter='' --set serve.host=0.0.0.0 --set serve.port=8001
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "cmat", "messages": [{"role": "user", "content": "Hi"}]}'
Endpoints: POST /v1/chat/completions (a JSON reply, or server-sent events in OpenAI's chunk format with
`"stream": true`), GET /v1/models, GET /stats (requests, batch sizes, tokens), GET /health.

Batching: one worker thread owns the model. A request waits up to serve.batch_window_ms for others; all of
them (up to serve.max_batch_size) are served by one `HFPolicy.generate_ids` call, each with its own
max_tokens. Requests with different temperature / top_p / stop go to separate calls of the same round.
Fields a request leaves out take the `generation` section's values (greedy by default, not OpenAI's 1.0).
Errors are OpenAI error objects: unknown model 404 `model_not_found`; a malformed body 400
`invalid_request_error`; prompt + max_tokens over generation.max_context_tokens 400 `context_length_exceeded`;
a missing or wrong key 401 when the serve.api_key_env variable is set. docs/SERVING.md: AgentBench, vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from cmat_pipeline.config import Params, ServeConfig
from cmat_pipeline.errors import ModelPreparationError
from cmat_pipeline.runtime.policy import HFPolicy, PolicyOutput, cut_at_stop

log = logging.getLogger("cmat.serve")


# ------------------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One request waiting for the worker; results come back through `events` on the request's event loop."""

    ids: list[int]
    limit: int
    sampling: tuple[float, float, tuple[str, ...]]  # temperature, top_p, stop strings
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def settled(text: str, stops: list[str]) -> str:
    """The part of a partial completion that later tokens cannot change: no trailing whitespace (the final
    text is stripped), no half-decoded character, no tail that could still grow into a stop string."""
    text = text.rstrip().rstrip("\ufffd")
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                text = text[:-n]
                break
    return text.rstrip()


class RowStreamer:
    """A `generate` streamer for a whole batch: sends each streaming request the new text of its row."""

    def __init__(self, tokenizer: Any, stops: list[str], jobs: list[Job]):
        self.tokenizer, self.stops, self.jobs = tokenizer, stops, jobs
        self.ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.finished = [not job.stream for job in jobs]
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt ids
            self.prompt_seen = True
            return
        for k, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[k]:
                continue
            if token in self.ends:
                self.finished[k] = True
                continue
            self.tokens[k].append(token)
            self.finished[k] = len(self.tokens[k]) >= self.jobs[k].limit
            self._emit(k)

    def end(self) -> None:
        """Nothing to flush: the final reply carries whatever was held back."""

    def _emit(self, k: int) -> None:
        text = self.tokenizer.decode(self.tokens[k], skip_special_tokens=False)
        cut = cut_at_stop(text, self.stops)
        self.finished[k] = self.finished[k] or cut != text
        safe = settled(cut.lstrip(), self.stops)
        if len(safe) > len(self.sent[k]) and safe.startswith(self.sent[k]):
            self.jobs[k].send("delta", safe[len(self.sent[k]):])
            self.sent[k] = safe


class Batcher:
    """The worker thread: collects requests for a short window, then serves them in batched generate calls."""

    def __init__(self, policy: HFPolicy, max_batch: int, window_s: float):
        self.policy, self.max_batch, self.window_s = policy, max_batch, window_s
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.generate_seconds = 0.0
        self.thread = threading.Thread(target=self._work, name="cmat-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {**self.counts, "batches": sum(self.batch_sizes.values()),
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "max_batch_size_seen": max(self.batch_sizes, default=0),
                    "generate_seconds": round(self.generate_seconds, 3)}

    def _collect(self) -> list[Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        jobs, deadline = [first], time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # closing: serve what is here, then stop
                self.jobs.put(None)
                break
            jobs.append(job)
        return jobs

    def _work(self) -> None:
        while (jobs := self._collect()) is not None:
            groups: dict[tuple, list[Job]] = defaultdict(list)
            for job in jobs:
                groups[job.sampling].append(job)
            for (temperature, top_p, stop), group in groups.items():
                gen = dataclasses.replace(self.policy.gen, temperature=temperature, top_p=top_p, stop=list(stop),
                                          max_new_tokens=max(job.limit for job in group))
                self._run(group, gen)

    def _run(self, group: list[Job], gen: Any) -> None:
        streamer = RowStreamer(self.policy.tokenizer, self.policy.stops(gen), group) \
            if any(job.stream for job in group) else None
        start = time.perf_counter()
        try:
            outputs = self.policy.generate_ids([job.ids for job in group], gen, [job.limit for job in group], streamer)
        except Exception as err:  # this batch fails with a 500; the server keeps serving
            log.exception("generate failed for a batch of %d", len(group))
            for job in group:
                job.send("error", f"generation failed: {type(err).__name__}: {err}")
            return
        with self.lock:
            self.generate_seconds += time.perf_counter() - start
            self.batch_sizes[len(group)] += 1
            self.counts["requests"] += len(group)
            self.counts["prompt_tokens"] += sum(o.prompt_tokens for o in outputs)
            self.counts["completion_tokens"] += sum(o.completion_tokens for o in outputs)
        for job, output in zip(group, outputs):
            job.send("done", output)


# ------------------------------------------------------------------------------------- HTTP API


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The chat-completions fields this server reads; others (user, seed, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(policy: HFPolicy, cfg: ServeConfig):
    """The FastAPI app; its batching worker starts and stops with the app (lifespan)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    gen = policy.gen
    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state["batcher"] = Batcher(policy, cfg.max_batch_size, cfg.batch_window_ms / 1000)
        try:
            yield
        finally:
            state.pop("batcher").close()

    app = FastAPI(title="cmat serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        locs = [[x for x in e.get("loc", ()) if x != "body"] for e in err.errors()]
        param = str(locs[0][0]) if locs and locs[0] else None
        return JSONResponse(APIError(400, _validation_message(err.errors()), param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code).body(), status_code=err.status_code)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        key = os.environ.get(cfg.api_key_env)
        if key and request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {key}":
            err = APIError(401, f"missing or wrong API key (this server requires ${cfg.api_key_env})",
                           "invalid_api_key", kind="authentication_error")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return state["batcher"].stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "cmat", "root": policy.name,
             "max_model_len": gen.max_context_tokens}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if req.model != cfg.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{cfg.model_name}`",
                           "model_not_found", "model")
        conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = policy.encode(conversation)
        except Exception as err:  # the chat template rejects this conversation
            raise APIError(400, f"messages: the chat template cannot render them: {err}", param="messages") from None
        limit = req.max_completion_tokens or req.max_tokens or gen.max_new_tokens
        if len(ids) + limit > gen.max_context_tokens:
            raise APIError(400, f"This model's maximum context length is {gen.max_context_tokens} tokens. However, "
                                f"you requested {len(ids) + limit} tokens ({len(ids)} in the messages, {limit} in the "
                                "completion). Please reduce the length of the messages or completion.",
                           "context_length_exceeded", "messages")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop if req.stop is not None else gen.stop)
        sampling = (gen.temperature if req.temperature is None else req.temperature,
                    gen.top_p if req.top_p is None else req.top_p, tuple(s for s in stop if s))
        job = Job(ids, limit, sampling, req.stream, asyncio.get_running_loop(), asyncio.Queue())
        state["batcher"].submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": cfg.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(job, meta, include_usage), media_type="text/event-stream")
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise APIError(500, value, "generation_failed", kind="server_error")
            if kind == "done":
                return {**meta, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": value.text},
                    "finish_reason": value.finish_reason, "logprobs": None}], "usage": _usage(value)}

    return app


def _usage(out: PolicyOutput) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(job: Job, meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: the role, content deltas, the finish reason, [usage], [DONE]."""

    def chunk(delta: dict[str, str], finish: str | None) -> str:
        return _sse({**meta, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    yield chunk({"role": "assistant", "content": ""}, None)
    sent = ""
    while True:
        kind, value = await job.events.get()
        if kind == "delta":
            sent += value
            yield chunk({"content": value}, None)
        elif kind == "error":
            yield _sse(APIError(500, value, "generation_failed", kind="server_error").body())
            break
        else:
            rest = value.text[len(sent):] if value.text.startswith(sent) else ""
            if rest:
                yield chunk({"content": rest}, None)
            yield chunk({}, value.finish_reason)
            if include_usage:
                yield _sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)})
            break
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------- running it


def load_policy(params: Params) -> HFPolicy:
    """model.dir + serve.adapter, decoding defaults from the `generation` section."""
    adapter = params.serve.adapter
    if adapter and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise ModelPreparationError(f"serve.adapter: {adapter} holds no PEFT adapter (adapter_config.json); run "
                                    "`cmat sft`, or serve the base model with --set serve.adapter=''")
    return HFPolicy(params.model.dir, params.generation, adapter=adapter, device=params.model.device,
                    dtype=params.model.dtype)


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread; yields the base URL (`http://host:port/v1`).
    port 0 picks a free one."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped during start-up (see the log above)")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from cmat_pipeline.cli import stage_args

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    cfg = params.serve
    policy = load_policy(params)
    print(f"cmat serve: `{cfg.model_name}` = {policy.name} on http://{cfg.host}:{cfg.port}/v1 "
          f"(batches of up to {cfg.max_batch_size}, window {cfg.batch_window_ms} ms)", flush=True)
    uvicorn.run(create_app(policy, cfg), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["serve", *sys.argv[1:]]))
