"""LightningModule: RecycleGPT trained with L_lm + rec_weight * L_rec (+ feature_weight * L_feature)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Timer
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from recyclegpt.core import RecycleConfig, RecycleGPT, RecycleLosses, recycle_losses
from recyclegpt.core.losses import UnrolledLosses, unrolled_losses
from recyclegpt.core.precision import cpu_capability, cpu_has_native_bf16

Regime = Literal["joint", "frozen_base"]
ModuleInit = Literal["random", "base"]


class RecycleLM(LightningModule):
    """Trains a RecycleGPT in one of two regimes.

    Args:
        regime: ``joint`` trains base and module together (from scratch unless ``pretrained``);
            ``frozen_base`` trains only the module of a ``pretrained`` model, whose base stays unchanged.
        config: the model shape for training from scratch; its ``vocab_size`` is replaced by the tokenizer's.
        pretrained: a RecycleGPT or Hugging Face Llama directory, or a ``.gguf`` file.
        module_layers: depth of the module attached to a ``pretrained`` model.
        rec_weight: weight of the recycle loss L_rec.
        feature_weight: weight of the EAGLE-style smooth L1 between module state and base h[t] (0 = off).
        compile: run the loss computation through ``torch.compile`` (works on CPU and GPU).
        schedule_by_time: with ``trainer.max_time`` set, the cosine decay follows whichever of the step
            count and the time budget is further along, so a run cut short by time on a slow machine
            still ends at the low learning rate instead of mid-schedule.
        unroll_depth: frozen_base: train the module on this many chained draft steps, each reading
            its own previous output state (EAGLE-3's training-time test); losses weighted depth_decay^(k-1).
        distill: soft cross-entropy to the base's (detached) distribution instead of CE to x[t+1]
            (joint too: the module then learns to agree with the base it is trained beside).
        draft_vocab_size: the module scores only the N most frequent tokens of the training data.
        module_init: ``base`` starts the module from the base (last layer copied, fc a pass-through of h).
        feature_noise: in training, uniform noise of this fraction of each base state's RMS on the states
            the module reads (EAGLE's augmentation against a module that memorises its features).
        feature_layers: base layers (0-based) whose outputs the module reads beside the final state,
            through one projection (EAGLE-3's fused low/mid/high features); frozen_base only.

    In frozen_base with any of these (or with ``data.feature_cache``) the step computes the unrolled
    losses of :func:`recyclegpt.core.losses.unrolled_losses` and logs loss, agreement and accuracy per depth.
    """

    def __init__(
        self,
        regime: Regime = "joint",
        config: RecycleConfig | None = None,
        pretrained: str | None = None,
        module_layers: int = 1,
        rec_weight: float = 1.0,
        feature_weight: float = 0.0,
        learning_rate: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        schedule_by_time: bool = True,
        unroll_depth: int = 1,
        depth_decay: float = 0.8,
        distill: bool = False,
        draft_vocab_size: int | None = None,
        module_init: ModuleInit = "random",
        feature_noise: float = 0.0,
        feature_layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        if regime == "frozen_base" and pretrained is None:
            raise ValueError("regime frozen_base needs model.pretrained (a model directory or .gguf file)")
        if regime == "joint" and pretrained is None and config is None:
            raise ValueError("regime joint from scratch needs model.config")
        if unroll_depth < 1:
            raise ValueError(f"unroll_depth must be >= 1, got {unroll_depth}")
        if regime == "joint" and (unroll_depth > 1 or draft_vocab_size or module_init != "random" or feature_layers):
            raise ValueError("unroll_depth, draft_vocab_size, module_init and feature_layers need regime frozen_base")
        self.save_hyperparameters(logger=False)
        self.strict_loading = regime != "frozen_base"  # frozen-base checkpoints hold the module only
        if isinstance(config, dict):
            config = RecycleConfig.from_dict(config)
        self.config = config
        self.model: RecycleGPT | None = None
        self.tokenizer: Any = None
        self._losses = recycle_losses

    @property
    def frozen_base(self) -> bool:
        return self.hparams.regime == "frozen_base"

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the model once the tokenizer is known (the DataModule is set up before this hook)."""
        if self.model is not None:
            return
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.tokenizer is None and datamodule is not None:
            self.tokenizer = datamodule.load_tokenizer()
        self.model = self.build_model()
        if self.frozen_base:
            self.model.freeze_base()
            if self.hparams.module_init == "base":
                self.model.init_module_from_base()
            if self.hparams.draft_vocab_size is not None:
                self.model.set_draft_vocab(self._frequent_tokens(datamodule, self.hparams.draft_vocab_size))
        vocab = self.model.config.vocab_size
        for stage in ("train", "val"):
            setattr(self, f"{stage}_perplexity", Perplexity())
            setattr(self, f"{stage}_module_accuracy", MulticlassAccuracy(vocab, average="micro", validate_args=False))
            setattr(self, f"{stage}_agreement", MulticlassAccuracy(vocab, average="micro", validate_args=False))
        if self.hparams.compile:
            self._losses = torch.compile(recycle_losses)

    def _frequent_tokens(self, datamodule: Any, count: int) -> torch.Tensor:
        """The ``count`` most frequent token ids of the training blocks (ties: lower id first)."""
        blocks = getattr(datamodule, "train_blocks", None)
        if blocks is None:
            raise ValueError("draft_vocab_size needs the training data (a TextDataModule) to count tokens")
        vocab = self.model.config.vocab_size
        if count > vocab:
            raise ValueError(f"draft_vocab_size {count} exceeds the vocabulary of {vocab}")
        counts = torch.bincount(blocks.flatten(), minlength=vocab)
        return torch.sort(counts, descending=True, stable=True).indices[:count]

    @property
    def unrolled(self) -> bool:
        hp = self.hparams
        return self.frozen_base and (
            hp.unroll_depth > 1 or hp.distill or hp.draft_vocab_size is not None or hp.module_init != "random"
        )

    def build_model(self) -> RecycleGPT:
        hp = self.hparams
        if hp.pretrained is not None:
            model = RecycleGPT.from_pretrained(
                hp.pretrained, module_layers=hp.module_layers, feature_layers=hp.feature_layers
            )
            model.train()
            return model
        if self.tokenizer is None:
            raise ValueError("training from scratch needs a tokenizer (attach a TextDataModule)")
        tok = self.tokenizer
        config = dataclasses.replace(
            self.config,
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = RecycleGPT(config)
        model.tokenizer = tok
        return model

    def train(self, mode: bool = True) -> RecycleLM:
        """Keep a frozen base in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        if self.frozen_base and self.model is not None:
            self.model.model.eval()
            self.model.lm_head.eval()
        return self

    # ------------------------------------------------------------------ steps
    def _unrolled_step(self, ids: torch.Tensor, hidden: torch.Tensor | None, stage: str) -> torch.Tensor:
        """Frozen base, module unrolled over ``unroll_depth`` draft steps; metrics per depth."""
        hp = self.hparams
        if hidden is None:
            with torch.no_grad():
                hidden = self.model.base_hidden(ids)
        out: UnrolledLosses = unrolled_losses(
            self.model,
            ids,
            hidden,
            depth=hp.unroll_depth,
            decay=hp.depth_decay,
            distill=hp.distill,
            feature_weight=hp.feature_weight,
            full_vocab_agreement=stage == "val",
            feature_noise=hp.feature_noise if stage == "train" else 0.0,
        )
        on_step = stage == "train"
        log = {"on_step": on_step, "on_epoch": not on_step, "sync_dist": not on_step, "batch_size": ids.shape[0]}
        self.log(f"{stage}/loss", out.loss, **log)
        self.log(f"{stage}/rec_loss", out.depth_losses[0], prog_bar=True, **log)
        self.log(f"{stage}/agreement", out.depth_agreement[0], prog_bar=True, **log)
        for k, (loss, agree, acc) in enumerate(
            zip(out.depth_losses, out.depth_agreement, out.depth_accuracy, strict=True), 1
        ):
            self.log(f"{stage}/loss_d{k}", loss, **log)
            self.log(f"{stage}/agreement_d{k}", agree, **log)
            self.log(f"{stage}/accuracy_d{k}", acc, **log)
        return out.loss

    def _step(self, batch: torch.Tensor | dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        hp = self.hparams
        if isinstance(batch, dict):  # cached features of the frozen base
            return self._unrolled_step(batch["input_ids"], batch["hidden"], stage)
        if self.unrolled:
            return self._unrolled_step(batch, None, stage)
        out: RecycleLosses = self._losses(
            self.model, batch, hp.rec_weight, hp.feature_weight, self.frozen_base, hp.distill
        )
        on_step = stage == "train"
        log = {"on_step": on_step, "on_epoch": not on_step, "sync_dist": not on_step, "batch_size": batch.shape[0]}
        self.log(f"{stage}/loss", out.loss, **log)
        self.log(f"{stage}/lm_loss", out.lm_loss, prog_bar=True, **log)
        self.log(f"{stage}/rec_loss", out.rec_loss, prog_bar=True, **log)
        if hp.feature_weight > 0:
            self.log(f"{stage}/feature_loss", out.feature_loss, **log)

        with torch.no_grad():
            perplexity = getattr(self, f"{stage}_perplexity")
            perplexity(out.base_logits.detach().float(), out.targets)
            module_tokens = out.module_logits.detach().argmax(-1).flatten()
            base_tokens = out.base_logits.detach().argmax(-1).flatten()
            accuracy = getattr(self, f"{stage}_module_accuracy")
            accuracy(module_tokens, out.targets.flatten())
            agreement = getattr(self, f"{stage}_agreement")
            agreement(module_tokens, base_tokens)
        metric_log = {"on_step": on_step, "on_epoch": not on_step, "batch_size": batch.shape[0]}
        self.log(f"{stage}/perplexity", perplexity, **metric_log)
        self.log(f"{stage}/module_accuracy", accuracy, **metric_log)
        self.log(f"{stage}/agreement", agreement, prog_bar=True, **metric_log)
        return out.loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._step(batch, "val")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters (decay on matrices only); linear warmup, cosine decay."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = min(hp.warmup_steps, total // 2)
        time_progress = self._time_progress() if hp.schedule_by_time else None

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            if time_progress is not None:  # a slow machine reaches the end of its time budget at the low lr too
                progress = max(progress, time_progress())
            progress = min(1.0, progress)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _time_progress(self) -> Callable[[], float] | None:
        """The fraction of ``trainer.max_time`` trained so far, read from Lightning's Timer (which counts
        time trained before a resume); None when no time limit is set."""
        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None]
        if not timers:
            return None
        timer = timers[0]
        budget = timer.time_elapsed() + timer.time_remaining()  # the Timer's duration, through its public API
        return lambda: timer.time_elapsed() / budget

    def on_fit_start(self) -> None:
        """Log the precision actually used and the hardware it was decided from (``auto`` resolved)."""
        hardware = {
            "precision_used": str(self.trainer.precision),
            "cpu_capability": cpu_capability(),
            "cpu_native_bf16": cpu_has_native_bf16(),
            "device": str(self.device),
        }
        for logger in self.trainer.loggers:
            logger.log_hyperparams(hardware)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["recycle_config"] = self.model.config.to_dict()
        if self.frozen_base:
            # The frozen base comes back from `pretrained` on resume; a checkpoint keeps only the module
            # (a SmolLM2 base would add 540 MB to every timed checkpoint).
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith("model.recycle.")}
