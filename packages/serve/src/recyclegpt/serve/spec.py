"""OpenAI-compatible endpoints as a LitSpec: /v1/completions, /v1/chat/completions, /v1/models.

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
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.background import BackgroundTask

from recyclegpt.serve.engine import Job
from recyclegpt.serve.protocol import (
    ApiError,
    ChatRequest,
    ChunkWriter,
    CompletionRequest,
    chat_body,
    completion_body,
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
    """Completions and chat completions, streaming or not, plus the model list."""

    def __init__(
        self,
        model_name: str,
        decoding: str = "alternating",
        draft_length: int = 4,
        max_tokens_limit: int = 512,
        max_queue: int = 128,
    ) -> None:
        super().__init__()
        self.api_path = "/v1/completions"  # the request queue's key; every endpoint shares it
        self.model_name = model_name
        self.decoding = decoding
        self.draft_length = draft_length
        self.max_tokens_limit = max_tokens_limit
        self.max_queue = max_queue
        self.created = int(time.time())
        self._active: set[str] = set()  # requests queued or running, for the max_queue bound
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request: Job, context_kwargs: dict | None = None) -> Job:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    async def models(self) -> JSONResponse:
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "recyclegpt"}
        return JSONResponse({"object": "list", "data": [model]})

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool) -> Response:
        try:
            return await self._serve(request, chat)
        except Exception as err:  # a bug, not the client's fault: still an OpenAI-style body
            logger.exception("request failed")
            return error_response(ApiError(500, f"internal error: {type(err).__name__}", type="server_error"))

    def _job(self, request: CompletionRequest | ChatRequest) -> Job:
        max_tokens, param = requested_max_tokens(request)
        job = Job(
            max_tokens=max_tokens,
            max_tokens_param=param,
            max_tokens_limit=self.max_tokens_limit,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop or [],
            seed=request.seed,
            decoding=request.decoding or self.decoding,
            draft_length=request.draft_length or self.draft_length,
            stream=request.stream,
        )
        if isinstance(request, ChatRequest):
            job.messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        else:
            job.prompt = request.prompt
        return job

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
            if len(self._active) >= self.max_queue:
                raise ApiError(
                    503, f"the server is busy ({self.max_queue} requests in flight); retry later", type="server_error"
                )
        except ApiError as err:
            return error_response(err)

        uid = str(uuid.uuid4())
        messages = self._submit(uid, self._job(request))
        streaming = False
        try:
            # Wait for the worker's first message, so a request it refuses gets a plain 4xx even when streamed.
            first = await anext(messages, (None, LitAPIStatus.ERROR))
            if first[1] == LitAPIStatus.ERROR:
                return error_response(_worker_error(first[0]))
            if not request.stream:
                return await self._collect(chat, first, messages)
            streaming = True
            return StreamingResponse(
                self._events(ChunkWriter(chat, self.model_name), first, messages, uid),
                media_type="text/event-stream",
                background=BackgroundTask(self._release, uid),
            )
        finally:
            if not streaming:
                self._release(uid)

    def _submit(self, uid: str, job: Job) -> AsyncIterator[tuple[Any, LitAPIStatus]]:
        """Queue the job for the inference worker; its messages arrive as (data, status)."""
        queue: deque = deque()
        event = asyncio.Event()
        self._active.add(uid)
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return self.data_streamer(queue, event, send_status=True)

    def _release(self, uid: str) -> None:
        """Forget a finished or abandoned request (safe to call twice)."""
        self._active.discard(uid)
        self.response_buffer.pop(uid, None)

    async def _collect(self, chat: bool, first: tuple, messages: AsyncIterator) -> JSONResponse:
        texts: list[str] = []
        final: dict[str, Any] = {}
        data, status = first
        while True:
            if status == LitAPIStatus.ERROR:
                return error_response(_worker_error(data))
            item = json.loads(data)
            texts.append(item["text"])
            if "finish_reason" in item:
                final = item
            try:
                data, status = await anext(messages)
            except StopAsyncIteration:
                break
        body = chat_body if chat else completion_body
        return JSONResponse(
            body(self.model_name, "".join(texts), final["finish_reason"], final["usage"], final["stats"])
        )

    async def _events(self, writer: ChunkWriter, first: tuple, messages: AsyncIterator, uid: str) -> AsyncIterator[str]:
        try:
            if (opening := writer.first()) is not None:
                yield opening
            data, status = first
            while True:
                if status == LitAPIStatus.ERROR:
                    yield writer.error(_worker_error(data))
                    break
                item = json.loads(data)
                if item["text"]:
                    yield writer.text(item["text"])
                if "finish_reason" in item:
                    yield writer.last(item["finish_reason"], item["usage"], item["stats"])
                try:
                    data, status = await anext(messages)
                except StopAsyncIteration:
                    break
            yield writer.done()
        finally:
            self._release(uid)
