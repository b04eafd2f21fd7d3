"""OpenAI-compatible endpoints as a LitSpec: /v1/completions, /v1/chat/completions, /v1/models,
plus vLLM-style /tokenize, /detokenize, /tokenizer_info and Prometheus /metrics.

The handlers run in LitServe's API process: they validate the request there (a bad one never
reaches the inference worker), queue a Job, and turn what the worker yields into a JSON answer or
server-sent events. Errors are OpenAI-style: {"error": {"message", "type", "param"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.background import BackgroundTask

from recyclegpt.serve.engine import Job
from recyclegpt.serve.metrics import CONTENT_TYPE, ServerMetrics
from recyclegpt.serve.prompts import PLAIN_CHAT_TEMPLATE, encode_chat
from recyclegpt.serve.protocol import (
    ApiError,
    ChatRequest,
    ChunkWriter,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    parse_body,
    parse_request,
    requested_max_tokens,
)

logger = logging.getLogger(__name__)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _worker_error(data: Any) -> ApiError:
    """The ApiError for an ERROR message from the inference worker."""
    if isinstance(data, HTTPException):
        if isinstance(data.detail, dict):  # an ApiError raised in the worker
            detail = data.detail
            return ApiError(
                data.status_code, detail["message"], detail.get("param"), detail.get("type", "invalid_request_error")
            )
        return ApiError(data.status_code, str(data.detail), type="server_error")
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)  # noqa: S301 - LitServe's own worker-to-server channel
        except Exception:  # noqa: BLE001
            data = None
    detail = f": {type(data).__name__}: {data}" if isinstance(data, Exception) else ""
    return ApiError(500, f"the model failed on this request{detail}", type="server_error")


class OpenAIEndpoints(LitSpec):
    """Completions and chat completions (streaming or not), the model list, tokenizer endpoints, metrics."""

    def __init__(
        self,
        model_name: str,
        decoding: str = "alternating",
        draft_length: int = 4,
        max_tokens_limit: int = 512,
        max_queue: int = 128,
        model_path: str | None = None,
    ) -> None:
        super().__init__()
        self.api_path = "/v1/completions"  # the request queue's key; every endpoint shares it
        self.model_name = model_name
        self.model_path = model_path
        self.decoding = decoding
        self.draft_length = draft_length
        self.max_tokens_limit = max_tokens_limit
        self.max_queue = max_queue
        self.created = int(time.time())
        self._active: set[str] = set()  # choices queued or running, for the max_queue bound
        self._started: set[str] = set()  # choices the worker has taken into its batch
        self._tokenizer: Any = None
        self._metrics: ServerMetrics | None = None  # made in the API process (locks do not pickle)
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/tokenize", self.tokenize, ["POST"])
        self.add_endpoint("/detokenize", self.detokenize, ["POST"])
        self.add_endpoint("/tokenizer_info", self.tokenizer_info, ["GET"])
        self.add_endpoint("/metrics", self.prometheus, ["GET"])

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request: Job, context_kwargs: dict | None = None) -> Job:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    @property
    def metrics(self) -> ServerMetrics:
        if self._metrics is None:
            self._metrics = ServerMetrics()
        return self._metrics

    # ----------------------------------------------------------------------------- small endpoints
    async def models(self) -> JSONResponse:
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "recyclegpt"}
        return JSONResponse({"object": "list", "data": [model]})

    async def prometheus(self) -> Response:
        self.metrics.waiting.set(len(self._active) - len(self._started))
        self.metrics.running.set(len(self._started))
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded in the API process on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_serving_tokenizer(self.model_path)
        return self._tokenizer

    async def tokenizer_info(self) -> JSONResponse:
        """The tokenizer's special tokens and chat template (lm-evaluation-harness's remote tokenizer)."""
        tokenizer = self.tokenizer
        return JSONResponse(
            {
                "tokenizer_class": type(tokenizer).__name__,
                "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token,
                "pad_token": tokenizer.pad_token,
                "unk_token": tokenizer.unk_token,
                "chat_template": getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE,
                "model_max_length": self.context_length,
                "vocab_size": len(tokenizer),
            }
        )

    @property
    def context_length(self) -> int | None:
        config = Path(self.model_path or "") / "config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("max_seq_len")
        return None

    async def tokenize(self, request: Request) -> JSONResponse:
        """``{"prompt"}`` or ``{"messages"}`` (+ ``add_special_tokens``) -> ``{"tokens", "count", ...}`` (vLLM's shape)."""
        try:
            body = parse_body(TokenizeRequest, await request.body())
        except ApiError as err:
            return error_response(err)
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            tokens = encode_chat(self.tokenizer, messages)
        else:
            tokens = self.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return JSONResponse(
            {
                "tokens": tokens,
                "count": len(tokens),
                "max_model_len": self.context_length,
                "token_strs": self.tokenizer.convert_ids_to_tokens(tokens),
            }
        )

    async def detokenize(self, request: Request) -> JSONResponse:
        """``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
        try:
            body = parse_body(DetokenizeRequest, await request.body())
            if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= len(self.tokenizer)):
                raise ApiError(400, f"invalid 'tokens': ids must lie in [0, {len(self.tokenizer)})", "tokens")
        except ApiError as err:
            return error_response(err)
        return JSONResponse({"prompt": self.tokenizer.decode(body.tokens, clean_up_tokenization_spaces=False)})

    # ----------------------------------------------------------------------------- generation
    async def completions(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool) -> Response:
        endpoint = "chat_completions" if chat else "completions"
        try:
            response = await self._serve(request, chat)
        except Exception as err:  # a bug, not the client's fault: still an OpenAI-style body
            logger.exception("request failed")
            response = error_response(ApiError(500, f"internal error: {type(err).__name__}", type="server_error"))
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def _jobs(self, request: CompletionRequest | ChatRequest) -> list[Job]:
        """One job per choice: every prompt times n, indexed prompt-major (OpenAI's order)."""
        max_tokens, param = requested_max_tokens(request)
        arrival = time.time()
        common = dict(
            max_tokens=max_tokens,
            max_tokens_param=param,
            max_tokens_limit=self.max_tokens_limit,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop or [],
            decoding=request.decoding or self.decoding,
            draft_length=request.draft_length or self.draft_length,
            draft_policy=request.draft_policy or "adaptive",
            stream=request.stream,
            arrival=arrival,
        )
        if isinstance(request, ChatRequest):
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            prompts: list[dict] = [{"messages": messages}]
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
            common.update(logprobs=logprobs)
        else:
            prompts = [{"prompt": prompt} for prompt in request.prompts]
            common.update(logprobs=request.logprobs, echo=request.echo)
        jobs = []
        for i, prompt in enumerate(prompts):
            for j in range(request.n):
                seed = None if request.seed is None else request.seed + j  # n samples differ, reproducibly
                jobs.append(Job(**prompt, **common, seed=seed, index=i * request.n + j))
        return jobs

    async def _serve(self, http_request: Request, chat: bool) -> Response:
        try:
            try:
                raw = await http_request.body()
            except HTTPException as err:  # LitServe's max_payload_size middleware
                raise ApiError(err.status_code, str(err.detail)) from None
            request = parse_request(ChatRequest if chat else CompletionRequest, raw, self.max_tokens_limit)
            if request.model and request.model != self.model_name:
                raise ApiError(
                    404, f"the model '{request.model}' does not exist; this server has '{self.model_name}'", "model"
                )
            jobs = self._jobs(request)
            if len(self._active) + len(jobs) > self.max_queue:
                raise ApiError(
                    503, f"the server is busy ({self.max_queue} requests in flight); retry later", type="server_error"
                )
        except ApiError as err:
            return error_response(err)

        choices = [_Choice(job, str(uuid.uuid4())) for job in jobs]
        for choice in choices:
            choice.messages = self._submit(choice.uid, choice.job)
        streaming = False
        try:
            # Wait for the worker's first message of each choice, so a refused request gets a plain 4xx even when streamed.
            for choice in choices:
                choice.first = await self._next(choice)
                if choice.first[1] == LitAPIStatus.ERROR:
                    return error_response(_worker_error(choice.first[0]))
            if not request.stream:
                return await self._collect(chat, choices)
            streaming = True
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(
                self._events(ChunkWriter(chat, self.model_name), choices, include_usage),
                media_type="text/event-stream",
                background=BackgroundTask(self._release_all, choices),
            )
        finally:
            if not streaming:
                self._release_all(choices)

    def _submit(self, uid: str, job: Job) -> AsyncIterator[tuple[Any, LitAPIStatus]]:
        """Queue the job for the inference worker; its messages arrive as (data, status)."""
        queue: deque = deque()
        event = asyncio.Event()
        self._active.add(uid)
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return self.data_streamer(queue, event, send_status=True)

    async def _next(self, choice: _Choice) -> tuple[Any, LitAPIStatus] | None:
        """The choice's next worker message (None at its end), skipping the worker's ``started`` notes."""
        while True:
            try:
                data, status = await anext(choice.messages)
            except StopAsyncIteration:
                return None
            if status == LitAPIStatus.ERROR:
                return data, status
            item = json.loads(data)
            if item.get("started"):
                self._started.add(choice.uid)
                continue
            return item, status

    def _release(self, uid: str) -> None:
        """Forget a finished or abandoned choice (safe to call twice)."""
        self._active.discard(uid)
        self._started.discard(uid)
        self.response_buffer.pop(uid, None)

    def _release_all(self, choices: list[_Choice]) -> None:
        for choice in choices:
            self._release(choice.uid)

    async def _drain(self, choice: _Choice) -> ApiError | None:
        """Read one choice to its end into ``choice``; the worker's error if it failed."""
        message = choice.first
        while message is not None:
            data, status = message
            if status == LitAPIStatus.ERROR:
                return _worker_error(data)
            choice.add(data)
            if "finish_reason" in data:
                self.metrics.finished(choice.job.arrival, data)
            message = await self._next(choice)
        return None

    async def _collect(self, chat: bool, choices: list[_Choice]) -> JSONResponse:
        errors = await asyncio.gather(*(self._drain(choice) for choice in choices))
        if (error := next((e for e in errors if e is not None), None)) is not None:
            return error_response(error)
        body = chat_body if chat else completion_body
        return JSONResponse(body(self.model_name, [c.result() for c in choices], total_usage(choices)))

    async def _events(self, writer: ChunkWriter, choices: list[_Choice], include_usage: bool) -> AsyncIterator[str]:
        """The choices' chunks as they come, interleaved; each choice ends with its finish_reason."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            message = choice.first
            try:
                while message is not None:
                    await merged.put((choice, message))
                    if message[1] == LitAPIStatus.ERROR:
                        break
                    message = await self._next(choice)
            finally:
                await merged.put((choice, None))

        tasks = [asyncio.create_task(pump(choice)) for choice in choices]
        try:
            for choice in choices:
                if (opening := writer.first(choice.job.index)) is not None:
                    yield opening
            open_choices = len(choices)
            while open_choices:
                choice, message = await merged.get()
                if message is None:
                    open_choices -= 1
                    self._release(choice.uid)
                    continue
                data, status = message
                if status == LitAPIStatus.ERROR:
                    yield writer.error(_worker_error(data))
                    break
                choice.add(data)
                index = choice.job.index
                if data["text"] or data.get("logprobs"):
                    yield writer.text(index, data["text"], choice.format_logprobs(data.get("logprobs")))
                if "finish_reason" in data:
                    self.metrics.finished(choice.job.arrival, data)
                    yield writer.last(index, data["finish_reason"], data["usage"], data["stats"])
            if include_usage:
                yield writer.usage(total_usage(choices))
            yield writer.done()
        finally:
            for task in tasks:
                task.cancel()
            self._release_all(choices)


class _Choice:
    """One choice of a request in the API process: its job, worker messages and what arrived."""

    def __init__(self, job: Job, uid: str) -> None:
        self.job = job
        self.uid = uid
        self.messages: AsyncIterator = None  # type: ignore[assignment]
        self.first: tuple[Any, LitAPIStatus] | None = None
        self.texts: list[str] = []
        self.logprobs: list[list[Any]] = []
        self.final: dict[str, Any] = {}

    @property
    def chat(self) -> bool:
        return self.job.messages is not None

    def add(self, data: dict[str, Any]) -> None:
        self.texts.append(data["text"])
        self.logprobs += data.get("logprobs") or []
        if "finish_reason" in data:
            self.final = data

    def format_logprobs(self, entries: list[list[Any]] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return chat_logprobs(entries) if self.chat else completion_logprobs(entries)

    def result(self) -> dict[str, Any]:
        return {
            "index": self.job.index,
            "text": "".join(self.texts),
            "finish_reason": self.final["finish_reason"],
            "logprobs": self.format_logprobs(self.logprobs if self.job.logprobs is not None else None),
            "usage": self.final["usage"],
            "stats": self.final["stats"],
        }


def total_usage(choices: list[_Choice]) -> dict[str, int]:
    """Usage of a whole request: each prompt counted once, every choice's completion."""
    prompts: dict[str, int] = {}
    completion = 0
    for choice in choices:
        usage = choice.final.get("usage", {"prompt_tokens": 0, "completion_tokens": 0})
        prompts[json.dumps(choice.job.prompt if choice.job.prompt is not None else choice.job.messages)] = usage[
            "prompt_tokens"
        ]
        completion += usage["completion_tokens"]
    prompt = sum(prompts.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def load_serving_tokenizer(model_path: str | None) -> Any:
    """The served model's tokenizer (a save_pretrained directory's tokenizer.json, or a .gguf file's)."""
    from recyclegpt.core.checkpoint import load_tokenizer

    path = Path(model_path or "")
    if path.is_file():
        return load_tokenizer(path.parent, gguf_file=path.name)
    return load_tokenizer(path)
