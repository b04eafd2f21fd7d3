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
MAX_CHOICES = 16  # n, and also n x prompts per request
MAX_LOGPROBS = 5  # completions' logprobs (0-5, as OpenAI)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (0-20, as OpenAI)
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are accepted and ignored, as OpenAI clients send many."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (scoring a prompt)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    decoding: str | None = None
    draft_length: int | None = Field(None, ge=1, le=MAX_DRAFT_LENGTH)
    # speculative: how far to draft (core.speculation, core.draft_tree)
    draft_policy: Literal["adaptive", "fixed", "tree"] | None = None

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
    """``prompt``: a string, a list of strings, a list of token ids or a list of token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise ValueError("prompt must not be empty")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty (nor hold an empty prompt)")
        return prompts

    def check(self) -> None:
        """Rules across fields; ApiError(400) naming the field."""
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(
                400, "invalid 'max_tokens': must be >= 1 (0 only with echo, to score the prompt)", "max_tokens"
            )
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise ApiError(
                400, f"invalid 'n': {len(self.prompt)} prompts x n={self.n} exceeds {MAX_CHOICES} choices", "n"
            )

    @property
    def prompts(self) -> list[str | list[int]]:
        return self.prompt  # normalised to a list by the validator


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def check(self) -> None:
        """Rules across fields; ApiError(400) naming the field."""
        if self.max_tokens == 0:
            raise ApiError(400, "invalid 'max_tokens': must be >= 1", "max_tokens")
        if self.n > MAX_CHOICES:
            raise ApiError(400, f"invalid 'n': at most {MAX_CHOICES}", "n")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "invalid 'top_logprobs': it needs 'logprobs': true", "top_logprobs")


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
    request = parse_body(kind, raw)
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


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "send either 'prompt' or 'messages'", "prompt")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    tokens: list[int]

    def check(self) -> None:
        pass


def parse_body(kind: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body against ``kind``; ApiError(400) naming the first bad field."""
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
    request.check()
    return request


def completion_logprobs(entries: list[list[Any]]) -> dict[str, Any]:
    """OpenAI completions' logprobs object from worker entries [text, logprob, top pairs, offset]."""
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [None if e[2] is None else dict(e[2]) for e in entries],
        "text_offset": [e[3] for e in entries],
    }


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[list[Any]]) -> dict[str, Any]:
    """OpenAI chat's logprobs object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for text, logprob, top, _ in entries:
        item = _chat_token(text, logprob)
        item["top_logprobs"] = [_chat_token(t, v) for t, v in top or []]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_body(model: str, choices: list[dict[str, Any]], usage: dict) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": c["index"], "text": c["text"], "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
            for c in choices
        ],
        "usage": usage,
        "recyclegpt": choices[0]["stats"] if len(choices) == 1 else [c["stats"] for c in choices],
    }


def chat_body(model: str, choices: list[dict[str, Any]], usage: dict) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": c["logprobs"],
                "finish_reason": c["finish_reason"],
            }
            for c in choices
        ],
        "usage": usage,
        "recyclegpt": choices[0]["stats"] if len(choices) == 1 else [c["stats"] for c in choices],
    }


class ChunkWriter:
    """Server-sent event lines for one streamed completion or chat completion (any number of choices)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**self.base, 'choices': choices, **extra})}\n\n"

    def first(self, index: int) -> str | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if not self.chat:
            return None
        return self._event(
            [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def text(self, index: int, piece: str, logprobs: dict[str, Any] | None = None) -> str:
        if self.chat:
            choice = {"index": index, "delta": {"content": piece}, "logprobs": logprobs, "finish_reason": None}
        else:
            choice = {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": None}
        return self._event([choice])

    def last(self, index: int, finish_reason: str, usage: dict, stats: dict) -> str:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"delta": {}} if self.chat else {"text": ""})
        return self._event([choice], usage=usage, recyclegpt=stats)

    def usage(self, usage: dict) -> str:
        """``stream_options.include_usage``: a last chunk with no choices and the request's usage."""
        return self._event([], usage=usage)

    @staticmethod
    def error(error: ApiError) -> str:
        return f"data: {json.dumps(error.body())}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
