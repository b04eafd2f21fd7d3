"""Reduced draft vocabulary, module initialisation from the base, and unrolled (multi-depth) training."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.losses import shift_hidden, unrolled_losses, unrolled_module_states
from recyclegpt.core.sampling import SamplingParams, token_probs

from .conftest import tiny_config


def _model(draft: int | None = None, seed: int = 0) -> RecycleGPT:
    torch.manual_seed(seed)
    model = RecycleGPT(tiny_config(module_layers=2)).eval()
    if draft is not None:
        model.set_draft_vocab(torch.randperm(97)[:draft])
    return model


def test_draft_tables_follow_eagle3_convention() -> None:
    model = _model()
    model.set_draft_vocab(torch.tensor([5, 3, 90, 3]))
    assert model.config.draft_vocab_size == 3
    assert model.draft_ids.tolist() == [3, 5, 90]
    assert (model.recycle.d2t + torch.arange(3)).tolist() == [3, 5, 90]
    assert model.recycle.t2d.nonzero().flatten().tolist() == [3, 5, 90]


@pytest.mark.parametrize("draft", [None, 20])
def test_greedy_draft_is_the_argmax_and_top_probability_of_the_draft_logits(draft) -> None:
    model = _model(draft=draft)
    states = torch.randn(5, 32)
    states[4] = 0.0  # every logit equal: the tie goes to the lowest token id, as argmax gives it
    token, top = model.greedy_draft(states)
    logits = model.draft_logits(states)
    assert torch.equal(token, logits.argmax(-1))
    torch.testing.assert_close(top, logits.float().softmax(-1).amax(-1))
    if draft is not None:
        assert int(token[4]) == int(model.draft_ids[0])


def test_draft_logits_are_minus_inf_outside_the_draft_vocab() -> None:
    model = _model(draft=20)
    state = torch.randn(2, 32)
    logits = model.draft_logits(state)
    inside = model.recycle.t2d
    assert torch.isinf(logits[:, ~inside]).all()
    assert torch.allclose(logits[:, inside], model.lm_head(state)[:, inside])


def test_greedy_speculative_with_draft_vocab_equals_standard(prompts: list[torch.Tensor]) -> None:
    model = _model(draft=16)
    for prompt in prompts:
        standard = model.generate(prompt, 24, decoding="standard").sequences
        for draft_length in (1, 3, 5):
            out = model.generate(prompt, 24, decoding="speculative", draft_length=draft_length)
            assert torch.equal(out.sequences, standard)


def test_alternating_with_draft_vocab_emits_only_draft_tokens_from_the_module() -> None:
    model = _model(draft=10)
    prompt = torch.tensor([[1, 2, 3, 4]])
    new = model.generate(prompt, 20, decoding="alternating").new_tokens[0]
    module_tokens = new[1::2]  # the full model emits tokens 0, 2, 4 ...; the module 1, 3, 5 ...
    assert model.recycle.t2d[module_tokens].all()


def test_sampled_drafts_never_leave_the_draft_vocab() -> None:
    model = _model(draft=12)
    prompt = torch.tensor([[7, 8, 9]])
    out = model.generate(prompt, 30, decoding="alternating", temperature=1.0, seed=3)
    assert model.recycle.t2d[out.new_tokens[0, 1::2]].all()
    spec = model.generate(prompt, 30, decoding="speculative", temperature=1.0, seed=3, draft_length=3)
    assert spec.new_tokens.shape == (1, 30)


@pytest.mark.slow
def test_speculative_sampling_with_a_draft_vocab_follows_the_full_model() -> None:
    """q is zero outside the draft vocabulary, yet the output keeps the full model's joint distribution."""
    vocab = 5
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config(vocab_size=vocab, hidden_size=16, num_heads=2, num_kv_heads=1)).eval()
    model.set_draft_vocab(torch.tensor([1, 3]))
    prompt = torch.tensor([[1, 3, 0]])
    params = SamplingParams(temperature=1.0)
    exact = torch.zeros(vocab, vocab)
    with torch.no_grad():
        p1 = token_probs(model(prompt)[0, -1], params)
        for a in range(vocab):
            exact[a] = p1[a] * token_probs(model(torch.cat((prompt, torch.tensor([[a]])), 1))[0, -1], params)
    assert float(exact[[0, 2, 4]].sum()) > 0.3  # tokens the module can never draft carry real mass
    counts = torch.zeros(vocab, vocab)
    draws = 2500
    for seed in range(draws):
        out = model.generate(prompt, 3, decoding="speculative", draft_length=2, temperature=1.0, seed=seed)
        a, b = out.new_tokens[0, :2].tolist()
        counts[a, b] += 1
    assert 0.5 * float((counts.flatten() / draws - exact.flatten()).abs().sum()) < 0.07


