"""The request bodies the server accepts, as pydantic models: OpenAI's completion and chat requests (the fields
neuraldb serves; OpenAI fields it does not use are ignored, those whose meaning it cannot honour are refused) and
the facts API's.

Types are strict (``"5"`` is not a number here): a client sending the wrong type gets a 400 naming the field rather
than a guess.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "FactIn",
    "FactsRequest",
    "NeuralDBOptions",
]

# OpenAI allows at most 4 stop sequences
MAX_STOP = 4


class NeuralDBOptions(BaseModel):
    """``"neuraldb": {...}`` in a completion request: ``edits`` False answers as the unedited model."""

    model_config = ConfigDict(extra="forbid", strict=True)
    edits: bool = True


class _Generation(BaseModel):
    # OpenAI clients send fields neuraldb has no use for (user, logit_bias, stream_options, ...): ignored.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only one choice per prompt is generated")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    neuraldb: NeuralDBOptions = Field(default_factory=NeuralDBOptions)

    @model_validator(mode="after")
    def _check_stop(self):
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
        return self

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Generation):
    """``POST /v1/completions``: ``prompt`` is a string, or a list of strings answered as one choice each (not
    streamed)."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: None = Field(None, description="log probabilities are not returned")
    best_of: int = Field(1, ge=1, le=1, description="only one choice per prompt is generated")

    @model_validator(mode="after")
    def _check_prompts(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if self.echo:
            raise ValueError("echo=true is not supported")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("stream=true takes one prompt")
        return self

    def prompts(self) -> list[str]:
        """``prompt`` as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; ``content`` is text or a list of text parts (images are not understood)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        """The message's text."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Generation):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="log probabilities are not returned")

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.logprobs:
            raise ValueError("logprobs=true is not supported")
        return self

    def token_limit(self) -> int | None:
        """The requested completion length, if any."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class FactIn(BaseModel):
    """A fact to add: ``prompt`` holds ``"{}"`` where ``subject`` goes, or the subject itself (as in
    :func:`neuraldb.facts.parse`'s neuraldb format)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    subject: str = Field(min_length=1, max_length=1000)
    prompt: str = Field(min_length=1, max_length=10000)
    target_new: str = Field(min_length=1, max_length=1000)
    target_true: str | None = Field(None, max_length=1000)

    def record(self) -> dict:
        """The fact as a neuraldb-format record."""
        return self.model_dump(exclude_none=True)


class FactsRequest(BaseModel):
    """``POST /v1/facts``: ``{"facts": [...]}`` (a single fact object is accepted too)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    facts: list[FactIn] = Field(min_length=1, max_length=1000)
