"""Batched generation for the server: one worker thread runs every forward of the served model.

Requests wait in a queue; the worker takes what has arrived (up to ``max_batch``, waiting ``batch_wait_s`` for
company), runs them as one left-padded batch with a KV cache, and reports text to each request's sink as it is
generated. Requests that asked for the edits and requests that asked without them run in separate batches, and the
patch's switch (:attr:`neuraldb.patching.Patch.enabled`) is set only by this thread, between batches, under
``model_lock``: no forward sees a mix. Needs no web framework (the routes live in ``app.py``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from neuraldb import templates
from neuraldb.architectures import cache_kwarg

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Event", "GenerationRequest", "Generator", "context_length", "stop_token_ids"]


@dataclass
class Event:
    """What the worker reports to a request's sink: ``kind`` is "delta" (``text`` is new text), "done" (``text``
    is the whole completion, ``finish_reason`` "stop" or "length", and the token counts) or "error" (``text`` says
    what failed)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationRequest:
    """One completion to generate. ``temperature`` 0 is greedy; ``seed`` makes sampling repeatable; ``edits`` False
    answers as the unedited model. ``sink`` is called from the worker thread, so it must only hand the event over
    (e.g. ``loop.call_soon_threadsafe``)."""

    prompt_ids: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    edits: bool = True
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def context_length(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> int | None:
    """The most tokens (prompt and completion together) the model takes: its config's ``max_position_embeddings``
    (or ``n_positions``), else the tokenizer's ``model_max_length`` when that is a real bound; None when unknown."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tok, "model_max_length", None)
    # transformers puts a huge sentinel (int(1e30)) there when the tokenizer does not know
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def stop_token_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> frozenset[int]:
    """Token ids that end a completion: the tokenizer's EOS and the model's generation config's EOS ids (a chat
    model's end-of-turn token is often only there)."""
    ids: set[int] = set()
    for value in (
        getattr(tok, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class _Row:
    """A request's progress inside a batch."""

    def __init__(self, req: GenerationRequest, stop_hold: int) -> None:
        self.req = req
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.done = False
        self.hold = stop_hold
        self.generator: torch.Generator | None = None
        if req.seed is not None:
            self.generator = torch.Generator().manual_seed(req.seed)

    def finish(self, reason: str) -> None:
        self.done = True
        if self.sent < len(self.text):
            self.req.sink(Event("delta", self.text[self.sent :]))
        self.req.sink(Event("done", self.text, reason, len(self.req.prompt_ids), len(self.tokens)))


class Generator:
    """The queue and the worker thread that generates for it (see the module docstring).

    Args:
        model, tok: the served model (patched or not) and its tokenizer.
        model_lock: held around each batch; another thread that changes the model (editing in place) holds it too.
        max_batch: most requests generated together.
        batch_wait_s: how long the worker waits for more requests once one has arrived.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        *,
        model_lock: threading.Lock | None = None,
        tok_lock: threading.Lock | None = None,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.model, self.tok = model, tok
        self.model_lock = model_lock or threading.Lock()
        self.tok_lock = tok_lock or threading.Lock()
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.pad_id = templates.pad_id(tok)
        self.eos = stop_token_ids(model, tok)
        self.batches = 0  # batches run so far, for tests and metrics
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="neuraldb-generate", daemon=True)
        self._thread.start()

    def submit(self, req: GenerationRequest) -> None:
        """Queue ``req``; its sink receives the events."""
        self._queue.put(req)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after the batch it is running."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self) -> list[GenerationRequest] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            batch = [r for r in batch if not r.cancelled.is_set()]
            for edits in (True, False):
                group = [r for r in batch if r.edits == edits]
                if not group:
                    continue
                try:
                    self._generate(group)
                except Exception as e:  # noqa: BLE001 -- a failure ends this batch's requests, never the worker
                    for r in group:
                        r.sink(Event("error", f"generation failed: {type(e).__name__}: {e}"))

    def _generate(self, reqs: list[GenerationRequest]) -> None:
        from neuraldb.patching import patch_info

        patch = patch_info(self.model)
        with self.model_lock:
            previous = patch.enabled if patch is not None else None
            if patch is not None:
                patch.enabled = reqs[0].edits
            try:
                self.batches += 1
                with torch.inference_mode():
                    self._decode(reqs)
            finally:
                if patch is not None:
                    patch.enabled = previous

    def _decode(self, reqs: list[GenerationRequest]) -> None:
        model = self.model
        device = model.get_input_embeddings().weight.device
        rows = [_Row(r, max((len(s) for s in r.stop), default=1) - 1) for r in reqs]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's next token is at the same position
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache_kw = cache_kwarg(model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for _ in range(max(r.max_tokens for r in reqs)):
            logits = out.logits[:, -1, :].float()
            nxt = torch.full((len(rows),), self.pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                if row.done:
                    continue
                if row.req.cancelled.is_set():
                    row.done = True
                    continue
                token = _choose(logits[i], row)
                nxt[i] = token
                self._advance(row, token)
            if all(row.done for row in rows):
                break
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            out = model(
                input_ids=nxt[:, None].to(device),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_kw: _cache_of(out)},
            )

    def _advance(self, row: _Row, token: int) -> None:
        req = row.req
        if token in self.eos:
            row.finish("stop")
            return
        row.tokens.append(token)
        with self.tok_lock:
            row.text = self.tok.decode(row.tokens, skip_special_tokens=True)
        if req.stop:
            # A stop string may end in this token's text or straddle the previous ones: search from where the
            # longest one could begin.
            start = max(0, row.sent - row.hold)
            hits = [i for i in (row.text.find(s, start) for s in req.stop) if i >= 0]
            if hits:
                row.text = row.text[: min(hits)]
                row.finish("stop")
                return
        if len(row.tokens) >= req.max_tokens:
            row.finish("length")
            return
        # Hold back what could still become a stop string, and a character whose bytes are not all decoded yet.
        safe = len(row.text) - row.hold if req.stop else len(row.text)
        while safe > row.sent and row.text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > row.sent:
            req.sink(Event("delta", row.text[row.sent : safe]))
            row.sent = safe


def _cache_of(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None  # transformers >= 5.2x names it "cache"
    return cache if cache is not None else out.past_key_values


def _choose(logits: torch.Tensor, row: _Row) -> int:
    req = row.req
    if req.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (always the most likely one)
        keep = sorted_p.cumsum(-1) - sorted_p < req.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def encode_prompt(tok: Any, template: str | None, text: str, lock: threading.Lock) -> list[int]:
    """Token ids of ``text`` in the database's template (what the edits' keys were built from)."""
    with lock:
        return templates.encode(tok, template, text)
