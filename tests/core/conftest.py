"""Tiny random models for the core tests."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleConfig, RecycleGPT


def tiny_config(**overrides) -> RecycleConfig:
    values = dict(
        vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=96, rope_theta=5000.0
    )
    values.update(overrides)
    return RecycleConfig(**values)


@pytest.fixture
def tiny_model() -> RecycleGPT:
    torch.manual_seed(0)
    return RecycleGPT(tiny_config()).eval()


@pytest.fixture
def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (1, length), generator=generator) for length in (1, 3, 8, 17)]
