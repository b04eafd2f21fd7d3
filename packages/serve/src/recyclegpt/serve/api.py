"""The LitAPI: loads the model in the inference worker and runs each job through the engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException

from recyclegpt.core import RecycleGPT
from recyclegpt.serve.engine import Engine, Job, resolve_dtype
from recyclegpt.serve.protocol import ApiError
from recyclegpt.serve.spec import OpenAIEndpoints


def default_cpu_threads() -> int:
    """All cores but one: the API process needs a core of its own to answer clients.

    Measured on 2 cores with the demo model: generate inside the worker took 3x longer with 2 torch
    threads than with 1, while alone in a process 2 threads are only 15% faster than 1.
    """
    return max(1, (os.cpu_count() or 2) - 1)


class RecycleGPTAPI(ls.LitAPI):
    """One request at a time per worker (LitServe queues the rest); output streams back through the spec."""

    def __init__(
        self,
        model_dir: str,
        dtype: str,
        spec: OpenAIEndpoints,
        cpu_threads: int | None = None,
        quantize: str = "none",
    ) -> None:
        super().__init__(spec=spec, stream=True, max_batch_size=1)
        self.model_dir = model_dir
        self.dtype = dtype
        self.cpu_threads = cpu_threads
        self.quantize = quantize

    def setup(self, device: str) -> None:
        if device == "cpu":
            torch.set_num_threads(self.cpu_threads or default_cpu_threads())
        dtype = resolve_dtype(self.dtype, device)
        model = RecycleGPT.from_pretrained(self.model_dir, dtype=dtype, device=device, quantize=self.quantize)
        self.engine = Engine(model, model.tokenizer)
        # Warm up, so the first client does not pay for lazy initialisation (and /health means ready).
        model.generate(torch.tensor([[0]], device=device), 1)
        print(f"recyclegpt-serve: {self.model_dir} loaded on {device} in {dtype}", flush=True)

    def decode_request(self, request: Job) -> Job:
        return request  # validated by the spec before it was queued

    def predict(self, job: Job) -> Iterator[dict[str, Any]]:
        try:
            yield from self.engine.run(job)
        except ApiError as err:  # LitServe ships HTTPException back to the client process
            raise HTTPException(err.status, detail=err.body()["error"]) from None

    def encode_response(self, outputs: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from outputs
