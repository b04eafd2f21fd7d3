"""MLflow tracking: a logger with a working default store and the resolved config as run params."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, tracking to ``$MLFLOW_TRACKING_URI`` or else ``sqlite:///mlflow.db``.

    (Lightning's own default, ``file:./mlruns``, is refused by MLflow >= 3.13.)
    """

    def __init__(
        self,
        experiment_name: str = "recyclegpt",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ) -> None:
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
            tags=tags,
            artifact_location=artifact_location,
            run_id=run_id,
        )


class MLflowSaveConfig(SaveConfigCallback):
    """Logs the full resolved config as MLflow params plus a ``config.yaml`` artifact.

    The base class would write into ``trainer.log_dir``, which is None for an MLflow server or
    database URI (Lightning issue 20273); use with ``save_config_kwargs={"save_to_log_dir": False}``.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]
        if not loggers:
            return
        params = self.config.as_dict()
        params.pop("config", None)  # the --config file paths, not settings
        yaml_text = self.parser.dump(self.config, skip_none=False)
        for logger in loggers:
            logger.log_hyperparams(params)
            logger.experiment.log_text(logger.run_id, yaml_text, "config.yaml")
