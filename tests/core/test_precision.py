"""core.precision decides bf16 or fp32 from the hardware; an explicit choice wins."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleConfig, RecycleGPT, precision, quant_kernels
from recyclegpt.core.precision import (
    auto_dtype,
    auto_precision,
    cpu_decode_kernels_run,
    cpu_has_native_bf16,
    decode_dtype,
    dtype_name,
    hardware_summary,
    resolve_decode_dtype,
    resolve_dtype,
)


@pytest.fixture
def decode_kernels(monkeypatch):
    """``decode_kernels(False)``: this project's CPU decode kernels do not run here."""
    return lambda run: monkeypatch.setattr(precision, "cpu_decode_kernels_run", lambda *_: run)


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


def test_decoding_on_a_cpu_with_the_kernels_means_fp32(cpu_class, decode_kernels):
    cpu_class("avx512_bf16")
    decode_kernels(True)
    for quantize in (None, "none", "w8a8", "w4a8"):  # the kernels' fp32-activation formats
        assert decode_dtype("cpu", quantize) == torch.float32
        assert resolve_decode_dtype("auto", "cpu", quantize) == torch.float32
    for quantize in ("int8", "int4", "fp16"):
        assert decode_dtype("cpu", quantize) == torch.bfloat16
    assert resolve_decode_dtype("bf16", "cpu") == torch.bfloat16  # an explicit choice wins
    assert auto_dtype("cpu") == torch.bfloat16 and auto_precision("cpu") == "bf16-mixed"  # training keeps bf16
    decode_kernels(False)
    assert decode_dtype("cpu") == torch.bfloat16
    cpu_class("avx2")
    assert decode_dtype("cpu", "int8") == torch.float32


def test_the_kernel_switches_turn_the_fp32_choice_off(monkeypatch):
    monkeypatch.setenv("RECYCLEGPT_STEP_KERNELS", "0")
    assert not cpu_decode_kernels_run() and not cpu_decode_kernels_run("w8a8")
    monkeypatch.delenv("RECYCLEGPT_STEP_KERNELS")
    monkeypatch.setenv("RECYCLEGPT_QUANT_KERNELS", "0")  # w8a8 then runs torch's int8 kernel, in bf16
    quant_kernels.dynamic_isa.cache_clear()  # read once per process
    try:
        assert not cpu_decode_kernels_run("w8a8")
    finally:
        monkeypatch.delenv("RECYCLEGPT_QUANT_KERNELS")
        quant_kernels.dynamic_isa.cache_clear()


def test_from_pretrained_auto_follows_the_cpu_class(cpu_class, decode_kernels, tmp_path):
    RecycleGPT(RecycleConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2)).save_pretrained(str(tmp_path))

    def loaded(**kwargs) -> torch.dtype:
        return RecycleGPT.from_pretrained(str(tmp_path), device="cpu", **kwargs).model.norm.weight.dtype

    cpu_class("avx2")
    assert loaded(dtype="auto") == torch.float32
    cpu_class("avx512_bf16")
    decode_kernels(False)
    assert loaded(dtype="auto") == torch.bfloat16
    decode_kernels(True)
    assert loaded(dtype="auto") == torch.float32
    assert loaded(dtype="auto", quantize="w8a8") == torch.float32
    assert loaded(dtype="auto", quantize="int8") == torch.bfloat16
    RecycleGPT.from_pretrained(str(tmp_path), quantize="int8").save_pretrained(str(tmp_path / "int8"))
    saved_int8 = RecycleGPT.from_pretrained(str(tmp_path / "int8"), dtype="auto", device="cpu")
    assert saved_int8.model.norm.weight.dtype == torch.bfloat16  # its saved setup names its weights
    assert loaded() == torch.float32  # None keeps fp32
