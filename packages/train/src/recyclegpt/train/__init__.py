"""recyclegpt.train: Lightning training of RecycleGPT (LightningModule, DataModule, CLI, MLflow tracking)."""

from recyclegpt.train.data import TextDataModule
from recyclegpt.train.module import RecycleLM

__all__ = ["RecycleLM", "TextDataModule"]
