"""core.precision decides bf16 or fp32 from the hardware; an explicit choice wins."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleConfig, RecycleGPT
from recyclegpt.core.precision import (
    auto_dtype,
    auto_precision,
    cpu_has_native_bf16,
    dtype_name,
    hardware_summary,
    resolve_dtype,
)


def test_avx2_cpu_means_fp32(cpu_class):
    cpu_class("avx2")
    assert not cpu_has_native_bf16()
    assert auto_dtype("cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert auto_precision("cpu") == "32-true"
    assert "AVX2 (no native bf16)" in hardware_summary("cpu")


def test_avx512_without_bf16_means_fp32(cpu_class):
    cpu_class("avx512")
    assert auto_dtype("cpu") == torch.float32


def test_native_bf16_cpu_means_bf16(cpu_class):
    cpu_class("avx512_bf16")
    assert cpu_has_native_bf16()
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert auto_precision("cpu") == "bf16-mixed"
    assert "AVX512 (native bf16)" in hardware_summary("cpu")


def test_explicit_bf16_wins_with_a_warning_on_avx2(cpu_class, capsys):
    cpu_class("avx2")
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    err = capsys.readouterr().err
    assert "without native bf16 (AVX2)" in err and "GFLOPS" in err and len(err.strip().splitlines()) == 1
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert capsys.readouterr().err == ""


def test_no_warning_where_bf16_is_native(cpu_class, capsys):
    cpu_class("avx512_bf16")
    resolve_dtype("bf16", "cpu")
    assert capsys.readouterr().err == ""


def test_bad_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'int3'.*auto, fp32, bf16"):
        resolve_dtype("int3", "cpu")


def test_names():
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name(torch.float32) == "fp32"


def test_from_pretrained_auto_follows_the_cpu_class(cpu_class, tmp_path):
    RecycleGPT(RecycleConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2)).save_pretrained(str(tmp_path))
    cpu_class("avx2")
    assert RecycleGPT.from_pretrained(str(tmp_path), dtype="auto", device="cpu").lm_head.weight.dtype == torch.float32
    cpu_class("avx512_bf16")
    assert RecycleGPT.from_pretrained(str(tmp_path), dtype="auto", device="cpu").lm_head.weight.dtype == torch.bfloat16
    assert RecycleGPT.from_pretrained(str(tmp_path)).lm_head.weight.dtype == torch.float32  # None keeps fp32
