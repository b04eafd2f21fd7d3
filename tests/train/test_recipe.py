"""recyclegpt-recipe end to end on a tiny pretrained model: fit over cached features, evaluate, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from recyclegpt.core import quant_kernels
from recyclegpt.core.precision import auto_dtype, decode_dtype, dtype_name
from recyclegpt.train.recipe import eval_reserve, selfgen_quantize, speed_quantize, training_precision

from .test_frozen_base import pretrained_model

TINY = Path(__file__).with_name("tiny.yaml")


@pytest.mark.slow
def test_recipe_runs_every_phase_on_the_embedded_corpus(workdir: Path) -> None:
    source = pretrained_model(workdir / "pretrained")
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["logger"] = False
    config["trainer"]["val_check_interval"] = 4
    config["model"] = {
        "regime": "frozen_base",
        "pretrained": str(source),
        "unroll_depth": 2,
        "distill": True,
        "draft_vocab_size": 64,
        "module_init": "base",
        "warmup_steps": 2,
    }
    config["data"] = {
        "train_files": ["missing/tinystories.txt"],  # not there: the recipe falls back to the stdlib corpus
        "val_files": ["missing/valid.txt"],
        "block_size": 64,
        "batch_size": 4,
        "feature_cache": "runs/features",
    }
    config["export"] = {"dirpath": "runs/model", "log_artifact": False}
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "recyclegpt.train.recipe", "--config", "recipe.yaml", "--minutes", "0.3"]
    command += ["--max-tokens", "4000", "--max-steps", "8", "--eval-prompts", "2", "--new-tokens", "8"]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "embedded corpus" in result.stdout
    report = json.loads((workdir / "runs/recipe/report.json").read_text())
    assert report["data"] == "stdlib"
    native_bf16 = auto_dtype("cpu") == torch.bfloat16
    # --quantize auto: w8a8 where its integer kernels run (VNNI or AVX2), else unquantized bf16 or int8 with
    # fp32; decoded in what --dtype auto decodes them in (fp32 on the kernels, native bf16 or not)
    if quant_kernels.dynamic_available():
        expected = f"{dtype_name(decode_dtype('cpu', 'w8a8'))} + w8a8"
    else:
        expected = dtype_name(decode_dtype("cpu")) if native_bf16 else "fp32 + int8"
    assert report["speed_weights"] == expected
    assert report["speed"]["speculative"]["identical_to_standard"] is True
    assert set(report["quality"]["agreement_by_depth"]) >= {"1", "2", "3", "4"}
    # the states the base computed while writing its text are the training cache: the fit reuses them
    plan = report["plan"]
    assert 1 <= plan["trained_steps"] <= plan["max_steps"] == 8 and plan["train_seconds"] >= 1
    assert "--trainer.max_time=00:00:" in result.stdout  # training stops at its share of the budget
    assert plan["selfgen_cached_features"] and plan["train_tokens_cached"] == plan["selfgen_tokens"] > 0
    # --selfgen-quantize auto: the base writes in w8a8 where its kernels run; the fit matches that cache
    assert plan["selfgen_quantize"] == ("w8a8" if quant_kernels.dynamic_available() else "none")
    assert f"--data.feature_quantize={plan['selfgen_quantize']}" in result.stdout
    assert "runs/features/train: building" not in result.stdout and "runs/features/val: building" in result.stdout
    assert "  of which feature cache (train)" not in report["phases_s"]
    assert 0 <= report["alternating"]["alternating_identical_fraction"] <= 1
    assert report["plan"]["selfgen_samples"] > 0 and report["plan"]["selfgen_new_tokens"] > 0
    assert (workdir / "runs/recipe/selfgen.txt").stat().st_size > 0 and (workdir / plan["selfgen_blocks"]).exists()
    assert set(report["alternating"]["own_text_agreement_by_depth"]) >= {"1", "2"}
    markdown = (workdir / "runs/recipe/report.md").read_text()
    assert (
        "| agreement (held-out) |" in markdown and "speculative@" in markdown and "| speculative adaptive |" in markdown
    )
    assert "| agreement (on the base's own greedy text) |" in markdown


def test_training_is_bounded_by_its_time_and_by_twice_the_calibrated_steps() -> None:
    import argparse

    from recyclegpt.train.recipe import _duration, _train_plan

    config = {"data": {"batch_size": 8, "block_size": 256, "max_val_bytes": 0}, "trainer": {"val_check_interval": 250}}
    args = argparse.Namespace(minutes=30, train_share=None, eval_share=0.2, max_steps=None, steps=None)
    plan = _train_plan(config, args, uncached_tokens=0, seconds_left=960, base_tps=600, module_tps=2048)
    assert plan["train_seconds"] == 600 and plan["predicted_steps"] == 600 and plan["max_steps"] == 1200
    # time the fit spends loading the base again and exporting comes out of training's share
    assert _train_plan(config, args, 0, 960, 600, 2048, fit_overhead=60)["train_seconds"] == 540
    args.steps = 50  # a fixed step count: no time limit
    assert _train_plan(config, args, 0, 960, 600, 2048) | {"predicted_steps": 0} == {
        "max_steps": 50,
        "predicted_steps": 0,
        "val_check_interval": 50,
        "train_seconds": 0,
    }
    assert _duration(3725) == "00:01:02:05" and _duration(90061) == "01:01:01:01"


def test_the_module_trains_in_the_configs_precision_with_auto_decided_by_the_cpu_class(cpu_class) -> None:
    config = {"trainer": {"precision": "auto", "accelerator": "cpu"}}
    cpu_class("avx2")
    assert training_precision(config, []) == "32-true"
    cpu_class("avx512_bf16")
    assert training_precision(config, []) == "bf16-mixed"
    assert training_precision({"trainer": {"accelerator": "cpu"}}, []) == "bf16-mixed"  # auto when unset
    assert training_precision(config, ["--trainer.precision=32-true"]) == "32-true"  # a fit argument wins


def test_the_evaluation_reserve_is_larger_where_the_speed_report_adds_the_fp32_losslessness_check(
    monkeypatch,
) -> None:
    monkeypatch.setattr(quant_kernels, "dynamic_available", lambda: True)
    assert eval_reserve(torch.bfloat16, "w8a8") == 0.26  # bf16: the exact check reruns in fp32
    assert eval_reserve(torch.float32, "w8a8") == 0.16  # the integer kernels compute in fp32: no rerun
    assert eval_reserve(torch.float32, "int4") == 0.26  # torch's int4 kernels round through bf16


def test_speed_report_quantizes_to_w8a8_with_its_kernels_else_to_int8_only_where_the_cpu_lacks_native_bf16(
    monkeypatch,
) -> None:
    monkeypatch.setattr(quant_kernels, "dynamic_available", lambda: False)
    assert speed_quantize("auto", torch.bfloat16) == "none"
    assert speed_quantize("auto", torch.float32) == "int8"
    monkeypatch.setattr(quant_kernels, "dynamic_available", lambda: True)
    expected = "none" if torch.cuda.is_available() else "w8a8"
    assert speed_quantize("auto", torch.bfloat16) == expected
    assert speed_quantize("int4", torch.bfloat16) == "int4" and speed_quantize("none", torch.float32) == "none"


def test_self_generation_quantizes_to_w8a8_only_where_its_kernels_run(monkeypatch) -> None:
    monkeypatch.setattr(quant_kernels, "dynamic_available", lambda: False)
    assert selfgen_quantize("auto") == "none"
    monkeypatch.setattr(quant_kernels, "dynamic_available", lambda: True)
    assert selfgen_quantize("auto") == ("none" if torch.cuda.is_available() else "w8a8")
    assert selfgen_quantize("int8") == "int8"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chat-share", "2"], "--chat-share must be between 0 and 1"),
        (["--chat-share", "0.5", "--selfgen-share", "0"], "needs --selfgen-share > 0"),
        (["--chat-prompts-from", "README.md"], "give --chat-share > 0"),
        (["--chat-share", "0.5", "--chat-prompts-from", "no/such.txt"], "--chat-prompts-from: "),
    ],
)
def test_a_bad_chat_share_is_a_one_line_error_before_anything_loads(args, message) -> None:
    from recyclegpt.train.recipe import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "no/such/config.yaml", *args])
    assert message in str(exit_info.value)
