"""``recyclegpt-train``: LightningCLI over RecycleLM and TextDataModule.

recyclegpt-train fit --config configs/demo.yaml [--trainer.max_steps 100] [--ckpt_path last]
recyclegpt-train fit --config configs/demo.yaml --print_config
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recyclegpt.train.callbacks import Checkpoint, ExportModel, LearningRates, TokensPerSecond
from recyclegpt.train.corpus import CorpusError
from recyclegpt.train.data import TextDataModule
from recyclegpt.train.module import RecycleLM
from recyclegpt.train.tracking import MLflowSaveConfig
from recyclegpt.train.trainer import ConfigError, RecycleTrainer


def trainer_defaults() -> dict:
    """Defaults that every config gets: MLflow tracking, atomic checkpoints, lr and tokens/s logging."""
    return {
        "logger": {"class_path": "recyclegpt.train.tracking.MLflowLogger"},
        "plugins": [{"class_path": "recyclegpt.train.checkpoint_io.AtomicCheckpointIO"}],
        "callbacks": [LearningRates(), TokensPerSecond()],
    }


class RecycleCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "runs/checkpoints",
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 100,
                # ...and every minute of training, so a killed run loses at most a minute on any CPU.
                "checkpoint.train_time_interval": "00:01:00",
                # A resumed run overwrites last.ckpt (atomically) instead of starting last-v1.ckpt,
                # so last.ckpt is always the latest state.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(ExportModel, "export")
        # The model's tokenizer is the data's tokenizer; a BPE is trained only when there is no model.
        parser.link_arguments("model.pretrained", "data.tokenizer")

    def after_fit(self) -> None:
        """One last validation over the held-out blocks, so every run ends with final val metrics."""
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=True)


def main(args: list[str] | None = None) -> None:
    try:
        RecycleCLI(
            RecycleLM,
            TextDataModule,
            trainer_class=RecycleTrainer,
            save_config_callback=MLflowSaveConfig,
            save_config_kwargs={"save_to_log_dir": False},
            trainer_defaults=trainer_defaults(),
            auto_configure_optimizers=False,
            args=args,
        )
    except (CorpusError, ConfigError, FileNotFoundError) as error:
        sys.exit(f"recyclegpt-train: error: {error}")  # one line, exit status 1


if __name__ == "__main__":
    main()
