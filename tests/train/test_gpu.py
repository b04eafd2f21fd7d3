"""`recyclegpt-train` on a CUDA GPU: joint training and frozen-base training over cached features in
`precision: auto` (bf16-mixed there), each exporting a model that decodes on the GPU. Skipped without one."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT

from .test_feature_cache import assert_only_the_module_changed, frozen_base_args
from .test_frozen_base import pretrained_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")

ON_GPU = ["--trainer.accelerator=gpu", "--trainer.precision=auto"]


def decodes_on_the_gpu(export) -> None:
    model = RecycleGPT.from_pretrained(str(export), device="cuda")
    prompt = torch.tensor([model.tokenizer.encode("def main(")], device="cuda")
    standard = model.generate(prompt, 8)  # fp32: speculative must equal it token for token
    assert torch.equal(model.generate(prompt, 8, decoding="speculative").sequences, standard.sequences)
    alternating = model.generate(prompt, 8, decoding="alternating").new_tokens
    assert alternating.shape == (1, 8) and 0 <= int(alternating.min()) and int(alternating.max()) < len(model.tokenizer)


def test_joint_fit_on_the_gpu_in_auto_precision(workdir, run_train, exported) -> None:
    result = run_train(workdir, *ON_GPU)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert f"precision: {expected} (requested auto; cuda, " in result.stdout
    decodes_on_the_gpu(exported(result.stdout))


def test_frozen_base_fit_over_cached_features_on_the_gpu(workdir, run_train, exported) -> None:
    source = pretrained_model(workdir / "pretrained")
    result = run_train(workdir, *ON_GPU, *frozen_base_args(source))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature cache" in result.stdout and "building" in result.stdout
    assert_only_the_module_changed(source, exported(result.stdout))
    decodes_on_the_gpu(exported(result.stdout))
