"""Two CPU processes (DDP over gloo) train the tiny config and export one model."""

from __future__ import annotations

from recyclegpt.core import RecycleGPT


def test_two_process_ddp_on_cpu(workdir, run_train, exported):
    result = run_train(
        workdir,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size: 2" in result.stderr or "distributed_backend=gloo" in result.stderr
    model = RecycleGPT.from_pretrained(str(exported(result.stdout)))
    assert model.num_parameters("module") > 0
