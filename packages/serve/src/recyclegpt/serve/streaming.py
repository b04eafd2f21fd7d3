"""Core's ``generate`` in a thread, so its tokens can be read while it is still generating."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from recyclegpt.core import GenerationOutput, RecycleGPT


class TokenStream:
    """Runs ``model.generate`` on one prompt in a worker thread; iterate for its new token ids.

    Use it as a context manager: leaving the block calls ``stop`` and waits for the thread; a
    stopped generation still sets ``output`` (with its counters) to what it produced. Exceptions from ``generate`` (core's
    ValueError for a bad argument) are raised where the tokens are read.
    """

    def __init__(self, model: RecycleGPT, prompt: list[int], max_new_tokens: int, **generate_kwargs: Any) -> None:
        self.output: GenerationOutput | None = None  # set when generate returns
        self.group_sizes: list[int] = []  # tokens per on_tokens call (speculative: accepted drafts + 1)
        self._queue: queue.Queue[list[int] | Exception | None] = queue.Queue()  # None: generate has ended
        self._stop = threading.Event()
        input_ids = torch.tensor([prompt], device=model.lm_head.weight.device)
        self._thread = threading.Thread(
            target=self._generate,
            args=(model, input_ids, max_new_tokens, generate_kwargs),
            name="recyclegpt-generate",
            daemon=True,
        )

    def __enter__(self) -> TokenStream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._thread.join()

    def stop(self) -> None:
        """Ask generate to end at its next accepted tokens."""
        self._stop.set()

    def __iter__(self) -> Iterator[list[int]]:
        """Token ids as generate accepts them; ids that arrived together come as one list."""
        while True:
            items = [self._queue.get()]  # wait for the next tokens
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            if batch := [token for item in items if isinstance(item, list) for token in item]:
                yield batch
            end = items[-1]  # the thread's last item: None, or the exception generate raised
            if isinstance(end, Exception):
                raise end
            if end is None:
                return

    def _generate(self, model: RecycleGPT, input_ids: torch.Tensor, max_new_tokens: int, kwargs: dict) -> None:
        try:
            self.output = model.generate(input_ids, max_new_tokens, on_tokens=self._on_tokens, **kwargs)
        except Exception as err:  # raised again in the reading thread
            self._queue.put(err)
            return
        self._queue.put(None)

    def _on_tokens(self, tokens: torch.Tensor) -> bool:
        """Hand tokens to the reader; returning True tells generate to stop."""
        if self._stop.is_set():
            return True
        self.group_sizes.append(tokens.shape[1])
        self._queue.put(tokens[0].tolist())
        return False
