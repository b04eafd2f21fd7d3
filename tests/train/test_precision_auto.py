"""`precision: auto` (the configs' default) resolves from the hardware before the Trainer is built."""

from __future__ import annotations

import pytest

from recyclegpt.train.trainer import RecycleTrainer, resolve_precision


@pytest.mark.parametrize(
    ("cpu", "expected"), [("avx2", "32-true"), ("avx512", "32-true"), ("avx512_bf16", "bf16-mixed")]
)
def test_auto_follows_the_cpu_class(cpu_class, cpu, expected, capsys):
    cpu_class(cpu)
    assert resolve_precision("auto", "cpu") == expected
    trainer = RecycleTrainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False)
    assert trainer.resolved_precision == expected
    assert trainer.precision == expected  # what Lightning itself uses
    assert f"precision: {expected} (requested auto" in capsys.readouterr().out


def test_explicit_precision_wins_and_bf16_on_avx2_warns(cpu_class, capsys):
    cpu_class("avx2")
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert "without native bf16" in capsys.readouterr().err
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert capsys.readouterr().err == ""


def test_fit_logs_the_precision_used(workdir, run_train):
    result = run_train(workdir, "--trainer.max_steps", "2", "--trainer.precision", "32-true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision: 32-true (requested 32-true; cpu, CPU " in result.stdout
    hparams = (next((workdir / "runs/logs").rglob("hparams.yaml"))).read_text()
    assert "precision_used: 32-true" in hparams and "cpu_capability:" in hparams
