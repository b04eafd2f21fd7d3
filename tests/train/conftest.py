"""Helpers for the training tests: run `recyclegpt-train` as a real subprocess in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).with_name("tiny.yaml")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "recyclegpt.train.cli", "fit", "--config", str(TINY), *args]


def _run(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(_command(*args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _exported(stdout: str) -> Path:
    lines = [line for line in stdout.splitlines() if line.startswith("exported: ")]
    assert len(lines) == 1, stdout[-2000:]
    return Path(lines[0].removeprefix("exported: "))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def train_command():
    """The argv of `recyclegpt-train fit --config tiny.yaml ARGS`."""
    return _command


@pytest.fixture
def run_train():
    """Run `recyclegpt-train fit --config tiny.yaml ARGS` in a directory; returns the CompletedProcess."""
    return _run


@pytest.fixture
def exported():
    """The path printed on the `exported: PATH` line."""
    return _exported
