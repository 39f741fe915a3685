"""The OpenAI API's shapes, as far as `runtime serve` speaks them: requests, responses, chunks
of a streamed response (server-sent events), and error bodies.

Requests are pydantic models (validated once, at the edge); options this server does not
implement (several choices per prompt, log-probabilities, echo, tools) are refused with a
message rather than ignored.
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .sampling import Sampling


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)  # default 1, as OpenAI's
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n: this server makes one choice per prompt; send n=1 (or leave it out)")
        if self.logprobs:
            raise ValueError("logprobs: this server does not return log-probabilities; leave it out")
        return self

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 stop strings, none empty")
        return v

    def sampling(self, max_tokens: int) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _plain(self):
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported; leave them out")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list) and any(p.type != "text" for p in v):
            raise ValueError("only text content parts are supported")
        return v

    def as_template_input(self) -> dict:
        if isinstance(self.content, list):
            return {"role": self.role, "content": "".join(p.text or "" for p in self.content)}
        return {"role": self.role, "content": self.content or ""}


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # default: the rest of the context
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list | None = None

    @model_validator(mode="after")
    def _plain(self):
        if self.tools:
            raise ValueError("tools: this server does not call tools; leave them out")
        return self

    def conversation(self) -> list[dict]:
        return [m.as_template_input() for m in self.messages]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ---------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """Builds one response's bodies (whole or chunked) for completions or chat completions."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def whole(self, texts: list[str], reasons: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
            return self._envelope("chat.completion", choices, usage=usage(prompt_tokens, completion_tokens))
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return self._envelope("text_completion", choices, usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, *,
              role: bool = False) -> dict:
        """One streamed piece: new text of choice `index`, its opening (chat: the role) or its end."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": index, "text": text or "", "finish_reason": finish_reason,
                                                   "logprobs": None}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                              usage=usage(prompt_tokens, completion_tokens))


def sse(obj: dict | str) -> str:
    """One server-sent event carrying `obj` as JSON (or `[DONE]`)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "[DONE]"


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
