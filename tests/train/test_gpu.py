"""`recyclegpt-train` on a CUDA GPU: joint training and frozen-base training over cached features in
`precision: auto` (bf16-mixed there), each exporting a model that decodes on the GPU. Skipped without one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from recyclegpt.core import RecycleGPT

from .test_frozen_base import pretrained_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")

ON_GPU = ["--trainer.accelerator=gpu", "--trainer.precision=auto"]


def decodes_on_the_gpu(export) -> None:
    model = RecycleGPT.from_pretrained(str(export), device="cuda")
    prompt = torch.tensor([model.tokenizer.encode("def main(")], device="cuda")
    standard = model.generate(prompt, 8)
    assert model.generate(prompt, 8, decoding="alternating").sequences.shape == standard.sequences.shape
    assert model.generate(prompt, 8, decoding="speculative").sequences.shape == standard.sequences.shape


def test_joint_fit_on_the_gpu_in_auto_precision(workdir, run_train, exported) -> None:
    result = run_train(workdir, *ON_GPU)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert f"precision: {expected} (requested auto; cuda, " in result.stdout
    decodes_on_the_gpu(exported(result.stdout))


def test_frozen_base_fit_over_cached_features_on_the_gpu(workdir, run_train, exported) -> None:
    source = pretrained_model(workdir / "pretrained")
    args = [
        *ON_GPU,
        "--model.regime=frozen_base",
        f"--model.pretrained={source}",
        "--model.unroll_depth=3",
        "--model.distill=true",
        "--model.draft_vocab_size=64",
        "--data.feature_cache=runs/features",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
    ]
    result = run_train(workdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature cache" in result.stdout and "building" in result.stdout
    export = exported(result.stdout)
    before, after = load_file(source / "model.safetensors"), load_file(export / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before if not key.startswith("recycle."))
    decodes_on_the_gpu(export)
