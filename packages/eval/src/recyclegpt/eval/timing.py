"""Wall-clock timing that waits for the accelerator."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """Run ``fn`` once; its result and the seconds it took (after the device finished)."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start
