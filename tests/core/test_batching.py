"""Continuous batching in core: rows that join and leave between steps decode exactly as alone."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleConfig, RecycleGPT
from recyclegpt.core.batching import BatchedDecoder


@pytest.fixture(scope="module")
def model() -> RecycleGPT:
    torch.manual_seed(0)
    config = RecycleConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    return RecycleGPT(config).eval()


def solo(model: RecycleGPT, prompt: list[int], max_new: int, decoding: str, **kwargs) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new, decoding=decoding, **kwargs)
    return out.new_tokens[0].tolist()


def run_staggered(decoder: BatchedDecoder, requests: list[tuple[list[int], int]], join_every: int, **kwargs):
    """Add request i at step i * join_every (when there is room); run until all have finished."""
    results = {i: [] for i in range(len(requests))}
    waiting = list(range(len(requests)))
    steps = 0
    while waiting or len(decoder):
        while waiting and decoder.has_capacity() and steps >= waiting[0] * join_every:
            i = waiting.pop(0)
            prompt, max_new = requests[i]
            out = decoder.add(i, prompt, max_new, **kwargs)
            results[i] += out.new_tokens
        for out in decoder.step():
            results[out.key] += out.new_tokens
        steps += 1
    return results


@pytest.mark.parametrize("decoding", ["standard", "alternating"])
def test_staggered_rows_equal_their_solo_generate(model, decoding):
    gen = torch.Generator().manual_seed(1)
    requests = [
        (torch.randint(0, 97, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen).tolist(), 3 + 5 * i)
        for i in range(7)
    ]
    # capacity below the longest timeline: the shared columns must be shifted left along the way
    decoder = BatchedDecoder(model, decoding, max_batch_size=3, capacity=48)
    results = run_staggered(decoder, requests, join_every=2)
    for i, (prompt, max_new) in enumerate(requests):
        assert results[i] == solo(model, prompt, max_new, decoding), i
    assert len(decoder) == 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_alternating_rows_draft_from_the_modules_draft_vocabulary(temperature):
    torch.manual_seed(2)
    config = RecycleConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    drafted = RecycleGPT(config).eval()
    drafted.set_draft_vocab(torch.arange(0, 97, 3))  # every third token
    requests = [([5, 17, 3, 40], 12), ([60, 2], 9), ([11, 12, 13, 14, 15, 16], 14)]
    decoder = BatchedDecoder(drafted, "alternating", max_batch_size=2)
    results = run_staggered(decoder, requests, join_every=1, temperature=temperature, seed=7)
    for i, (prompt, max_new) in enumerate(requests):
        expected = solo(drafted, prompt, max_new, "alternating", temperature=temperature, seed=7)
        assert results[i] == expected, i
        module_tokens = expected[1::2]  # full call, module call, ...
        assert all(token % 3 == 0 for token in module_tokens)


def test_eos_ends_a_row_and_its_slot_is_reused(model):
    prompt = [5, 6, 7]
    reference = solo(model, prompt, 12, "standard")
    eos = reference[4]
    decoder = BatchedDecoder(model, "standard", max_batch_size=1)
    results = run_staggered(decoder, [(prompt, 12), ([9, 9], 6)], join_every=0, eos_token_id=eos)
    assert results[0] == reference[: reference.index(eos) + 1]
    assert results[1] == solo(model, [9, 9], 6, "standard", eos_token_id=eos)[: len(results[1])]


def test_seeded_sampling_follows_the_solo_draws(model):
    decoder = BatchedDecoder(model, "standard", max_batch_size=4)
    requests = [([1, 2, 3], 10), ([4, 5], 10), ([6], 10)]
    results = run_staggered(decoder, requests, join_every=1, temperature=1.0, top_p=0.9, seed=11)
    for i, (prompt, max_new) in enumerate(requests):
        assert results[i] == solo(model, prompt, max_new, "standard", temperature=1.0, top_p=0.9, seed=11)


def test_remove_and_capacity(model):
    decoder = BatchedDecoder(model, "alternating", max_batch_size=2)
    decoder.add("a", [1, 2, 3], 20)
    decoder.add("b", [4], 20)
    assert not decoder.has_capacity()
    with pytest.raises(RuntimeError, match="full"):
        decoder.add("c", [5], 3)
    decoder.remove("a")
    out = decoder.step()
    assert [o.key for o in out] == ["b"] and len(out[0].new_tokens) == 2
    with pytest.raises(ValueError, match="context"):
        decoder.add("d", [1] * 60, 10)
    assert BatchedDecoder.kv_bytes(model, "alternating", 2) > BatchedDecoder.kv_bytes(model, "standard", 2)