def test_draft_vocab_survives_save_and_load(tmp_path) -> None:
    model = _model(draft=16)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = RecycleGPT.from_pretrained(str(tmp_path / "m"))
    assert loaded.config.draft_vocab_size == 16
    assert torch.equal(loaded.draft_ids, model.draft_ids)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    for mode in ("alternating", "speculative"):
        assert torch.equal(
            loaded.generate(prompt, 12, decoding=mode).sequences, model.generate(prompt, 12, decoding=mode).sequences
        )


def test_module_initialised_from_base_copies_the_last_layer_and_passes_h_through() -> None:
    model = _model()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("recycle.")}
    model.init_module_from_base()
    last = model.model.layers[-1].state_dict()
    for layer in model.recycle.layers:
        for name, value in layer.state_dict().items():
            assert torch.equal(value, last[name])
    h, emb = torch.randn(3, 32), torch.randn(3, 32)
    assert torch.equal(model.recycle.fc(torch.cat((h, emb), -1)), h)
    for name, value in model.state_dict().items():
        if not name.startswith("recycle."):
            assert torch.equal(value, base_before[name]), name


@torch.no_grad()
def test_unrolled_states_equal_the_decoders_chained_drafts() -> None:
    """The state at depth k and slot t equals the k-th chained module step of the decoder."""
    model = _model()
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(5))
    hidden = model.base_hidden(ids)
    depth = 4
    states = unrolled_module_states(model, shift_hidden(hidden), ids, depth)
    prev = shift_hidden(hidden)
    for start in range(ids.shape[1] - depth + 1):
        cache = model.new_cache("module", 2, ids.shape[1])
        state = model.module_hidden(prev[:, : start + 1], ids[:, : start + 1], cache=cache)[:, -1:]
        torch.testing.assert_close(state[:, 0], states[0][:, start], atol=1e-5, rtol=1e-5)
        for k in range(1, depth):
            slot = start + k
            state = model.module_hidden(state, ids[:, slot : slot + 1], cache=cache)
            torch.testing.assert_close(state[:, 0], states[k][:, slot], atol=1e-5, rtol=1e-5)


def test_unrolled_losses_train_only_the_module_and_report_every_depth() -> None:
    model = _model(draft=30)
    model.freeze_base()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model.base_hidden(ids)
    for distill in (True, False):
        out = unrolled_losses(model, ids, hidden, depth=3, distill=distill)
        assert len(out.depth_losses) == 3 and len(out.depth_agreement) == 3
        assert all(torch.isfinite(loss) for loss in out.depth_losses)
        model.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in model.base_parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.recycle.parameters())


def test_distillation_loss_is_lowest_when_the_module_reproduces_the_base() -> None:
    """A module whose output state is the base's own h[t] scores the soft CE's minimum (the teacher's entropy)."""
    model = _model(draft=40)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.base_hidden(ids)
        out = unrolled_losses(model, ids, hidden, depth=1, distill=True)
        teacher = torch.nn.functional.linear(hidden[:, :-1], model.draft_head_weight()).float()
        entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean()
    assert float(out.depth_losses[0]) > float(entropy)


def test_feature_noise_perturbs_what_the_module_reads_not_the_teacher() -> None:
    """EAGLE's augmentation: noise of a fraction of each state's RMS on the module's input states
    changes the loss a little, follows torch's seed, and is off at 0."""
    model = _model(draft=32)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.base_hidden(ids)
    clean = unrolled_losses(model, ids, hidden, depth=2, distill=True)
    assert torch.equal(unrolled_losses(model, ids, hidden, depth=2, feature_noise=0.0).loss, clean.loss)
    torch.manual_seed(1)
    noisy = unrolled_losses(model, ids, hidden, depth=2, distill=True, feature_noise=0.3)
    assert not torch.equal(noisy.loss, clean.loss) and abs(noisy.loss.item() - clean.loss.item()) < 0.5
    torch.manual_seed(1)
    assert torch.equal(unrolled_losses(model, ids, hidden, depth=2, distill=True, feature_noise=0.3).loss, noisy.loss)
