"""Callbacks: tokens/s and the end-of-fit model export."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from recyclegpt.core import RecycleGPT
from recyclegpt.train.trainer import ConfigError


class LearningRates(LearningRateMonitor):
    """Lightning's LearningRateMonitor (per step) that stands aside when the run has no logger."""

    def __init__(self, logging_interval: str | None = "step") -> None:
        super().__init__(logging_interval=logging_interval)

    def on_train_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that saves every ``every_n_train_steps`` steps *and* every ``train_time_interval``
    of training, whichever comes first, so a killed run loses at most that much time on any machine
    (Lightning's own accepts only one of the two; its save logic already handles both).

    It also writes ``last.ckpt`` when training ends between two saves, so ``--ckpt_path last``
    continues from the final step.
    """

    def __init__(self, *args: Any, train_time_interval: timedelta | str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(train_time_interval, str):
            train_time_interval = parse_interval(train_time_interval)
        if train_time_interval is not None and train_time_interval.total_seconds() <= 0:
            raise ConfigError(f"checkpoint.train_time_interval must be positive, got {train_time_interval}")
        self._train_time_interval = train_time_interval

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and self._last_global_step_saved != trainer.global_step:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(last)
            self.last_model_path = str(last)


def parse_interval(text: str) -> timedelta:
    """``HH:MM:SS`` (or ``DD:HH:MM:SS``, as ``trainer.max_time``) or a number of seconds."""
    parts = text.strip().split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if not numbers or len(numbers) > 4:
        raise ConfigError(f"time interval {text!r}: use HH:MM:SS, DD:HH:MM:SS or seconds")
    seconds = 0.0
    for unit, value in zip((1, 60, 3600, 86400), reversed(numbers), strict=False):
        seconds += unit * value
    return timedelta(seconds=seconds)


class TokensPerSecond(Callback):
    """Training tokens per second over all devices (a sliding window, validation time excluded)."""

    def __init__(self, window_size: int = 10) -> None:
        self.window_size = window_size

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._throughput = Throughput(window_size=self.window_size, world_size=trainer.world_size)
        self._start = time.perf_counter()
        self._paused = 0.0
        self._batches = self._samples = self._tokens = 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.training and hasattr(self, "_pause_start"):
            self._paused += time.perf_counter() - self._pause_start

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: torch.Tensor, batch_idx: int
    ) -> None:
        if isinstance(batch, dict):  # cached features: {"input_ids", "hidden"}
            batch = batch["input_ids"]
        self._batches += 1
        self._samples += batch.shape[0]
        self._tokens += batch.numel()
        elapsed = time.perf_counter() - self._start - self._paused
        self._throughput.update(time=elapsed, batches=self._batches, samples=self._samples, lengths=self._tokens)
        per_device = self._throughput.compute().get("device/items_per_sec")
        if per_device is not None:
            pl_module.log("train/tokens_per_sec", per_device * trainer.world_size, prog_bar=True, on_step=True)


TRAINED_LINE = "trained: "  # "trained: N optimizer steps", printed before "exported: PATH"


class ExportModel(Callback):
    """At the end of fit, write the model directory (config.json, model.safetensors, tokenizer.json).

    Rank 0 writes it with core's atomic ``save_pretrained``, prints ``trained: N optimizer steps`` and
    ``exported: PATH`` and, when the run logs to MLflow, uploads the directory as the run artifact ``model``.
    """

    def __init__(self, dirpath: str = "runs/model", log_artifact: bool = True) -> None:
        self.dirpath = dirpath
        self.log_artifact = log_artifact

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Collective under FSDP (gathers the full state dict onto rank 0); a plain state_dict otherwise.
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        trained: RecycleGPT = pl_module.model
        model = RecycleGPT(trained.config)
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        model.load_state_dict(weights)
        path = Path(self.dirpath).resolve()
        model.save_pretrained(str(path), tokenizer=pl_module.tokenizer)
        print(f"{TRAINED_LINE}{trainer.global_step} optimizer steps", flush=True)
        print(f"exported: {path}", flush=True)
        if self.log_artifact:
            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    logger.experiment.log_artifacts(logger.run_id, str(path), artifact_path="model")
