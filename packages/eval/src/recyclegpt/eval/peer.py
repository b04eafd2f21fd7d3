"""Counting the transformers peer's full-model calls (the peer itself lives in ``recyclegpt.core.peer``)."""

from __future__ import annotations

from typing import Any

import torch


class CallCounter:
    """Counts forward calls of a module (the peer's full-model calls) with a forward pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1
