"""A run killed with SIGKILL mid-way resumes from last.ckpt with its step count and optimizer state."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch


def read_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def adam_step(checkpoint) -> int:
    state = checkpoint["optimizer_states"][0]["state"]
    return int(next(iter(state.values()))["step"])


def test_sigkill_then_resume_continues_from_last_checkpoint(workdir, train_command, run_train):
    last = workdir / "runs/checkpoints/last.ckpt"
    args = ["--trainer.max_steps", "100000", "--checkpoint.every_n_train_steps", "3", "--export.dirpath", "runs/m"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        train_command(*args), cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists() and read_checkpoint(last)["global_step"] >= 6:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert last.exists(), "no checkpoint appeared within 180 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = read_checkpoint(last)  # written atomically, so it loads even after a kill
    step = killed["global_step"]
    assert adam_step(killed) == step

    result = run_train(
        workdir, "--ckpt_path", "last", "--trainer.max_steps", str(step + 4), "--export.dirpath", "runs/m"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = read_checkpoint(last)
    assert resumed["global_step"] == step + 4
    assert adam_step(resumed) == step + 4  # AdamW state carried over: 4 more updates, not a fresh 4
    assert not list(last.parent.glob(".*.tmp")), "temporary checkpoint files left behind"


def test_resume_without_checkpoint_starts_fresh(workdir, run_train):
    result = run_train(workdir, "--ckpt_path", "last", "--trainer.max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_checkpoint(workdir / "runs/checkpoints/last.ckpt")["global_step"] == 2


def test_resumed_run_keeps_writing_last_ckpt(workdir, run_train):
    """A second run in the same directory overwrites last.ckpt rather than starting last-v1.ckpt."""
    first = run_train(workdir, "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(workdir, "--ckpt_path", "last", "--trainer.max_steps", "10")
    assert second.returncode == 0, second.stderr[-3000:]
    last = workdir / "runs/checkpoints/last.ckpt"
    assert read_checkpoint(last)["global_step"] == 10
    assert not list(last.parent.glob("last-v*.ckpt"))
