"""Core's ``generate`` in a thread, one decoding round at a time, so its tokens can be read while it is
still generating (``Engine.run``) or interleaved with the batched steps (the scheduler)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from recyclegpt.core import GenerationOutput, RecycleGPT


class LockstepGenerate:
    """``model.generate`` on one prompt in a thread that runs one decoding round per ``advance()`` and waits in between.

    The ``on_tokens`` hook hands each accepted group of tokens over and blocks until the next
    ``advance``, so core's one decoding loop (the speculative decoder's too) can be read group by group
    or interleaved with the batched steps. ``stop`` ends generate at the group last handed out;
    ``output`` (with its counters) then holds what it produced. Exceptions from ``generate`` (core's
    ValueError for a bad argument) are raised by ``advance``.
    """

    def __init__(self, model: RecycleGPT, prompt: list[int], max_new_tokens: int, **generate_kwargs: Any) -> None:
        self.output: GenerationOutput | None = None  # set when generate returns
        self.error: Exception | None = None
        self.group_sizes: list[int] = []  # tokens per on_tokens call (speculative: accepted drafts + 1)
        self.finished = False  # generate has returned (or raised)
        self._go = threading.Semaphore(0)
        self._ready = threading.Semaphore(0)
        self._latest: list[int] | None = None
        self._stopping = False
        self._started = False
        input_ids = torch.tensor([prompt], device=model.lm_head.weight.device)
        self._thread = threading.Thread(
            target=self._run,
            args=(model, input_ids, max_new_tokens, generate_kwargs),
            name="recyclegpt-generate",
            daemon=True,
        )

    def advance(self) -> list[int]:
        """Run until the next accepted tokens (``[]`` once generate has ended)."""
        if self.finished:
            return []
        if not self._started:
            self._started = True
            self._thread.start()
        else:
            self._go.release()
        self._ready.acquire()
        if self.error is not None:
            raise self.error
        return self._latest or []

    def stop(self) -> None:
        """End generate early (its output keeps what it produced) and wait for the thread."""
        if not self._started:
            return
        if not self.finished:
            self._stopping = True
            self._go.release()
            self._ready.acquire()
        self._thread.join(timeout=30)

    def _run(self, model: RecycleGPT, input_ids: torch.Tensor, max_new_tokens: int, kwargs: dict) -> None:
        try:
            self.output = model.generate(input_ids, max_new_tokens, on_tokens=self._on_tokens, **kwargs)
        except Exception as err:  # raised again in advance()
            self.error = err
        self._latest = None
        self.finished = True
        self._ready.release()

    def _on_tokens(self, tokens: torch.Tensor) -> bool:
        """Hand tokens to ``advance`` and wait for the next one; returning True tells generate to stop."""
        self.group_sizes.append(tokens.shape[1])
        self._latest = tokens[0].tolist()
        self._ready.release()
        self._go.acquire()
        return self._stopping
