"""The fast path (int8 or fp16 head, fused layers) and a reduced draft vocabulary work together, losslessly."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.fastpath import prepare_for_decoding

from .conftest import tiny_config


@pytest.mark.parametrize("weights", ["int8", "fp16"])
def test_quantized_head_scores_draft_rows_as_the_full_head_does(weights: str) -> None:
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config()).eval()
    model.set_draft_vocab(torch.randperm(97)[:20])
    prepare_for_decoding(model, quantize=weights)
    state = torch.randn(3, model.config.hidden_size)
    inside = model.recycle.t2d
    assert torch.equal(model.draft_logits(state)[:, inside], model.lm_head(state)[:, inside])
    assert torch.isinf(model.draft_logits(state)[:, ~inside]).all()


def test_int8_greedy_speculative_with_a_draft_vocab_equals_standard(prompts: list[torch.Tensor]) -> None:
    torch.manual_seed(1)
    model = RecycleGPT(tiny_config(module_layers=2)).eval()
    model.set_draft_vocab(torch.randperm(97)[:16])
    prepare_for_decoding(model, quantize="int8", fuse=True)
    for prompt in prompts:
        standard = model.generate(prompt, 20, decoding="standard").sequences
        for draft_length in (1, 4):
            out = model.generate(prompt, 20, decoding="speculative", draft_length=draft_length, draft_policy="fixed")
            assert torch.equal(out.sequences, standard)
