"""Draft trees: tree attention, cache compaction, node choice and the lossless tree decoder."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.draft_tree import MAX_TREE_NODES, DraftTree
from recyclegpt.core.fastpath import prepare_for_decoding
from recyclegpt.core.model import KVCache, attention_mask_for, tree_attention_mask
from recyclegpt.core.speculation import StepCosts, forget_acceptance, pin_step_costs

from .conftest import tiny_config
from .test_decoding import pattern_prompts, trained_model  # noqa: F401 - the fixture

CHEAP_ROWS = StepCosts([0.0, *(1 + 0.05 * k for k in range(MAX_TREE_NODES + 1))], 0.2)


def hand_tree() -> DraftTree:
    """root -> a(0.6) -> c(0.5); root -> b(0.3) -> d(0.9)."""
    tree = DraftTree()
    a = tree.add(10, -1, 0.6, 0.6)
    b = tree.add(11, -1, 0.3, 0.3)
    tree.add(12, a, 0.5, 0.5)
    tree.add(13, b, 0.9, 0.9)
    return tree


def test_a_chain_tree_mask_is_the_causal_mask() -> None:
    chain = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(
        tree_attention_mask(5, chain, torch.float32),
        attention_mask_for(KVCache(1, 1, 1, 9, 2, torch.float32, "cpu"), 5, 4, torch.device("cpu")),
    )


def test_tree_mask_hides_what_a_node_does_not_descend_from() -> None:
    visible = hand_tree().visibility([0, 1, 2, 3])  # rows: root, a, b, c, d
    mask = tree_attention_mask(3, visible, torch.float32)[0, 0]
    assert mask.shape == (5, 8)
    assert bool((mask[:, :3] == 0).all())  # the cache before the tree: seen by every node
    assert (mask[3, 3:] == 0).tolist() == [True, True, False, True, False]  # c sees root, a and itself
    assert (mask[4, 3:] == 0).tolist() == [True, False, True, False, True]  # d sees root, b and itself
    with pytest.raises(ValueError, match="tree visibility"):
        tree_attention_mask(0, torch.ones(3, 2, dtype=torch.bool), torch.float32)


def test_each_tree_node_gets_the_state_of_its_own_path(trained_model) -> None:  # noqa: F811
    model = trained_model
    prompt = torch.tensor([[5, 17, 42, 8]])
    tree = hand_tree()
    cache = model.new_cache("base", 1, 16)
    model.base_hidden(prompt[:, :-1], cache=cache)
    chosen = [0, 1, 2, 3]
    ids = torch.tensor([[8, *(tree.tokens[n] for n in chosen)]])
    positions = torch.tensor([[3, *(3 + tree.depths[n] for n in chosen)]])
    states = model.base_hidden(ids, positions, cache, tree=tree.visibility(chosen))
    for row, path in ((3, [10, 12]), (4, [11, 13])):
        alone = model.base_hidden(torch.cat((prompt, torch.tensor([path])), dim=1))[:, -1]
        torch.testing.assert_close(states[:, row], alone, rtol=1e-5, atol=1e-5)


def test_keep_moves_the_accepted_path_into_place() -> None:
    cache = KVCache(2, 1, 1, 10, 1, torch.float32, "cpu")
    cache.keys[..., 0] = torch.arange(10.0)
    cache.values[..., 0] = -torch.arange(10.0)
    cache.length = 8
    cache.keep(4, torch.tensor([5, 7]))
    assert cache.length == 6
    assert cache.keys[0, 0, 0, :6, 0].tolist() == [0, 1, 2, 3, 5, 7]
    assert cache.values[1, 0, 0, :6, 0].tolist() == [0, -1, -2, -3, -5, -7]
    with pytest.raises(ValueError, match="slots must lie"):
        cache.keep(4, torch.tensor([2]))


def test_acceptance_walks_the_tree_along_the_base_tokens() -> None:
    tree = hand_tree()
    chosen = [0, 1, 2, 3]  # rows 1..4
    assert tree.accept(chosen, [11, 0, 13, 0, 7]) == [2, 4]  # root -> b (row 2) -> d (row 4)
    assert tree.accept(chosen, [10, 99, 0, 0, 0]) == [1]  # a accepted, no child of a is 99
    assert tree.accept(chosen, [55, 0, 0, 0, 0]) == []


def test_nodes_are_chosen_by_value_and_closed_under_parents() -> None:
    tree = hand_tree()  # values: a 0.6, b 0.3, c 0.3, d 0.27
    assert tree.ranked(range(4)) == [0, 1, 2, 3]  # b and c tie on value: b's path is likelier
    free_rows = StepCosts([0.0] + [1.0] * 6, 0.1)
    assert tree.choose(free_rows, 0.2, limit=5) == [0, 1, 2, 3]
    assert tree.choose(free_rows, 0.2, limit=2) == [0, 1]
    dear_rows = StepCosts([0.0, 1.0, 1.5, 2.0, 2.5, 3.0], 0.1)  # a row costs half a step: only a pays
    assert tree.choose(dear_rows, 0.2, limit=4) == [0]


@pytest.mark.parametrize("draft_length", [1, 3, 5])
def test_tree_speculative_equals_standard_low_acceptance(tiny_model, prompts, draft_length) -> None:
    pin_step_costs(tiny_model, CHEAP_ROWS)  # rows this cheap make trees worth drafting on any machine
    for prompt in prompts:
        standard = tiny_model.generate(prompt, 25)
        forget_acceptance(tiny_model)
        tree = tiny_model.generate(prompt, 25, decoding="speculative", draft_length=draft_length, draft_policy="tree")
        assert torch.equal(tree.sequences, standard.sequences)


@pytest.mark.parametrize("draft_length", [1, 3, 5])
def test_tree_speculative_equals_standard_high_acceptance(trained_model, draft_length) -> None:  # noqa: F811
    pin_step_costs(trained_model, CHEAP_ROWS)
    calls = standard_calls = 0
    for prompt in pattern_prompts():
        standard = trained_model.generate(prompt, 30)
        tree = trained_model.generate(
            prompt, 30, decoding="speculative", draft_length=draft_length, draft_policy="tree"
        )
        assert torch.equal(tree.sequences, standard.sequences)
        assert tree.accepted_tokens <= tree.drafted_tokens
        calls += tree.full_model_calls
        standard_calls += standard.full_model_calls
    assert calls < standard_calls / 1.5


def test_tree_speculative_on_the_fast_path_at_the_context_edge(trained_model) -> None:  # noqa: F811
    """Fused layers, step kernels where they build and int8 weights; prompts end near max_seq_len, so the
    tree must fit the caches' last slots."""
    model = RecycleGPT(trained_model.config)
    model.load_state_dict(trained_model.state_dict())
    prepare_for_decoding(model, quantize="w8a8")
    pin_step_costs(model, CHEAP_ROWS)
    context = model.config.max_seq_len
    for prompt in pattern_prompts():
        new = context - prompt.shape[1]
        standard = model.generate(prompt, new)
        tree = model.generate(prompt, new, decoding="speculative", draft_length=5, draft_policy="tree")
        assert torch.equal(tree.sequences, standard.sequences)
        assert tree.sequences.shape[1] == context


