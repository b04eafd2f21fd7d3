"""Tiny random models for the core tests."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleConfig, RecycleGPT, recycle_losses
from recyclegpt.core.speculation import StepCosts, pin_step_costs

PATTERN = [5, 17, 42, 8, 99 % 97, 63, 21, 70, 33]


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


def pattern_trained(config: RecycleConfig) -> RecycleGPT:
    """A tiny model whose base and module both learned the repeating PATTERN (high acceptance)."""
    torch.manual_seed(0)
    model = RecycleGPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sequence = torch.tensor(PATTERN * 8)
    batch = torch.stack([sequence.roll(-shift)[:48] for shift in range(len(PATTERN))])
    for _ in range(80):
        loss = recycle_losses(model, batch, feature_weight=1.0).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # On some CI machines a tiny module step costs most of a tiny full step, and drafting rightly does
    # not pay; pin costs where it does (a k-token step 1 + 0.05 (k - 1), a module step 0.2) so the
    # tests check the planner's logic, not the speed of the machine.
    pin_step_costs(model, StepCosts([0.0, *(1 + 0.05 * k for k in range(8))], 0.2))
    return model.eval()
