"""`recyclegpt-eval --dtype auto` (the default) loads in the precision the hardware computes natively."""

from __future__ import annotations

import torch

from recyclegpt.core import precision
from recyclegpt.eval import data
from recyclegpt.eval.cli import build_parser


def test_dtype_defaults_to_auto():
    for command in ("quality", "speed", "samples"):
        args = build_parser().parse_args([command, "--model", "m", *(["--data", "d"] if command == "quality" else [])])
        assert getattr(args, command).dtype == "auto"


def test_auto_follows_the_cpu_class(cpu_class, tiny_model_dir, monkeypatch):
    cpu_class("avx2")
    assert data.load_model(str(tiny_model_dir), "auto").lm_head.weight.dtype == torch.float32
    cpu_class("avx512_bf16")
    monkeypatch.setattr(precision, "cpu_decode_kernels_run", lambda *_: False)
    assert data.load_model(str(tiny_model_dir), "auto").lm_head.weight.dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_decode_kernels_run", lambda *_: True)  # decoding: fp32 on the kernels
    assert data.load_model(str(tiny_model_dir), "auto").lm_head.weight.dtype == torch.float32
