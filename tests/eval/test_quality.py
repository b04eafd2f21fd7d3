import math

import pytest
import torch

from recyclegpt.core import RecycleGPT, recycle_losses
from recyclegpt.core.losses import shift_hidden
from recyclegpt.eval import quality


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return RecycleGPT.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def blocks(model):
    torch.manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (3, 24))


def test_perplexities_match_the_training_losses(model, blocks):
    result = quality.teacher_forced_quality(model, blocks, batch_size=2)
    with torch.no_grad():
        losses = recycle_losses(model, blocks)
    assert result["base_perplexity"] == pytest.approx(math.exp(losses.lm_loss.item()), rel=1e-4)
    assert result["module_perplexity"] == pytest.approx(math.exp(losses.rec_loss.item()), rel=1e-4)
    base_greedy = losses.base_logits.argmax(-1)
    module_greedy = losses.module_logits.argmax(-1)
    assert result["agreement"] == pytest.approx((module_greedy == base_greedy).float().mean().item())
    assert result["module_accuracy"] == pytest.approx((module_greedy == losses.targets).float().mean().item())
    # Depth 1 comes from the cached, token-by-token chain; it must equal the parallel pass.
    assert result["agreement_by_depth"]["1"] == pytest.approx(result["agreement"], abs=1e-6)
    assert set(result["agreement_by_depth"]) == {"1", "2", "3", "4"}


def test_alternating_logits_take_every_second_target_from_the_module():
    base, module = torch.zeros(1, 5, 3), torch.ones(1, 5, 3)
    mixed = quality.alternating_logits(base, module)
    assert mixed[0, :, 0].tolist() == [0, 1, 0, 1, 0]


def test_chained_drafts_equal_uncached_chains(model, blocks):
    """Depth k at position t = the module over slots 0..t without a cache, whose input state at
    slots t-k+2..t is its own previous output (true h before that)."""
    ids = blocks[:1]
    with torch.inference_mode():
        hidden = model.base_hidden(ids)
        chained = {(d, t): tok.item() for d, tok, t in quality.chained_drafts(model, ids, hidden, max_depth=3)}
        start = 6
        prev = shift_hidden(hidden)[:, : start + 1]
        for depth in (1, 2, 3):
            t = start + depth - 1
            out = model.module_hidden(prev, ids[:, : t + 1])
            assert chained[(depth, t)] == model.lm_head(out[0, -1]).argmax().item()
            prev = torch.cat((prev, out[:, -1:]), dim=1)


def test_generation_agreement_counts_identical_tokens(model, blocks):
    prompts = [blocks[i : i + 1, :8] for i in range(3)]
    # The first new token always comes from the full model, in both decoders.
    assert quality.generation_agreement(model, prompts, 1)["identical_fraction"] == 1.0
    result = quality.generation_agreement(model, prompts, 6)
    assert 0.0 <= result["identical_fraction"] <= 1.0
    assert 1.0 <= result["mean_identical_prefix"] <= 6.0
    assert result["prompts"] == 3
