"""The base is a faithful Llama: same logits and same greedy output as transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from recyclegpt.core import RecycleGPT
from recyclegpt.core.checkpoint import from_llama_state_dict

from .conftest import tiny_config

PARITY_CONFIGS = {
    "gqa-tied": dict(num_heads=4, num_kv_heads=2, tie_embeddings=True),
    "mha-untied": dict(num_heads=4, num_kv_heads=4, tie_embeddings=False),
    "mqa-theta-1e6": dict(num_heads=4, num_kv_heads=1, tie_embeddings=False, rope_theta=1e6),
    "head-dim-16-bias": dict(num_heads=2, num_kv_heads=1, head_dim=16, attention_bias=True),
}


def hf_twin(name: str) -> tuple[LlamaForCausalLM, RecycleGPT]:
    torch.manual_seed(0)
    config = tiny_config(**PARITY_CONFIGS[name])
    hf_model = LlamaForCausalLM(config.to_hf()).eval()
    # Random norms too, so a swapped or missing norm cannot hide.
    with torch.no_grad():
        for name_, param in hf_model.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                param.uniform_(0.5, 1.5)
    return hf_model, from_llama_state_dict(config, hf_model.state_dict()).eval()


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    hf_model, ours = hf_twin(name)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = ours(ids)
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_cached_step_logits_match_full_forward(name: str) -> None:
    _, ours = hf_twin(name)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache("base", 1, 32)
        first = ours.lm_head(ours.base_hidden(ids[:, :20], cache=cache))
        rest = [ours.lm_head(ours.base_hidden(ids[:, i : i + 1], cache=cache)) for i in range(20, 24)]
    stepped = torch.cat([first, *rest], dim=1)
    assert (stepped - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gqa-tied", "mha-untied"])
def test_standard_greedy_equals_transformers_generate(name: str) -> None:
    hf_model, ours = hf_twin(name)
    for length in (1, 5, 12):
        ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(length))
        expected = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=30,
            min_new_tokens=30,
            do_sample=False,
            pad_token_id=0,
        )
        actual = ours.generate(ids, 30).sequences
        assert torch.equal(actual, expected)
