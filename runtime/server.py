"""The HTTP side of `runtime serve`: an OpenAI-compatible API (FastAPI on uvicorn) fed by an `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent events
with `stream: true`), GET /v1/models, GET /health, GET /metrics (Prometheus text). Every
error is an OpenAI-style JSON body `{"error": {"message", "type", "param", "code"}}` with a
4xx status (5xx only for the server's own failures), never a traceback. A client that goes
away mid-request has its sequence cancelled, which frees its slot at the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from reshard.errors import ReshardError, UsageError

from .batch import chat_ids, prompt_ids
from .engine import ContextLengthError, Engine, QueueFullError
from .protocol import DONE, ChatRequest, CompletionRequest, Reply, error_body, sse


DISCONNECT_CHECK_S = 0.5  # how often a request waiting for a whole answer checks that its client is still there


class ApiError(Exception):
    """An error response: HTTP status and OpenAI-style body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type=type, code=code, param=param)


class ServerState:
    """What the routes share: the engine, the served model's name, the key, byte counts."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.started = int(time.time())
        self.response_bytes = 0  # bytes of completion bodies and streamed events sent

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {self.model_name!r} "
                                f"(see GET /v1/models)", code="model_not_found", param="model")


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None) -> FastAPI:
    """The ASGI app serving `engine` under the name `model_name`; `api_key` makes /v1 ask for
    `Authorization: Bearer <api_key>`."""
    state = ServerState(engine, model_name, api_key)
    app = FastAPI(title="runtime", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = state
    _add_error_handlers(app)
    app.include_router(_v1_routes(state), prefix="/v1", dependencies=[Depends(_key_check(state))])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": engine.active, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(state), media_type="text/plain; version=0.0.4")

    return app


def serve(lm, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_queue: int = 64, api_key: str | None = None, draft=None, tree_budget="auto") -> None:
    """Serve `lm` over HTTP until interrupted (Ctrl-C); the engine is closed after. With `draft` (a
    model, a folder or "prompt-lookup"), a request that runs alone decodes with tree speculation."""
    import sys

    from .batch import eos_ids
    from .solo import SoloSpeculation

    solo = None if draft is None else SoloSpeculation(lm, draft, tree_budget=tree_budget, eos=eos_ids(lm))
    sock = bind(host, port)
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue, solo=solo)
    try:
        server = make_server(create_app(engine, model_name=model_name, api_key=api_key), host=host, port=port)
        print(f"serving {model_name!r} on http://{host}:{sock.getsockname()[1]}/v1 (max batch {max_batch}, "
              f"queue {max_queue}); Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then raises it again: the normal end
            print("stopped", file=sys.stderr)
    finally:
        engine.close()
        sock.close()
        if solo is not None:  # what --stats reports, as after `runtime generate --draft`
            lm.speculation = {**solo.stats.as_dict(), "tree_budget": solo.budget}


def bind(host: str, port: int):
    """A TCP socket bound to (host, port); port 0 picks a free one."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --host or --port") from None
    return sock


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    """A uvicorn server for `app` (run it with `.run()`, or `.run(sockets=[sock])` on a bound socket)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=2))


# --- /v1 -----------------------------------------------------------------------------------------

def _key_check(state: ServerState):
    async def check(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key; send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
    return check


def _v1_routes(state: ServerState) -> APIRouter:
    router, engine = APIRouter(), state.engine
    tok = engine.lm.tokenizer

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.started,
                                            "owned_by": "runtime"}]}

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        with engine.tokenizer_lock:
            prompts = [prompt_ids(tok, p, chat=False) for p in body.prompts()]
        sampling = [body.sampling(body.max_tokens or 16) for _ in prompts]
        return await _respond(request, state, Reply(False, state.model_name), prompts, sampling, body)

    @router.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        state.check_model(body.model)
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        with engine.tokenizer_lock:
            ids = chat_ids(tok, body.conversation())
        sampling = body.sampling(body.token_limit() or engine.default_max_tokens(len(ids)))
        return await _respond(request, state, Reply(True, state.model_name), [ids], [sampling], body)

    return router


async def _respond(request: Request, state: ServerState, reply: Reply, prompts, samplings, body):
    for ids, s in zip(prompts, samplings):  # all checked before any is queued
        state.engine.check_length(len(ids), s.max_tokens)
    listener = _Listener(state.engine, prompts, samplings)
    if body.stream:
        return StreamingResponse(_events(state, listener, reply, body.include_usage), media_type="text/event-stream")
    whole = await _collect(request, listener)
    if whole is None:  # the client left
        return Response(status_code=499)
    texts, reasons, used = whole
    content = JSONResponse(reply.whole(texts, reasons, *used))
    state.response_bytes += len(content.body)
    return content


class _Listener:
    """The sequences of one request, and the queue where the engine's events for them arrive."""

    def __init__(self, engine: Engine, prompts, samplings):
        self.engine, self.queue = engine, asyncio.Queue()
        loop, self.seqs = asyncio.get_running_loop(), []
        try:
            for i, (ids, s) in enumerate(zip(prompts, samplings)):
                deliver = (lambda ev, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev)))
                self.seqs.append(engine.submit(ids, s, deliver))
        except Exception:
            self.cancel()
            raise
        self.reasons: list[str | None] = [None] * len(self.seqs)
        self.used = [0, 0]  # prompt and completion tokens of the finished sequences

    @property
    def running(self) -> bool:
        return any(r is None for r in self.reasons)

    async def next(self):
        """The next (choice index, Event); an engine failure becomes an ApiError."""
        i, ev = await self.queue.get()
        if ev.finish_reason is not None:
            self.reasons[i] = ev.finish_reason
            self.used[0] += ev.prompt_tokens
            self.used[1] += ev.completion_tokens
        if ev.finish_reason == "error":
            raise ApiError(500, f"generation failed: {ev.error}", type="server_error")
        return i, ev

    def cancel(self) -> None:
        for seq in self.seqs:
            if seq.finish_reason is None:
                self.engine.cancel(seq)


