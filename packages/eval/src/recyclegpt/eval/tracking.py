"""Optional MLflow logging of an evaluation: parameters, flattened metrics and the result files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def flatten_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested result as ``a.b.c`` metric names (booleans as 0/1)."""
    metrics: dict[str, float] = {}
    for key, value in result.items():
        name = f"{prefix}{key}".replace("@", "_")
        if isinstance(value, dict):
            metrics.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, bool | int | float):
            metrics[name] = float(value)
    return metrics


def log_to_mlflow(
    experiment: str, run_name: str, params: dict[str, Any], result: dict[str, Any], files: list[Path]
) -> str:
    """Log one run to ``experiment`` at $MLFLOW_TRACKING_URI (default sqlite:///mlflow.db); its id."""
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        mlflow.log_metrics(flatten_metrics(result))
        for file in files:
            mlflow.log_artifact(str(file))
        return run.info.run_id
