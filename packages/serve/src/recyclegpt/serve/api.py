"""The LitAPI: loads the model in the inference worker; its BatchingLoop batches the jobs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException

from recyclegpt.core import RecycleGPT
from recyclegpt.core.batching import BATCHED_MODES, BatchedDecoder
from recyclegpt.core.decoding import warm_up_speculation
from recyclegpt.core.precision import dtype_name
from recyclegpt.serve.batching import BatchingLoop, Scheduler
from recyclegpt.serve.engine import Engine, Job
from recyclegpt.serve.protocol import ApiError
from recyclegpt.serve.spec import OpenAIEndpoints


def default_cpu_threads() -> int:
    """All cores but one: the API process needs a core of its own to answer clients.

    Measured on 2 cores with the demo model: generate inside the worker took 3x longer with 2 torch
    threads than with 1, while alone in a process 2 threads are only 15% faster than 1.
    """
    return max(1, (os.cpu_count() or 2) - 1)


def batch_rows(model: RecycleGPT, max_batch_size: int, max_kv_mb: float) -> int:
    """Rows the batch may hold: ``max_batch_size``, fewer if its KV caches (both batched modes) would
    pass ``max_kv_mb``; ValueError when not even one row fits."""
    per_row = sum(BatchedDecoder.kv_bytes(model, mode, 1) for mode in BATCHED_MODES)
    fits = int(max_kv_mb * 2**20 // per_row)
    if fits < 1:
        raise ValueError(
            f"--max-kv-mb {max_kv_mb}: one batch row of this model needs {per_row / 2**20:.1f} MiB of KV cache"
        )
    return min(max_batch_size, fits)


class RecycleGPTAPI(ls.LitAPI):
    """Continuous batching in the worker (``BatchingLoop``); output streams back through the spec."""

    def __init__(
        self,
        model_dir: str,
        dtype: str,
        spec: OpenAIEndpoints,
        cpu_threads: int | None = None,
        max_batch_size: int = 8,
        max_kv_mb: float = 4096.0,
        quantize: str = "none",
        draft_length: int = 4,
    ) -> None:
        super().__init__(spec=spec, stream=True, max_batch_size=1, loop=BatchingLoop())
        self.model_dir = model_dir
        self.dtype = dtype
        self.cpu_threads = cpu_threads
        self.batch_limit = max_batch_size
        self.max_kv_mb = max_kv_mb
        self.quantize = quantize
        self.draft_length = draft_length  # the default of speculative requests, whose step costs setup measures

    def setup(self, device: str) -> None:
        if device == "cpu":
            torch.set_num_threads(self.cpu_threads or default_cpu_threads())
        elif self.cpu_threads:  # a GPU worker's own CPU work is small: fewer threads may contend less with the API
            torch.set_num_threads(self.cpu_threads)
        # ``auto`` resolves in from_pretrained, which also knows the weights of a directory saved quantized.
        model = RecycleGPT.from_pretrained(
            self.model_dir, dtype=self.dtype, device=device, quantize=self.quantize, fuse=True
        )
        dtype = dtype_name(model.model.norm.weight.dtype)
        self.engine = Engine(model, model.tokenizer)
        rows = batch_rows(model, self.batch_limit, self.max_kv_mb)
        self.scheduler = Scheduler(self.engine, rows)
        # Warm up, so the first client does not pay for lazy initialisation (and /health means ready).
        model.generate(torch.tensor([[0]], device=device), 1)
        warm_up_speculation(model, self.draft_length)
        for mode in BATCHED_MODES:
            self.scheduler.decoder(mode).add("warm-up", [0], 2)
            self.scheduler.decoder(mode).step()
        print(
            f"recyclegpt-serve: {self.model_dir} loaded on {device} in {dtype}; batches of up to {rows} rows",
            flush=True,
        )

    def decode_request(self, request: Job) -> Job:
        return request  # validated by the spec before it was queued

    def predict(self, job: Job) -> Iterator[dict[str, Any]]:
        """One job alone (LitServe's own loops; the server runs BatchingLoop instead)."""
        try:
            messages = self.engine.run(job)
            first = next(messages)  # a job the engine refuses fails here, before the started note
            yield {"started": True}  # for the API process's metrics: the job left the queue
            yield first
            yield from messages
        except ApiError as err:  # LitServe ships HTTPException back to the client process
            raise HTTPException(err.status, detail=err.body()["error"]) from None

    def encode_response(self, outputs: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from outputs
