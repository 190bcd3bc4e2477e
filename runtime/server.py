"""The HTTP side of `llmpack serve`: a Starlette app over one Engine (runtime/serve_engine.py).

Routes: GET / (the chat page), GET /health, GET /v1/models, POST /v1/chat/completions and
POST /v1/completions (JSON, or server-sent events with "stream": true). Every error is an
OpenAI-style JSON body {"error": {"message", "type", "param", "code"}} with its status: 400 bad
request, 401 missing or wrong API key, 404/405 unknown route, 413 prompt longer than the context
(for a conversation: its last message; older turns are dropped to fit) or a body over 16 MB,
503 while the model loads or when the queue is full.

Each request watches its connection: a client that disconnects sets the job's cancel flag, so a
queued request never starts and a running one stops at its next token.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from importlib import resources
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .serve_api import BadRequest, Reply, chat_job, completion_job, error_body
from .serve_engine import Engine, Job

MAX_BODY = 16 << 20  # bytes; a conversation filling a 128k context is ~0.5 MB of text


class Refused(Exception):
    """A request answered with an error status before any generation."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status), status_code=status, headers=headers)


class Service:
    """The server's state: the engine once the model has loaded, the API key, the queue count."""

    def __init__(self, load_model: Callable, model_name: str, api_key: str | None = None,
                 max_queue: int = 64, on_load_error: Callable[[str], None] | None = None):
        self.load_model, self.model_name, self.api_key = load_model, model_name, api_key
        self.max_queue, self.on_load_error = max_queue, on_load_error
        self.engine: Engine | None = None
        self.context_length: int | None = None
        self.pending = 0  # requests queued or generating
        self.loaded_at = int(time.time())

    # -- loading ---------------------------------------------------------------------------------
    def start_loading(self):
        threading.Thread(target=self._load, name="llmpack-load", daemon=True).start()

    def _load(self):
        try:
            model = self.load_model()
        except Exception as e:  # noqa: BLE001 - reported as one line by the command, which then exits
            if self.on_load_error:
                self.on_load_error(f"{e}")
            return
        self.context_length = model.context_length
        self.engine = Engine(model)

    def close(self):
        if self.engine is not None:
            self.engine.close()

    # -- checks ----------------------------------------------------------------------------------
    def check_key(self, request: Request):
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise Refused(401, "missing API key: send the header 'Authorization: Bearer KEY' "
                               "(the key given to llmpack serve --api-key)")
        if not hmac.compare_digest(auth[7:].strip().encode(), self.api_key.encode()):
            raise Refused(401, "wrong API key: use the key given to llmpack serve --api-key")

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise Refused(503, "the model is still loading; retry in a few seconds", {"Retry-After": "2"})
        return self.engine

    # -- generation ------------------------------------------------------------------------------
    async def events(self, job: Job):
        """The job's events (see serve_engine) as they happen; closing this generator cancels the job."""
        engine = self.ready_engine()
        if self.pending >= self.max_queue:
            raise Refused(503, f"the server is busy: {self.pending} requests are queued or running "
                               f"(--max-queue {self.max_queue}); retry later", {"Retry-After": "1"})
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutting down)
                job.cancel.set()

        self.pending += 1
        released = []

        def release():  # once per job: when its last event is out, or when it ends after a hang-up
            if not released:
                released.append(True)
                self.pending -= 1

        future = engine.submit(job, emit)
        future.add_done_callback(lambda f: emit(("done",)))
        try:
            while True:
                event = await queue.get()
                if event[0] == "done":
                    return
                if event[0] in ("end", "error"):  # the job's last event: it no longer holds the queue,
                    release()  # counted before the client can see the reply (a /health right after it)
                yield event
        finally:
            job.cancel.set()
            if not future.done():  # cancelled while queued or running: count it free when it ends
                future.add_done_callback(lambda f: loop.call_soon_threadsafe(release))
            else:
                release()


def watch_disconnect(request: Request, job: Job) -> asyncio.Task:
    """A task that sets job.cancel when the client goes away (cancel the task when the reply is done)."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()

    return asyncio.create_task(watch())


async def read_json(request: Request):
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY:
        raise Refused(413, f"the request body has {size} bytes; the most is {MAX_BODY}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise Refused(413, f"the request body is over {MAX_BODY} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None


def sse(data) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"


async def stream_events(events, reply: Reply, prompt: tuple[int, int, int], include_usage: bool, watcher: asyncio.Task):
    """The server-sent events of a streamed reply (OpenAI's chunk objects, then [DONE])."""
    try:
        if reply.chat:
            yield sse(reply.chunk(first=True))
        async for event in events:
            if event[0] == "text":
                yield sse(reply.chunk(event[1]))
            elif event[0] == "end":
                yield sse(reply.chunk(finish=event[1]))
                if include_usage:
                    yield sse(reply.usage_chunk(prompt, event[2]))
            elif event[0] == "error":
                yield sse(error_body(event[2], event[1]))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
        watcher.cancel()


async def collect(events, reply: Reply, prompt: tuple[int, int, int], watcher: asyncio.Task,
                  headers: dict | None = None) -> JSONResponse:
    """The whole reply as one JSON object."""
    pieces = []
    try:
        async for event in events:
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "end":
                return JSONResponse(reply.full("".join(pieces), event[1], prompt, event[2]), headers=headers)
            elif event[0] == "error":
                return error_response(event[1], event[2])
        return error_response(500, "the generation ended without an answer")
    finally:
        await events.aclose()
        watcher.cancel()


def build_app(service: Service, chat_page: str | None = None) -> Starlette:
    """The Starlette app; chat_page: the HTML served at / (default: the packaged chat_page.html)."""
    page = chat_page if chat_page is not None else resources.files(__package__).joinpath(
        "chat_page.html").read_text(encoding="utf-8")

    async def complete(request: Request, chat: bool):
        service.check_key(request)
        service.ready_engine()
        body = await read_json(request)
        job = chat_job(body) if chat else completion_job(body)
        reply = Reply(service.model_name, chat)  # whatever "model" the client named: there is one
        events = service.events(job)
        watcher = watch_disconnect(request, job)
        try:
            first = await anext(events)  # waits for the queue: "prompt" or "error"
        except BaseException:
            watcher.cancel()
            await events.aclose()
            raise
        if first[0] != "prompt":
            watcher.cancel()
            await events.aclose()
            return error_response(first[1], first[2]) if first[0] == "error" else error_response(
                499, "the client went away")
        dropped = {"X-Llmpack-Dropped-Messages": str(first[3])} if chat else {}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream_events(events, reply, first[1:], usage, watcher),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **dropped})
        return await collect(events, reply, first[1:], watcher, dropped)

    async def chat_completions(request):
        return await complete(request, chat=True)

    async def completions(request):
        return await complete(request, chat=False)

    async def models(request):
        service.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": service.loaded_at, "owned_by": "llmpack",
             "context_length": service.context_length}]})

    async def health(request):
        if service.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "ok", "queued": service.pending, "finished": service.engine.finished})

    async def index(request):
        return HTMLResponse(page)

    async def refused(request, exc: Refused):
        return error_response(exc.status, exc.message, exc.headers)

    async def bad_request(request, exc: BadRequest):
        return error_response(400, str(exc))

    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={
        Refused: refused, BadRequest: bad_request, HTTPException: http_error})
