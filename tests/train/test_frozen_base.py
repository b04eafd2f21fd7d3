"""frozen_base: only the module learns; every base weight of the exported model is bit-identical."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from safetensors.torch import load_file

from recyclegpt.core import RecycleGPT
from recyclegpt.train.tokenizer import train_bpe_tokenizer

from ..conftest import tiny_config


def pretrained_model(directory: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = train_bpe_tokenizer([(stdlib / "os.py").read_text()], vocab_size=300)
    torch.manual_seed(0)
    RecycleGPT(tiny_config(tokenizer)).save_pretrained(str(directory), tokenizer=tokenizer)
    return directory


def test_frozen_base_trains_only_the_module(workdir, run_train, exported):
    source = pretrained_model(workdir / "pretrained")
    result = run_train(
        workdir,
        "--model.regime",
        "frozen_base",
        "--model.pretrained",
        str(source),
        "--model.feature_weight",
        "1.0",
        "--trainer.max_steps",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = load_file(source / "model.safetensors"), load_file(exported(result.stdout) / "model.safetensors")
    assert before.keys() == after.keys()
    base = [k for k in before if not k.startswith("recycle.")]
    module = [k for k in before if k.startswith("recycle.")]
    assert base and module
    for key in base:
        assert torch.equal(before[key], after[key]), f"base weight {key} changed"
    assert any(not torch.equal(before[k], after[k]) for k in module), "the module did not train"
