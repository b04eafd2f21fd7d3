"""Speculative sampling is lossless: its outputs follow the full model's distribution."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.decoding import _verify
from recyclegpt.core.sampling import SamplingParams, token_probs
from recyclegpt.core.speculation import StepCosts, pin_step_costs

from .conftest import tiny_config

VOCAB = 5


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_verify_rule_reproduces_the_target_distribution() -> None:
    """One draft token from q, accept/resample against p: the emitted token is distributed as p."""
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    q = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.35])
    params = SamplingParams(temperature=1.0, generator=torch.Generator().manual_seed(0))
    logits = torch.stack([p.log(), p.log()])  # position 0 verifies the draft; position 1 is the bonus
    counts = torch.zeros(VOCAB)
    draws = 20000
    for _ in range(draws):
        draft = torch.multinomial(q, 1, generator=params.generator)
        accepted, token = _verify(logits, [draft], [q.unsqueeze(0)], params)
        counts[int(draft) if accepted else int(token)] += 1
    assert total_variation(counts / draws, p) < 0.02
    assert total_variation(q, p) > 0.5  # the test has power: q alone would fail


@pytest.mark.parametrize(
    ("temperature", "top_k", "draft_policy"), [(1.5, 0, "fixed"), (1.0, 3, "fixed"), (1.0, 3, "adaptive")]
)
def test_speculative_sampling_matches_full_model_joint_distribution(
    temperature: float, top_k: int, draft_policy: str
) -> None:
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config(vocab_size=VOCAB, hidden_size=16, num_heads=2, num_kv_heads=1)).eval()
    with torch.no_grad():  # sharpen the base so p differs from the untrained module's q
        model.lm_head.weight.mul_(40)
    prompt = torch.tensor([[1, 3, 0]])
    params = SamplingParams(temperature=temperature, top_k=top_k)
    exact = torch.zeros(VOCAB, VOCAB)
    with torch.no_grad():
        p1 = token_probs(model(prompt)[0, -1], params)
        for a in range(VOCAB):
            p2 = token_probs(model(torch.cat((prompt, torch.tensor([[a]])), 1))[0, -1], params)
            exact[a] = p1[a] * p2
    counts = torch.zeros(VOCAB, VOCAB)
    draws = 2500
    rejected = 0
    for seed in range(draws):
        out = model.generate(
            prompt,
            3,
            decoding="speculative",
            draft_length=2,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            draft_policy=draft_policy,
        )
        a, b = out.new_tokens[0, :2].tolist()
        counts[a, b] += 1
        rejected += out.drafted_tokens - out.accepted_tokens
    if draft_policy == "fixed":
        assert rejected > draws * 0.2  # the rejection path really ran
    assert total_variation(counts.flatten() / draws, exact.flatten()) < 0.07


def test_standard_sampling_matches_full_model_distribution() -> None:
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config(vocab_size=VOCAB, hidden_size=16, num_heads=2, num_kv_heads=1)).eval()
    prompt = torch.tensor([[2, 2]])
    params = SamplingParams(temperature=0.7, top_p=0.8)
    with torch.no_grad():
        p = token_probs(model(prompt)[0, -1], params)
    counts = torch.zeros(VOCAB)
    for seed in range(2000):
        counts[int(model.generate(prompt, 1, temperature=0.7, top_p=0.8, seed=seed).new_tokens[0, 0])] += 1
    assert total_variation(counts / 2000, p) < 0.05


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).log_softmax(-1)  # already probabilities in log space
    probs = logits.exp()
    for top_p in (0.3, 0.6, 0.9, 1.0):
        kept = token_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))[0] > 0
        order = probs[0].argsort(descending=True)
        needed = next(k for k in range(1, 5) if probs[0, order[:k]].sum() >= top_p - 1e-6)
        assert kept.sum().item() == needed
        assert all(kept[i] for i in order[:needed])


def test_sampled_drafts_the_module_gave_little_probability_are_still_verified() -> None:
    """The confidence floor is for greedy drafts: a sampled draft with a small q can still pass (min(1, p/q))."""
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config()).eval()  # vocabulary 97: a near-uniform module gives ~0.01 < the floor
    pin_step_costs(model, StepCosts([0.0, 1.0, 1.01, 1.02, 1.03], module_ms=0.01))  # drafting pays
    out = model.generate(
        torch.randint(0, 97, (1, 8)), 24, decoding="speculative", draft_length=3, temperature=1.0, seed=1
    )
    assert out.drafted_tokens > 0