def test_tree_policy_samples_as_the_chain_does(trained_model) -> None:  # noqa: F811
    prompt = pattern_prompts()[1]
    chain = trained_model.generate(prompt, 20, decoding="speculative", temperature=0.8, seed=3)
    tree = trained_model.generate(prompt, 20, decoding="speculative", temperature=0.8, seed=3, draft_policy="tree")
    assert torch.equal(tree.sequences, chain.sequences)


def test_eos_inside_an_accepted_tree_path_stops_there(trained_model) -> None:  # noqa: F811
    pin_step_costs(trained_model, CHEAP_ROWS)
    prompt = pattern_prompts()[2]
    standard = trained_model.generate(prompt, 30, eos_token_id=42)
    tree = trained_model.generate(prompt, 30, decoding="speculative", draft_policy="tree", eos_token_id=42)
    assert torch.equal(tree.sequences, standard.sequences)


def test_tree_config_of_the_demo_shape_drafts_with_a_draft_vocabulary(trained_model) -> None:  # noqa: F811
    """Draft-vocabulary ids map back to full-vocabulary tokens in the tree."""
    model = RecycleGPT(tiny_config())
    model.load_state_dict(trained_model.state_dict())
    model.set_draft_vocab(torch.tensor(sorted({5, 17, 42, 8, 2, 63, 21, 70, 33, 1, 3})))
    model.eval()
    pin_step_costs(model, CHEAP_ROWS)
    for prompt in pattern_prompts():
        standard = model.generate(prompt, 30)
        tree = model.generate(prompt, 30, decoding="speculative", draft_policy="tree")
        assert torch.equal(tree.sequences, standard.sequences)
        assert tree.accepted_tokens > 0
