"""Fixtures shared by every package's tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from recyclegpt.core import RecycleConfig, precision


def tiny_config(tokenizer: Any, **overrides: Any) -> RecycleConfig:
    """The tests' tiny RecycleGPT for a tokenizer: 2 layers of width 32, 4 heads (2 KV), context 128."""
    shape: dict[str, Any] = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128)
    return RecycleConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **{**shape, **overrides})


@pytest.fixture
def cpu_class(monkeypatch):
    """``cpu_class("avx2")`` / ``cpu_class("avx512_bf16")``: make this CPU report that class to torch and core."""

    def set_class(name: str) -> None:
        capability, flags = {
            "avx2": ("AVX2", {"avx2", "fma"}),
            "avx512": ("AVX512", {"avx2", "avx512f"}),
            "avx512_bf16": ("AVX512", {"avx2", "avx512f", "avx512_bf16"}),
        }[name]
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
        precision.cpu_has_native_bf16.cache_clear()

    yield set_class
    precision.cpu_has_native_bf16.cache_clear()
