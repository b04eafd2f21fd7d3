"""A module that reads base feature layers beside the final state (EAGLE-3's fused features)."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.batching import BatchedDecoder
from recyclegpt.core.losses import shift_hidden, unrolled_losses, unrolled_module_states
from recyclegpt.core.speculation import pin_step_costs

from .conftest import PATTERN, pattern_trained, tiny_config
from .test_draft_tree import CHEAP_ROWS


@pytest.fixture(scope="module")
def fused_model() -> RecycleGPT:
    """A 3-layer model whose module reads layer 0's output too; base and module learned a pattern."""
    return pattern_trained(tiny_config(num_layers=3, feature_layers=[0]))


def test_feature_layers_are_checked_and_sorted() -> None:
    config = tiny_config(num_layers=4, feature_layers=[2, 0])
    assert config.feature_layers == [0, 2] and config.feature_width == 3 * config.hidden_size
    assert tiny_config().feature_width == tiny_config().hidden_size
    for bad in ([3], [-1], [1, 1]):  # the last layer's output is the final state itself
        with pytest.raises(ValueError, match="feature_layers"):
            tiny_config(num_layers=4, feature_layers=bad)


def test_base_states_are_the_final_state_then_each_feature_layers_normalised_output() -> None:
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config(num_layers=3, feature_layers=[0, 1])).eval()
    plain = RecycleGPT(tiny_config(num_layers=3)).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected == ["recycle.fuse.weight"]
    outputs = {}
    for index in (0, 1):
        model.model.layers[index].register_forward_hook(lambda m, a, out, i=index: outputs.__setitem__(i, out))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        states = model.base_hidden(ids)
        d = model.config.hidden_size
        assert states.shape == (2, 9, 3 * d)
        torch.testing.assert_close(model.final_state(states), plain.base_hidden(ids))
        torch.testing.assert_close(model(ids), plain(ids))  # the base itself is unchanged
        assert torch.equal(model.base_hidden(ids, features=False), model.final_state(states))  # h alone
        for slot, index in enumerate((0, 1), start=1):
            x = outputs[index]
            expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
            torch.testing.assert_close(states[..., slot * d : (slot + 1) * d], expected)


def test_training_reads_the_features_as_decoding_does(fused_model) -> None:
    ids = torch.tensor([PATTERN * 2])
    with torch.no_grad():
        hidden = fused_model.base_hidden(ids)
        prev = shift_hidden(hidden)[:, :-1]
        unrolled = unrolled_module_states(fused_model, prev, ids[:, :-1], depth=1)[0]
        torch.testing.assert_close(unrolled, fused_model.module_hidden(prev, ids[:, :-1]))
        losses = unrolled_losses(fused_model, ids, hidden, depth=1)
    assert float(losses.depth_agreement[0]) > 0.7  # the module learned from the features it reads


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(draft_policy="fixed", draft_length=3),
        dict(draft_policy="adaptive", draft_length=5),
        dict(draft_policy="tree", draft_length=4),
    ],
)
def test_speculative_with_feature_layers_equals_standard_and_accepts(fused_model, kwargs) -> None:
    pin_step_costs(fused_model, CHEAP_ROWS)  # a tree verifies more rows: cheap ones, whatever the machine
    full_calls = standard_calls = 0
    for prompt in (torch.tensor([PATTERN[:n]]) for n in (1, 3, 6)):
        standard = fused_model.generate(prompt, 30)
        speculative = fused_model.generate(prompt, 30, decoding="speculative", **kwargs)
        assert torch.equal(speculative.sequences, standard.sequences)
        full_calls += speculative.full_model_calls
        standard_calls += standard.full_model_calls
    assert full_calls < 0.5 * standard_calls  # the module drafts well from the features it learned from


def test_alternating_and_batched_rows_with_feature_layers(fused_model) -> None:
    prompt = PATTERN[:4]
    alone = fused_model.generate(torch.tensor([prompt]), 12, decoding="alternating")
    assert alone.full_model_calls == 6 and alone.new_tokens[0].tolist() == (PATTERN * 3)[4:16]
    decoder = BatchedDecoder(fused_model, "alternating", max_batch_size=2, capacity=32)
    tokens = decoder.add("a", prompt, 12).new_tokens
    while len(decoder):
        for out in decoder.step():
            tokens += out.new_tokens
    assert tokens == alone.new_tokens[0].tolist()


def test_feature_layers_survive_save_and_reload(fused_model, tmp_path) -> None:
    fused_model.save_pretrained(str(tmp_path / "m"))
    again = RecycleGPT.from_pretrained(str(tmp_path / "m"))
    assert again.config.feature_layers == [0]
    assert torch.equal(again.recycle.fuse.weight, fused_model.recycle.fuse.weight)
    prompt = torch.tensor([PATTERN[:3]])
    assert torch.equal(
        again.generate(prompt, 10, decoding="alternating").sequences,
        fused_model.generate(prompt, 10, decoding="alternating").sequences,
    )
    other = RecycleGPT.from_pretrained(str(tmp_path / "m"), feature_layers=[1])  # its base, a fresh module
    assert other.config.feature_layers == [1]
    for key, value in fused_model.state_dict().items():
        if not key.startswith("recycle."):
            assert torch.equal(other.state_dict()[key], value), key
    assert not torch.equal(other.recycle.fc.weight, fused_model.recycle.fc.weight)


def test_init_from_base_passes_the_final_state_through_fuse() -> None:
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config(num_layers=3, feature_layers=[0]))
    model.init_module_from_base()
    states = torch.randn(1, 4, model.config.feature_width)
    with torch.no_grad():
        torch.testing.assert_close(model.recycle.fuse(states), model.final_state(states))
