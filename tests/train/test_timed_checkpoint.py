"""Checkpoints come by wall time as well as by steps: a SIGKILLed fit loses at most that interval."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch


def read_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def trained_seconds(checkpoint) -> float:
    return checkpoint["callbacks"]["Timer"]["time_elapsed"]["train"]


def test_sigkill_after_first_timed_checkpoint_resumes_from_it(workdir, train_command, run_train):
    last = workdir / "runs/checkpoints/last.ckpt"
    # Step checkpoints effectively off: only the 2-second timer can write last.ckpt.
    args = [
        "--trainer.max_steps", "100000",
        "--trainer.max_time", "00:00:10:00",
        "--checkpoint.every_n_train_steps", "100000",
        "--checkpoint.train_time_interval", "00:00:02",
        "--export.dirpath", "runs/m",
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        train_command(*args), cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not last.exists():
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert last.exists(), "no timed checkpoint appeared within 180 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = read_checkpoint(last)
    step = killed["global_step"]
    assert 0 < step < 100000
    assert trained_seconds(killed) >= 2.0  # saved because 2 s of training passed, not because of a step count

    resumed_run = run_train(
        workdir, "--ckpt_path", "last", "--trainer.max_steps", str(step + 3), "--export.dirpath", "runs/m"
    )
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    output = resumed_run.stdout + resumed_run.stderr
    assert "Restored all states from the checkpoint" in output, output[-3000:]
    resumed = read_checkpoint(last)
    assert resumed["global_step"] == step + 3  # the step counter continued


def test_time_limit_counts_time_trained_before_the_resume(workdir, run_train):
    first = run_train(
        workdir, "--trainer.max_steps", "6", "--trainer.max_time", "00:00:10:00", "--export.dirpath", "runs/m"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    last = workdir / "runs/checkpoints/last.ckpt"
    before = read_checkpoint(last)
    assert before["global_step"] == 6 and trained_seconds(before) > 0
    # A budget smaller than the time already trained: the resumed fit stops at once, at step 6.
    second = run_train(
        workdir, "--ckpt_path", "last", "--trainer.max_steps", "100", "--trainer.max_time", "00:00:00:00",
        "--export.dirpath", "runs/m",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert read_checkpoint(last)["global_step"] == 6


def test_checkpoint_interval_must_be_positive(workdir, run_train):
    result = run_train(workdir, "--checkpoint.train_time_interval", "00:00:00")
    assert result.returncode != 0
    assert "train_time_interval must be positive" in result.stderr
