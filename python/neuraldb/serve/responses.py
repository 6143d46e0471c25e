"""What the server sends back: OpenAI-shaped completion bodies and stream chunks, facts as JSON, errors
(``{"error": {"message", "type", "param", "code"}}``) and the request-body limit that answers 413."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from neuraldb.facts import Fact, to_record
from neuraldb.serve.generation import Event

__all__ = ["BodyLimit", "chunk", "collect", "completion_json", "error", "fact_json", "validation_message"]


class BodyLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes with a 413, counted as they arrive (a client
    may send no Content-Length, or a false one)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await too_large(self.limit)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def too_large(limit: int) -> JSONResponse:
    return error(413, f"request body over {limit} bytes (the server's --max-body-bytes)")


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status in (401, 403):
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    parts, first = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        where = ".".join(loc) or "body"
        first = first or where
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts), first


def fact_json(fact_id: int, fact: Any, status: str = "stored") -> dict[str, Any]:
    out: dict[str, Any] = {"id": fact_id, "object": "neuraldb.fact", "status": status}
    if isinstance(fact, Fact):
        out.update(to_record(fact))
        out["text"] = fact.text
    elif fact is not None:
        out["metadata"] = fact
    return out


def completion_json(kind: str, rid: str, model: str, results: list[Event]) -> dict[str, Any]:
    chat = kind == "chat"
    choices = []
    for i, ev in enumerate(results):
        choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": ev.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": ev.text}
        else:
            choice["text"] = ev.text
        choices.append(choice)
    prompt = sum(ev.prompt_tokens for ev in results)
    completion = sum(ev.completion_tokens for ev in results)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None, first: bool = False) -> str:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    data = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def collect(events: asyncio.Queue) -> Event:
    while True:
        ev = await events.get()
        if ev.kind == "done":
            return ev
        if ev.kind == "error":
            raise HTTPException(500, ev.text)
