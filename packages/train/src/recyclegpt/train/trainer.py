"""The Trainer of ``recyclegpt-train``: Lightning's, with ``precision: auto`` decided from the hardware."""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch import Trainer

from recyclegpt.core.precision import (
    SLOW_BF16_WARNING,
    auto_precision,
    cpu_capability,
    cpu_has_native_bf16,
    hardware_summary,
)

AUTO = "auto"


class ConfigError(ValueError):
    """A setting that cannot work; ``recyclegpt-train`` prints it as a one-line error."""


def training_device(accelerator: Any) -> str:
    """``cuda`` when the run will use a GPU (``auto``/``gpu``/``cuda`` with one present), else ``cpu``."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    wants_gpu = name in ("auto", "gpu", "cuda") or "cuda" in name
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str | int | None, accelerator: Any = "auto") -> str | int | None:
    """``auto`` -> ``bf16-mixed`` where the training device computes bf16 natively, else ``32-true``.

    An explicit choice wins; a bf16 one on a CPU without native bf16 prints the measured cost.
    """
    device = training_device(accelerator)
    if precision == AUTO:
        return auto_precision(device)
    if device == "cpu" and isinstance(precision, str) and precision.startswith("bf16") and not cpu_has_native_bf16():
        print(SLOW_BF16_WARNING.format(capability=cpu_capability()), file=sys.stderr, flush=True)
    return precision


class RecycleTrainer(Trainer):
    """``lightning.Trainer`` whose ``precision`` also takes ``auto`` (the default).

    The resolved value is what Lightning sees; it is kept as ``resolved_precision`` (logged to
    MLflow by the LightningModule) and printed once, with the hardware it was decided from (core's
    ``hardware_summary``).
    """

    def __init__(self, *args: Any, precision: str | int | None = AUTO, **kwargs: Any) -> None:
        self.requested_precision = precision
        self.resolved_precision = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        super().__init__(*args, precision=self.resolved_precision, **kwargs)
        device = training_device(kwargs.get("accelerator", "auto"))
        print(
            f"precision: {self.resolved_precision} (requested {precision}; {device}, {hardware_summary(device)})",
            flush=True,
        )
