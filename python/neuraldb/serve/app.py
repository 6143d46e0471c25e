"""The HTTP routes: OpenAI's completions and chat completions, the facts API and its jobs.

:func:`build_app` wires a model, its tokenizer and a database into a FastAPI application: it patches the model, starts
the generation worker (:mod:`neuraldb.serve.generation`) and the edit worker (:mod:`neuraldb.serve.store`), and stops
them when the application shuts down. Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``,
with a 4xx for anything the request got wrong and no change made.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from neuraldb import templates
from neuraldb.facts import Fact, FactFormatError, parse
from neuraldb.serve import TOKEN_ENV
from neuraldb.serve.generation import Event, GenerationRequest, Generator, context_length, encode_prompt
from neuraldb.serve.page import add_page
from neuraldb.serve.responses import (
    BodyLimit,
    chunk,
    collect,
    completion_json,
    error,
    fact_json,
    validation_message,
)
from neuraldb.serve.schemas import ChatRequest, CompletionRequest, FactIn, FactsRequest
from neuraldb.serve.store import FactStore, PendingFactError, UnknownFactError, editor_for

__all__ = ["ServeSettings", "build_app"]


@dataclass
class ServeSettings:
    """What a server is configured with besides its model and database.

    Attributes:
        token: the bearer token write requests must carry; None refuses every write.
        protect_reads: require the token on every route, not only on writes.
        model_name: the model name the responses report.
        max_body_bytes: larger request bodies are refused (413) before they are read.
        max_batch: most requests generated together.
        batch_wait_s: how long a request waits for others to batch with.
        completion_tokens: ``max_tokens`` of a completion request that gives none (OpenAI's default, 16).
        chat_tokens: the same for chat requests (capped by what the context leaves).
        wait_timeout_s: the longest ``POST /v1/facts?wait=true`` waits before answering with the job as it stands.
        edit_on_copy: edit on a copy of the model, so that generation goes on while facts are edited (costs one more
            copy of the weights); False edits on the served model, pausing generation meanwhile.
        edit_hparams: :func:`neuraldb.edit` keyword arguments (e.g. ``steps``) over the database's own config.
        calibrate: fit every fact's gate threshold again once added facts are in, as ``neuraldb edit`` does
            (:mod:`neuraldb.serve.store`); False leaves the facts added over HTTP with gamma alone.
    """

    token: str | None = None
    protect_reads: bool = False
    model_name: str = "neuraldb"
    max_body_bytes: int = 1 << 20
    max_batch: int = 8
    batch_wait_s: float = 0.005
    completion_tokens: int = 16
    chat_tokens: int = 256
    wait_timeout_s: float = 600.0
    edit_on_copy: bool = True
    edit_hparams: dict[str, Any] | None = None
    calibrate: bool = True


class _Server:
    """What the routes share; built by :func:`build_app`."""

    def __init__(self, model: Any, tok: Any, db: Any, db_path: Path | None, settings: ServeSettings) -> None:
        from neuraldb.patching import patch_model

        self.model, self.tok, self.db, self.settings = model, tok, db, settings
        self.template = db.template if db.template is not None else templates.default_template(tok)
        if db.template is None:
            db.template = self.template
        self.context = context_length(model, tok)
        self.model_lock = threading.Lock()
        self.tok_lock = threading.Lock()
        # the copy is taken before patching: the editor needs the unedited model
        editor, calibrator = editor_for(
            model, tok, db, on_copy=settings.edit_on_copy, lock=self.model_lock, **(settings.edit_hparams or {})
        )
        patch_model(model, db)
        self.generator = Generator(
            model,
            tok,
            model_lock=self.model_lock,
            tok_lock=self.tok_lock,
            max_batch=settings.max_batch,
            batch_wait_s=settings.batch_wait_s,
        )
        self.store = FactStore(db, db_path, editor, calibrator if settings.calibrate else None)

    def close(self) -> None:
        self.generator.close()
        self.store.close()

    # -- auth ------------------------------------------------------------------------------------------------------

    def check_token(self, request: Request) -> None:
        token = self.settings.token
        if token is None:
            raise HTTPException(403, f"writes are disabled: start the server with --token or ${TOKEN_ENV}")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (send the header 'Authorization: Bearer TOKEN')")

    def check_read(self, request: Request) -> None:
        if self.settings.protect_reads:
            self.check_token(request)

    # -- generation --------------------------------------------------------------------------------------------------

    def check_fits(self, n_prompt: int, max_tokens: int, what: str = "prompt") -> None:
        if self.context is not None and n_prompt + max_tokens > self.context:
            raise HTTPException(
                400,
                f"{what} has {n_prompt} tokens and max_tokens is {max_tokens}: together over the model's context of "
                f"{self.context} tokens",
            )

    def start(self, ids: list[int], body: Any, max_tokens: int) -> tuple[asyncio.Queue, GenerationRequest]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        req = GenerationRequest(
            prompt_ids=ids,
            max_tokens=max_tokens,
            sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            edits=body.neuraldb.edits,
            seed=body.seed,
        )
        self.generator.submit(req)
        return events, req

    def chat_ids(self, body: ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        with self.tok_lock:
            if templates.has_chat_template(self.tok):
                return templates.encode_chat(self.tok, messages)
        # no chat template: the messages' text, one per line, in the database's template
        return encode_prompt(self.tok, self.template, "\n".join(m["content"] for m in messages), self.tok_lock)

    # -- facts -------------------------------------------------------------------------------------------------------

    def facts_from(self, data: Any) -> list[Fact]:
        try:
            if isinstance(data, dict) and "facts" in data:
                items = FactsRequest.model_validate(data).facts
            else:
                items = [FactIn.model_validate(data)]
        except ValidationError as e:
            message, _ = validation_message(e.errors())
            raise HTTPException(400, message) from None
        try:
            facts = parse([f.record() for f in items], format="neuraldb", on_invalid="error", source="facts")
        except FactFormatError as e:
            raise HTTPException(400, str(e)) from None
        for i, fact in enumerate(facts):
            with self.tok_lock:
                n = len(templates.encode(self.tok, self.template, fact.text))
                n += len(templates.encode_target(self.tok, fact.target_new))
            self.check_fits(n, 0, f"facts[{i}] (prompt and target_new)")
        return facts


def build_app(
    model: Any,
    tok: Any,
    db: Any,
    *,
    db_path: str | Path | None = None,
    settings: ServeSettings | None = None,
) -> FastAPI:
    """A FastAPI application serving ``model`` patched with ``db`` (see the module docstring).

    Args:
        model, tok: an unpatched Hugging Face causal LM and its tokenizer (e.g. from :func:`neuraldb.load_model`).
        db: the database to patch in and edit; its template wraps every completion prompt.
        db_path: the database's file: every change is saved there before it is acknowledged; None keeps facts in
            memory only.
        settings: see :class:`ServeSettings`.

    The workers start here and stop when the application's lifespan ends (``with TestClient(app)``, or uvicorn's
    shutdown).
    """
    settings = settings or ServeSettings()
    server = _Server(model, tok, db, Path(db_path) if db_path is not None else None, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(server.close)

    app = FastAPI(title="neuraldb", lifespan=lifespan)
    app.state.neuraldb = server
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    add_page(app)  # the web page at /
    read = [Depends(server.check_read)]
    write = [Depends(server.check_token)]

    @app.exception_handler(HTTPException)
    async def httperror(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validationerror(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error(400, message, param)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "facts": len(db)}

    @app.get("/v1/models", dependencies=read)
    async def models() -> dict[str, Any]:
        entry = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "neuraldb"}
        return {"object": "list", "data": [entry]}

    async def answer(kind: str, prompts: list[list[int]], body: Any, max_tokens: int | None, default: int):
        limits = []
        for ids in prompts:
            limit = max_tokens
            if limit is None:
                room = server.context - len(ids) if server.context is not None else default
                limit = max(1, min(default, room))
            server.check_fits(len(ids), limit)
            limits.append(limit)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        name = body.model or settings.model_name
        if not body.stream:
            started = [server.start(ids, body, limit) for ids, limit in zip(prompts, limits)]
            try:
                results = await asyncio.gather(*(collect(events) for events, _ in started))
            finally:
                for _, req in started:
                    req.cancelled.set()
            return completion_json(kind, rid, name, list(results))
        events, req = server.start(prompts[0], body, limits[0])

        async def stream() -> AsyncIterator[str]:
            try:
                first = True
                while True:
                    ev = await events.get()
                    if ev.kind == "delta":
                        yield chunk(kind, rid, name, ev.text, None, first)
                        first = False
                    elif ev.kind == "done":
                        yield chunk(kind, rid, name, "" if first else None, ev.finish_reason, first)
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        error = {"error": {"message": ev.text, "type": "server_error", "param": None, "code": 500}}
                        yield f"data: {json.dumps(error)}\n\n"
                        return
            finally:
                req.cancelled.set()  # a client that went away stops its generation

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", dependencies=read)
    async def completions(body: CompletionRequest):
        prompts = [encode_prompt(tok, server.template, p, server.tok_lock) for p in body.prompts()]
        return await answer("text", prompts, body, body.max_tokens, settings.completion_tokens)

    @app.post("/v1/chat/completions", dependencies=read)
    async def chat(body: ChatRequest):
        return await answer("chat", [server.chat_ids(body)], body, body.token_limit(), settings.chat_tokens)

    @app.get("/v1/facts", dependencies=read)
    async def list_facts(q: str | None = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        if offset < 0 or not 1 <= limit <= 10000:
            raise HTTPException(400, "offset must be >= 0 and limit in [1, 10000]")
        with db.lock:
            rows = [fact_json(i, db.fact(i)) for i in db.ids()]
        rows += [fact_json(i, f, "pending") for i, f in server.store.pending_facts()]
        if q:
            needle = q.casefold()
            rows = [r for r in rows if needle in json.dumps(r, ensure_ascii=False).casefold()]
        return {"object": "list", "total": len(rows), "data": rows[offset : offset + limit]}

    @app.get("/v1/facts/{fact_id}", dependencies=read)
    async def get_fact(fact_id: int) -> dict[str, Any]:
        with db.lock:
            if fact_id in db:
                return fact_json(fact_id, db.fact(fact_id))
        raise HTTPException(404, f"no fact with id {fact_id}")

    @app.post("/v1/facts", dependencies=write)
    async def add_facts(request: Request, wait: bool = False):
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"request body is not valid JSON: {e}") from None
        facts = server.facts_from(data)
        job = await asyncio.to_thread(server.store.submit, facts)
        if wait:
            await asyncio.to_thread(job.done.wait, settings.wait_timeout_s)
            if job.status == "failed":
                raise HTTPException(500, f"job {job.id} failed: {job.error}")
        body = {"object": "neuraldb.facts", "ids": list(job.fact_ids), "job": job.to_json()}
        return JSONResponse(body, status_code=200 if job.done.is_set() else 202)

    @app.delete("/v1/facts/{fact_id}", dependencies=write)
    async def delete_fact(fact_id: int) -> dict[str, Any]:
        try:
            await asyncio.to_thread(server.store.delete, fact_id)
        except UnknownFactError:
            raise HTTPException(404, f"no fact with id {fact_id}") from None
        except PendingFactError as e:
            raise HTTPException(409, str(e)) from None
        except OSError as e:
            raise HTTPException(503, f"the delete could not be written to disk, nothing changed: {e}") from None
        return {"id": fact_id, "object": "neuraldb.fact", "deleted": True}

    @app.get("/v1/jobs/{job_id}", dependencies=read)
    async def get_job(job_id: int) -> dict[str, Any]:
        job = server.store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job with id {job_id} (jobs are kept while the server runs)")
        return job.to_json()

    return app
