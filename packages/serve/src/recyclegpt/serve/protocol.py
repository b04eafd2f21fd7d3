"""The OpenAI wire format: request validation, OpenAI-style errors and response bodies."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from recyclegpt.core import DECODING_MODES

MAX_DRAFT_LENGTH = 32
MAX_STOP_SEQUENCES = 4
# Pydantic names union members in error locations ("str", "list[str]"); they are not request fields.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


class ApiError(Exception):
    """A request the server refuses, rendered as {"error": {"message", "type", "param"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are accepted and ignored, as OpenAI clients send many."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    decoding: str | None = None
    draft_length: int | None = Field(None, ge=1, le=MAX_DRAFT_LENGTH)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("decoding")
    @classmethod
    def _decoding(cls, decoding: str | None) -> str | None:
        if decoding is not None and decoding not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {decoding!r}")
        return decoding

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None:
            if len(stops) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
            if any(not s for s in stops):
                raise ValueError("stop sequences must be non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported (send a string)")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("prompt must not be empty")
        return prompt


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _param(loc: tuple[int | str, ...]) -> str:
    """'messages[0].content' from a pydantic error location, without union member tags."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _UNION_TAGS or "[" in item or item.startswith("function-"):
            continue
        else:
            out += f".{item}" if out else item
    return out


def parse_request(
    kind: type[CompletionRequest] | type[ChatRequest], raw: bytes, max_tokens_limit: int
) -> CompletionRequest | ChatRequest:
    """Validate a request body; raise ApiError(400) naming the first bad field."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = kind.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"invalid '{param}': {message}" if param else message, param) from None
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, field, None)
        if value is not None and value > max_tokens_limit:
            raise ApiError(400, f"invalid '{field}': {value} exceeds this server's limit of {max_tokens_limit}", field)
    return request


def requested_max_tokens(request: CompletionRequest | ChatRequest) -> tuple[int | None, str]:
    """The requested completion length (None: as long as the limits allow) and the field that set it."""
    value = getattr(request, "max_completion_tokens", None)
    if value is not None:
        return value, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


def completion_body(model: str, text: str, finish_reason: str, usage: dict, stats: dict) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
        "recyclegpt": stats,
    }


def chat_body(model: str, text: str, finish_reason: str, usage: dict, stats: dict) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "recyclegpt": stats,
    }


class ChunkWriter:
    """Server-sent event lines for one streamed completion or chat completion."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _event(self, choice: dict[str, Any], **extra: Any) -> str:
        return f"data: {json.dumps({**self.base, 'choices': [choice], **extra})}\n\n"

    def first(self) -> str | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if not self.chat:
            return None
        return self._event(
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )

    def text(self, piece: str) -> str:
        if self.chat:
            return self._event({"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None})
        return self._event({"index": 0, "text": piece, "logprobs": None, "finish_reason": None})

    def last(self, finish_reason: str, usage: dict, stats: dict) -> str:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"delta": {}} if self.chat else {"text": ""})
        return self._event(choice, usage=usage, recyclegpt=stats)

    @staticmethod
    def error(error: ApiError) -> str:
        return f"data: {json.dumps(error.body())}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
