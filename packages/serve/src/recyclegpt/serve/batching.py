"""Continuous batching in the inference worker: concurrent requests share forward passes.

``Scheduler`` holds the choices being generated. ``standard`` and ``alternating`` choices join
core's ``BatchedDecoder`` of their mode at the next step and leave when they finish (their stream
ends then). A ``speculative`` choice runs speculatively (core's ``generate``, one draft-and-verify
round per step, ``LockstepGenerate``) when it arrives at an idle worker; arriving while others are
being served, it falls back to a ``standard`` row of the batch: greedy output is the same (speculative
is lossless), and one batched standard step serves every row at once where per-row drafts could not.
Each scheduler step runs one step of every non-empty group, so groups interleave.

``BatchingLoop`` is the LitServe loop around it: it takes requests off LitServe's queue without
waiting while rows are running, admits them up to ``max_batch_size`` (the rest wait in the queue,
bounded by the API process's ``--max-queue`` with a 503), and ships each choice's messages back.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

from recyclegpt.core.batching import BatchedDecoder
from recyclegpt.serve.engine import Completion, Engine, Job
from recyclegpt.serve.protocol import ApiError
from recyclegpt.serve.streaming import LockstepGenerate

logger = logging.getLogger(__name__)


@dataclass
class Running:
    """A choice in the worker: its completion, where its messages go, and the group it decodes in."""

    uid: str
    completion: Completion
    route: Any  # a BatchedDecoder, or a LockstepGenerate for a speculative solo
    ran_as: str
    peak_batch: int = 1  # the most choices decoded together while this one ran


Message = tuple[str, dict[str, Any] | None]  # (uid, message); None: the choice's stream is over


class Scheduler:
    """The choices being generated and the groups they decode in; ``step`` advances all of them."""

    def __init__(self, engine: Engine, max_batch_size: int = 8) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.decoders: dict[str, BatchedDecoder] = {}
        self.running: dict[str, Running] = {}
        self.steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # rows per step, recent
        self.failed: list[tuple[str, ApiError]] = []  # choices that failed in a step, for the loop to report

    def __len__(self) -> int:
        return len(self.running)

    def has_capacity(self) -> bool:
        return len(self.running) < self.max_batch_size

    def decoder(self, decoding: str) -> BatchedDecoder:
        if decoding not in self.decoders:
            self.decoders[decoding] = BatchedDecoder(self.engine.model, decoding, self.max_batch_size)
        return self.decoders[decoding]

    def admit(self, uid: str, job: Job, alone: bool) -> list[Message]:
        """Start a choice (ApiError when the engine refuses it); its first messages.

        ``alone``: nothing else is running or waiting, so a speculative choice may run speculatively.
        """
        completion = self.engine.start(job)
        messages: list[Message] = [(uid, {"started": True})]
        if (opening := completion.opening()) is not None:
            messages.append((uid, opening))
        if completion.max_new == 0:  # echo only: the prompt's logprobs, no generation
            return [*messages, *self._finish(uid, completion)]
        if job.decoding == "speculative" and alone and not self._has_solo():
            self.running[uid] = Running(uid, completion, self.engine.generation(completion), "speculative")
            return messages  # its first tokens come with the next step
        ran_as = job.decoding if job.decoding in ("standard", "alternating") else "standard"
        decoder = self.decoder(ran_as)
        first = decoder.add(uid, completion.prompt, completion.max_new, **self.engine.sampling(job))
        self.running[uid] = Running(uid, completion, decoder, ran_as)
        return [*messages, *self._deliver(uid, first.new_tokens, first.finished, batched_cost(first))]

    def step(self) -> list[Message]:
        """One step of every group: a batched step per decoder, one round of the speculative solo."""
        messages: list[Message] = []
        rows = len(self.running)
        for running in self.running.values():
            running.peak_batch = max(running.peak_batch, rows)
        for decoder in self.decoders.values():
            if len(decoder):
                for out in decoder.step():
                    messages += self._deliver(out.key, out.new_tokens, out.finished, batched_cost(out))
        for uid, running in list(self.running.items()):
            if isinstance(running.route, LockstepGenerate):
                try:
                    tokens = running.route.advance()
                except ValueError as err:  # core refused an argument: this choice fails, the others go on
                    del self.running[uid]
                    self.failed.append((uid, ApiError(400, str(err))))
                    continue
                messages += self._deliver(uid, tokens, running.route.finished)
        if rows:
            self.steps += 1
            self.batch_sizes.append(rows)
        return messages

    def cancel_all(self, error: Exception) -> list[str]:
        """Drop every running choice (after a failed step); their uids."""
        uids = list(self.running)
        for uid in uids:
            self._drop(self.running.pop(uid))
        return uids

    # ----------------------------------------------------------------------------- internals
    def _has_solo(self) -> bool:
        return any(isinstance(r.route, LockstepGenerate) for r in self.running.values())

    def _deliver(self, uid: str, tokens: list[int], finished: bool, cost: dict | None = None) -> list[Message]:
        running = self.running.get(uid)
        if running is None:
            return []
        completion = running.completion
        if cost is not None:
            completion.cost = cost
        messages: list[Message] = []
        if tokens and (delta := completion.push(tokens)) is not None:
            messages.append((uid, delta))
        if completion.finished or finished:
            del self.running[uid]
            self._drop(running)
            completion.cost.update(ran_as=running.ran_as, peak_batch=running.peak_batch)
            messages += self._finish(uid, completion)
        return messages

    def _drop(self, running: Running) -> None:
        """Take a choice out of its group, and record what its decoding cost."""
        if isinstance(running.route, LockstepGenerate):
            running.completion.settle(running.route)
            return
        running.route.remove(running.uid)  # no-op when it already left the batch (finished in this step)

    def _finish(self, uid: str, completion: Completion) -> list[Message]:
        return [(uid, completion.close()), (uid, None)]


def batched_cost(out: Any) -> dict[str, Any]:
    return {"full_model_calls": out.full_model_calls, "module_calls": out.module_calls, "acceptance_rate": 0.0}


class BatchingLoop(LitLoop):
    """LitServe's inference-worker loop for the scheduler (``lit_api.scheduler``, made in ``setup``)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: deque[tuple[int, str, float, Job]] = deque()
        self.routes: dict[str, int] = {}  # uid -> response queue id

    def run(
        self,
        lit_api: Any,
        device: str,
        worker_id: int,
        request_queue: Any,
        transport: Any,
        workers_setup_status: dict[int, str],
        callback_runner: Any,
    ) -> None:
        scheduler: Scheduler = lit_api.scheduler
        while True:
            if not self._intake(
                request_queue, block=not len(scheduler) and not self.waiting, lit_api=lit_api, transport=transport
            ):
                return
            while self.waiting and scheduler.has_capacity():
                response_queue_id, uid, timestamp, job = self.waiting.popleft()
                self.routes[uid] = response_queue_id
                if self._timed_out(lit_api, timestamp):
                    self._error(transport, uid, HTTPException(504, "Request timed out"))
                    continue
                alone = not len(scheduler) and not self.waiting
                try:
                    self._send(transport, scheduler.admit(uid, job, alone))
                except ApiError as err:
                    self._error(transport, uid, HTTPException(err.status, detail=err.body()["error"]))
                except Exception as err:  # a bug: this choice fails, the worker goes on
                    logger.exception("admitting a request failed")
                    self._error(transport, uid, err)
            if len(scheduler):
                try:
                    self._send(transport, scheduler.step())
                    while scheduler.failed:
                        uid, error = scheduler.failed.pop()
                        self._error(transport, uid, HTTPException(error.status, detail=error.body()["error"]))
                except Exception as err:
                    logger.exception("a decoding step failed")
                    for uid in scheduler.cancel_all(err):
                        self._error(transport, uid, err)

    def _intake(self, request_queue: Any, block: bool, lit_api: Any, transport: Any) -> bool:
        """Move queued requests into ``waiting`` (waiting up to 1 s for one when idle); False on shutdown."""
        while True:
            item = self.get_request(request_queue, block=block, timeout=1.0 if block else None)
            if item is None:
                return True
            if item == _SENTINEL_VALUE:
                return False
            response_queue_id, uid, timestamp, job = item
            if self._timed_out(lit_api, timestamp):
                self.routes[uid] = response_queue_id
                self._error(transport, uid, HTTPException(504, "Request timed out"))
                continue
            self.waiting.append(item)
            block = False

    @staticmethod
    def _timed_out(lit_api: Any, timestamp: float) -> bool:
        """Waited in the queue longer than --timeout (LitServe's request_timeout)."""
        timeout = lit_api.request_timeout
        return bool(timeout and timeout != -1 and time.monotonic() - timestamp > timeout)

    def _send(self, transport: Any, messages: list[Message]) -> None:
        for uid, message in messages:
            queue_id = self.routes[uid]
            if message is None:
                self.put_response(
                    transport, queue_id, uid, "", LitAPIStatus.FINISH_STREAMING, LoopResponseType.STREAMING
                )
                del self.routes[uid]
            else:
                data = json.dumps(message) + "\n"
                self.put_response(transport, queue_id, uid, data, LitAPIStatus.OK, LoopResponseType.STREAMING)

    def _error(self, transport: Any, uid: str, error: Exception) -> None:
        queue_id = self.routes.pop(uid)
        if isinstance(error, HTTPException):
            payload: Any = PickleableHTTPException.from_exception(error)
            self.put_response(transport, queue_id, uid, payload, LitAPIStatus.ERROR, LoopResponseType.STREAMING)
        else:
            self.put_error_response(transport, queue_id, uid, error, LoopResponseType.STREAMING)
