"""A real `mlflow server` on a free loopback port receives the run: params, metrics and the model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    server = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_run_reaches_the_mlflow_server(workdir, run_train, mlflow_server):
    result = run_train(
        workdir,
        "--trainer.logger",
        "recyclegpt.train.tracking.MLflowLogger",
        "--trainer.logger.experiment_name",
        "train-test",
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("train-test")
    (run,) = client.search_runs([experiment.experiment_id])
    params = run.data.params
    assert params["model/regime"] == "joint"
    assert params["model/config/hidden_size"] == "32"
    assert params["data/vocab_size"] == "300"
    assert params["trainer/max_steps"] == "12"
    metrics = run.data.metrics
    for name in (
        "train/lm_loss",
        "train/rec_loss",
        "train/perplexity",
        "train/module_accuracy",
        "train/agreement",
        "val/lm_loss",
        "val/rec_loss",
        "val/perplexity",
        "val/module_accuracy",
        "val/agreement",
        "train/tokens_per_sec",
        "lr-AdamW/pg1",
    ):
        assert name in metrics, f"{name} not logged; got {sorted(metrics)}"
    assert len(client.get_metric_history(run.info.run_id, "train/lm_loss")) == 12
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= model_files