async def _collect(request: Request, listener: _Listener):
    """Every choice's whole text, finish reasons and token counts; None if the client left first."""
    texts = [""] * len(listener.seqs)
    check_at = time.monotonic() + DISCONNECT_CHECK_S
    try:
        while listener.running:
            with contextlib.suppress(TimeoutError):
                i, ev = await asyncio.wait_for(listener.next(), timeout=DISCONNECT_CHECK_S)
                texts[i] += ev.text
            if time.monotonic() >= check_at:  # whether or not tokens keep coming
                if await request.is_disconnected():
                    return None
                check_at = time.monotonic() + DISCONNECT_CHECK_S
        return texts, listener.reasons, listener.used
    finally:
        listener.cancel()


async def _events(state: ServerState, listener: _Listener, reply: Reply, include_usage: bool):
    """The server-sent events of a streamed response, ending with `data: [DONE]`."""
    def send(obj) -> bytes:
        data = sse(obj).encode()
        state.response_bytes += len(data)
        return data

    try:
        if reply.chat:
            for i in range(len(listener.seqs)):
                yield send(reply.chunk(i, role=True))
        while listener.running:
            try:
                i, ev = await listener.next()
            except ApiError as e:
                yield send(e.body)
                break
            if ev.text:
                yield send(reply.chunk(i, ev.text))
            if ev.finish_reason is not None:
                yield send(reply.chunk(i, finish_reason=ev.finish_reason))
        else:
            if include_usage:
                yield send(reply.usage_chunk(*listener.used))
        yield send(DONE)
    finally:  # also when the client disconnects: the response task is cancelled here
        listener.cancel()


# --- errors and metrics --------------------------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        if "json" not in request.headers.get("content-type", ""):
            return JSONResponse(error_body("send the request body as JSON, with `Content-Type: application/json`"),
                                status_code=400)
        message, param = _validation_message(e.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(ReshardError)
    async def ours(_, e: ReshardError):
        if isinstance(e, QueueFullError):
            return JSONResponse(error_body(str(e), type="rate_limit_error", code="queue_full"), status_code=429)
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return JSONResponse(error_body(str(e), code=code), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):
        return JSONResponse(error_body(f"internal error ({type(e).__name__}); see the server's log",
                                       type="server_error"), status_code=500)


def _validation_message(errors) -> tuple[str, str | None]:
    """One readable line for pydantic's errors, and the parameter it names."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return (f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None)
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    msg = first["msg"].removeprefix("Value error, ")
    if not param and msg.startswith("Input"):
        msg = f"the request body must be a JSON object ({msg})"
    return (f"{param}: {msg}" if param else msg), param


def prometheus_text(state: ServerState) -> str:
    """The server's counters in Prometheus' text exposition format."""
    engine, stats = state.engine, state.engine.lm.stats
    c = engine.counters
    rows = [
        ("runtime_passes_total", "counter", "forward passes through the whole model", stats.passes),
        ("runtime_requests_total", "counter", "sequences accepted into the queue", c.requests),
        ("runtime_requests_rejected_total", "counter", "requests refused with 429 (queue full)", c.rejected),
        ("runtime_prompt_tokens_total", "counter", "prompt tokens prefilled", c.prompt_tokens),
        ("runtime_generated_tokens_total", "counter", "tokens generated, all sequences", c.generated_tokens),
        ("runtime_active_sequences", "gauge", "sequences in the running batch", engine.active),
        ("runtime_waiting_requests", "gauge", "sequences queued for the next pass", engine.waiting),
        ("runtime_weight_bytes_streamed_total", "counter", "weight bytes brought to the compute device",
         stats.bytes_streamed),
        ("runtime_response_bytes_total", "counter", "bytes of completions sent to clients", state.response_bytes),
    ]
    if engine.solo is not None:  # --draft: passes that checked a tree for a request running alone
        spec = engine.solo.stats
        rows += [("runtime_tree_passes_total", "counter", "passes that checked a draft's tree", spec.passes),
                 ("runtime_tree_tokens_total", "counter", "tokens those passes generated", spec.new_tokens),
                 ("runtime_tree_nodes_total", "counter", "tree nodes those passes checked", spec.tree_tokens)]
    return "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in rows)


class BackgroundServer:
    """`app` served by uvicorn on a thread, on a free port of `host` (for tests and benchmarks)."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1"):
        import threading

        self.sock = bind(host, 0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = make_server(app, host=host)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
