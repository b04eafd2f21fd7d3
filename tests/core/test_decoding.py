"""The three decoders: exact equalities, call counts, batching, sampling and argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.model import KVCache, attention_mask_for
from recyclegpt.core.sampling import greedy_tokens
from recyclegpt.core.speculation import StepCosts, forget_acceptance, pin_step_costs

from .conftest import PATTERN, pattern_trained, tiny_config


@pytest.fixture(scope="module")
def trained_model() -> RecycleGPT:
    """A tiny model whose base and module both learned a repeating sequence (high acceptance)."""
    return pattern_trained(tiny_config())


def pattern_prompts() -> list[torch.Tensor]:
    return [torch.tensor([PATTERN[:n]]) for n in (1, 3, 6)] + [torch.tensor([[7, 3] + PATTERN[2:6]])]


@pytest.mark.parametrize("draft_policy", ["fixed", "adaptive"])
@pytest.mark.parametrize("draft_length", [1, 2, 3, 4, 5])
def test_speculative_greedy_equals_standard_low_acceptance(tiny_model, prompts, draft_length, draft_policy) -> None:
    for prompt in prompts:
        standard = tiny_model.generate(prompt, 25)
        forget_acceptance(tiny_model)  # every prompt drafts from the prior, not from the last one's rejections
        speculative = tiny_model.generate(
            prompt, 25, decoding="speculative", draft_length=draft_length, draft_policy=draft_policy
        )
        assert torch.equal(speculative.sequences, standard.sequences)


@pytest.mark.parametrize("draft_length", [1, 3, 5])
def test_adaptive_speculative_greedy_equals_standard_high_acceptance(trained_model, draft_length) -> None:
    for prompt in pattern_prompts():
        standard = trained_model.generate(prompt, 30)
        speculative = trained_model.generate(prompt, 30, decoding="speculative", draft_length=draft_length)
        assert torch.equal(speculative.sequences, standard.sequences)
        assert speculative.accepted_tokens <= speculative.drafted_tokens <= draft_length * 30


@pytest.mark.parametrize("draft_length", [1, 2, 3, 4, 5])
def test_speculative_greedy_equals_standard_high_acceptance(trained_model, draft_length) -> None:
    accepted = drafted = 0
    for prompt in pattern_prompts():
        standard = trained_model.generate(prompt, 30)
        speculative = trained_model.generate(
            prompt, 30, decoding="speculative", draft_length=draft_length, draft_policy="fixed"
        )
        assert torch.equal(speculative.sequences, standard.sequences)
        accepted += speculative.accepted_tokens
        drafted += speculative.drafted_tokens
        assert speculative.full_model_calls < standard.full_model_calls
    assert accepted / drafted > 0.7


def test_trained_module_follows_the_pattern(trained_model) -> None:
    prompt = torch.tensor([PATTERN[:4]])
    out = trained_model.generate(prompt, 18, decoding="alternating")
    expected = (PATTERN * 4)[4 : 4 + 18]
    assert out.new_tokens[0].tolist() == expected


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 24])
def test_alternating_makes_one_full_call_per_two_tokens(tiny_model, n) -> None:
    out = tiny_model.generate(torch.tensor([[1, 2, 3]]), n, decoding="alternating")
    assert out.new_tokens.shape[1] == n
    assert abs(out.full_model_calls - math.ceil(n / 2)) <= 1
    assert out.module_calls == n // 2


def test_alternating_equals_manual_schedule(tiny_model) -> None:
    """Token 2k+1 is the base's argmax, token 2k+2 the module's argmax from (h[t-1], x[t])."""
    ids = torch.tensor([[4, 9, 2, 7]])
    out = tiny_model.generate(ids, 8, decoding="alternating").sequences
    with torch.no_grad():
        for t in range(ids.shape[1], out.shape[1]):
            prefix = out[:, :t]
            hidden = tiny_model.base_hidden(prefix)
            if (t - ids.shape[1]) % 2 == 0:
                expected = tiny_model.lm_head(hidden[:, -1]).argmax(-1)
            else:  # the module reads h[t-2] and x[t-1] with its own causal attention over the prefix
                prev = torch.cat((torch.zeros_like(hidden[:, :1]), hidden[:, :-1]), dim=1)
                state = tiny_model.module_hidden(prev, prefix)
                expected = tiny_model.lm_head(state[:, -1]).argmax(-1)
            assert int(out[0, t]) == int(expected)


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("decoding", ["standard", "alternating"])
def test_left_padded_batch_equals_rows_alone(tiny_model, decoding) -> None:
    rows = [[3, 14, 15, 92, 65, 35], [27, 18], [81, 82, 83, 84]]
    ids, mask = left_pad(rows)
    batched = tiny_model.generate(ids, 12, decoding=decoding, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = tiny_model.generate(torch.tensor([row]), 12, decoding=decoding)
        assert batched.new_tokens[i].tolist() == alone.new_tokens[0].tolist()


def test_speculative_rejects_batches(tiny_model) -> None:
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_model.generate(torch.ones(2, 3, dtype=torch.long), 4, decoding="speculative")


def test_eos_stops_and_pads(trained_model) -> None:
    eos = PATTERN[3]
    out = trained_model.generate(torch.tensor([PATTERN[:2]]), 20, eos_token_id=eos, pad_token_id=0)
    assert out.new_tokens[0].tolist() == [PATTERN[2], eos]
    batch = trained_model.generate(torch.tensor([PATTERN[:2], PATTERN[5:7]]), 9, eos_token_id=eos, pad_token_id=0)
    # Decoding stops once every row has finished; a finished row is padded meanwhile.
    assert batch.new_tokens[0].tolist() == [PATTERN[2], eos, 0, 0, 0, 0]
    assert batch.new_tokens[1].tolist() == [PATTERN[7], PATTERN[8], PATTERN[0], PATTERN[1], PATTERN[2], eos]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=200), "max_new_tokens"),
        (dict(decoding="beam"), "decoding"),
        (dict(draft_length=0), "draft_length"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(input_ids=torch.tensor([[1, 500]])), "input_ids"),
    ],
)
def test_bad_arguments_name_themselves(tiny_model, kwargs, name) -> None:
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        tiny_model.generate(**args)


def test_kv_cache_rollback_recomputes_identically(tiny_model) -> None:
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = tiny_model.new_cache("base", 1, 16)
        tiny_model.base_hidden(ids[:, :8], cache=cache)
        first = tiny_model.base_hidden(ids[:, 8:12], cache=cache)
        assert cache.length == 12
        cache.rollback(8)
        tiny_model.base_hidden(torch.tensor([[1, 2, 3]]), cache=cache)  # a rejected draft
        cache.rollback(8)
        again = tiny_model.base_hidden(ids[:, 8:12], cache=cache)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="roll back"):
        cache.rollback(13)


def test_sampling_is_reproducible_with_seed(tiny_model) -> None:
    ids = torch.tensor([[1, 2, 3]])
    for decoding in ("standard", "alternating", "speculative"):
        a = tiny_model.generate(ids, 15, decoding=decoding, temperature=1.0, top_k=20, top_p=0.9, seed=7)
        tiny_model.generate(ids, 30, decoding="speculative")  # leaves acceptance a seeded call must not use
        b = tiny_model.generate(ids, 15, decoding=decoding, temperature=1.0, top_k=20, top_p=0.9, seed=7)
        assert torch.equal(a.sequences, b.sequences)


def test_adaptive_drafting_starts_from_what_earlier_calls_learned(tiny_model, trained_model) -> None:
    """A random module's rejections carry over (the next call does not relearn them); a trained
    module's acceptance too; ``remember=False`` (a seeded sampling call) starts from the prior."""
    from recyclegpt.core.speculation import draft_planner

    forget_acceptance(tiny_model)
    fresh = draft_planner(tiny_model, 4)
    tiny_model.generate(torch.tensor([[1, 2, 3]]), 40, decoding="speculative")
    learned = draft_planner(tiny_model, 4)
    assert learned.acceptance[0] < fresh.prior and learned.observed[0] > 0 and learned.probe_interval > 1
    assert draft_planner(tiny_model, 4, remember=False).acceptance == []
    forget_acceptance(trained_model)
    trained_model.generate(pattern_prompts()[1], 30, decoding="speculative", draft_length=4)
    learned = draft_planner(trained_model, 4)
    seen = [a for a, times in zip(learned.acceptance, learned.observed, strict=True) if times]
    assert seen and min(seen) > 0.5 and learned.plan(4) >= 2  # drafts several tokens from the first cycle


def test_own_acceptance_keeps_a_policys_learning_apart_from_the_models_memory(tiny_model) -> None:
    """Calls inside ``own_acceptance`` start from and leave their learning under their own name; the
    model's own memory is what it was before, and a second scope with another name starts fresh."""
    from recyclegpt.core.speculation import draft_planner, own_acceptance

    forget_acceptance(tiny_model)
    ids = torch.tensor([[1, 2, 3]])
    tiny_model.generate(ids, 20, decoding="speculative")
    outer = draft_planner(tiny_model, 4)
    memories: dict[str, object] = {}
    with own_acceptance(tiny_model, memories, "tree"):
        assert draft_planner(tiny_model, 4).acceptance == []  # not the model's memory
        tiny_model.generate(ids, 40, decoding="speculative", draft_policy="tree")
    assert memories["tree"] is not None
    after = draft_planner(tiny_model, 4)
    assert (after.acceptance, after.observed) == (outer.acceptance, outer.observed)
    with own_acceptance(tiny_model, memories, "auto"):
        assert draft_planner(tiny_model, 4).acceptance == []
    with own_acceptance(tiny_model, memories, "tree"):
        again = draft_planner(tiny_model, 4)
        assert again.observed and sum(again.observed) > 0  # what the tree calls learned, back
    forget_acceptance(tiny_model)


def test_speculative_decoding_teaches_measured_step_costs_but_not_pinned_ones(tiny_model) -> None:
    """The planner's costs follow the steps decoding takes, and keep what they learned when wider
    steps are measured; a seeded sampling call plans with the costs as measured and teaches them
    nothing (it must repeat itself); pinned costs stay as pinned."""
    from recyclegpt.core.speculation import forget_measurements, step_costs

    forget_measurements(tiny_model)
    prompt = torch.tensor([[1, 2, 3]])
    tiny_model.generate(prompt, 20, decoding="speculative", draft_length=3)
    learned = step_costs(tiny_model, 4)
    assert learned.learning and learned.counts["base"] >= 19  # one reading a verification (the measurement: 1)
    before = (list(learned.base_ms), learned.module_ms, dict(learned.counts))
    tiny_model.generate(prompt, 20, decoding="speculative", draft_length=3, temperature=0.8, seed=3)
    assert (learned.base_ms, learned.module_ms, learned.counts) == before
    wider = step_costs(tiny_model, 7)  # measured again, over more widths
    assert wider.base_factor == learned.base_factor and wider.counts == learned.counts
    assert wider.module_ms == learned.module_ms and wider.first_module_ms == learned.first_module_ms
    pin_step_costs(tiny_model, StepCosts([0.0, *(1 + 0.05 * k for k in range(5))], 0.2))
    pinned = step_costs(tiny_model, 4)
    tiny_model.generate(prompt, 20, decoding="speculative", draft_length=3)
    assert not pinned.learning and pinned.base_ms == pinned.measured[0] and pinned.module_ms == 0.2
    assert not pinned.counts
    forget_measurements(tiny_model)


class RecordingCosts(StepCosts):
    """Step costs that keep every reading decoding gives them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.readings: list[tuple[str, int]] = []

    def observe_base(self, tokens: int, ms: float) -> None:
        self.readings.append(("base", tokens))
        super().observe_base(tokens, ms)

    def observe_module(self, ms: float, first: bool) -> None:
        self.readings.append(("first" if first else "chained", 1))
        super().observe_module(ms, first)


def test_every_verification_and_every_cycle_sized_draft_is_timed(trained_model) -> None:
    """One reading per verification at its width; draft readings leave out the first cycle's catch-up
    over the whole prompt."""
    model = copy.deepcopy(trained_model)
    costs = RecordingCosts([0.0, *(1 + 0.05 * k for k in range(8))], 0.2)
    pin_step_costs(model, costs, learning=True)
    forget_acceptance(model)
    out = model.generate(pattern_prompts()[2], 30, decoding="speculative", draft_length=4)
    widths = [tokens for kind, tokens in costs.readings if kind == "base"]
    assert len(widths) == out.full_model_calls - 1  # all but the prompt's forward
    assert sum(width - 1 for width in widths) == out.drafted_tokens
    drafting_cycles = sum(width > 1 for width in widths)
    assert drafting_cycles >= 3
    assert costs.readings.count(("first", 1)) == drafting_cycles - 1  # every drafting cycle but the first
    assert costs.readings.count(("chained", 1)) == out.module_calls - drafting_cycles
    assert costs.counts["base"] == len(widths) + 1 and costs.base_ms != costs.measured[0]


def test_seeded_sampling_repeats_itself_whatever_the_learned_costs(trained_model) -> None:
    model = copy.deepcopy(trained_model)
    pin_step_costs(model, StepCosts([0.0, *(1 + 0.05 * k for k in range(8))], 0.2), learning=True)
    prompt = pattern_prompts()[1]
    sample = {"decoding": "speculative", "draft_length": 4, "temperature": 0.9, "seed": 11}
    first = model.generate(prompt, 24, **sample)
    from recyclegpt.core.speculation import step_costs

    learned = step_costs(model, 5)
    for _ in range(60):  # decoding "saw" drafts that cost as much as a full step: drafting stops paying
        learned.observe_module(1.0, first=True)
        learned.observe_module(1.0, first=False)
    assert model.generate(prompt, 24, **sample).sequences.equal(first.sequences)


def test_short_calls_still_probe_a_module_that_was_rejected(tiny_model) -> None:
    """The probe clock runs across calls: many short requests still verify a draft now and then."""
    from recyclegpt.core.speculation import draft_planner

    forget_acceptance(tiny_model)
    prompt = torch.tensor([[1, 2, 3]])
    tiny_model.generate(prompt, 60, decoding="speculative")  # learns to reject: long probe interval
    interval = draft_planner(tiny_model, 4).probe_interval
    assert interval > 4
    probes = 0
    for _ in range(3 * interval // 4 + 1):
        before = draft_planner(tiny_model, 4).observed[0]
        tiny_model.generate(prompt, 4, decoding="speculative")
        probes += draft_planner(tiny_model, 4).observed[0] > before
    assert probes >= 1


@pytest.mark.parametrize("decoding", ["standard", "alternating", "speculative"])
def test_on_tokens_streams_exactly_the_new_tokens(trained_model, decoding) -> None:
    pieces: list[torch.Tensor] = []
    out = trained_model.generate(torch.tensor([PATTERN[:3]]), 17, decoding=decoding, on_tokens=pieces.append)
    assert torch.cat(pieces, dim=1).tolist() == out.new_tokens.tolist()
    if decoding == "speculative":
        assert len(pieces) < 17  # accepted drafts arrive together


def test_on_tokens_returning_true_stops_decoding(trained_model) -> None:
    seen: list[int] = []

    def stop_after_five(tokens: torch.Tensor) -> bool:
        seen.extend(tokens[0].tolist())
        return len(seen) >= 5

    out = trained_model.generate(torch.tensor([PATTERN[:3]]), 30, on_tokens=stop_after_five)
    assert out.new_tokens[0].tolist() == seen and len(seen) == 5
    assert out.full_model_calls == 5


def test_greedy_tokens_pick_the_first_of_equal_maxima_as_argmax_does() -> None:
    torch.manual_seed(0)
    for width in (7, 4096, 49152):
        logits = (torch.randn(5, width) * 3).round().to(torch.bfloat16)  # many exact ties
        assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert greedy_tokens(torch.tensor([[1.0, 3.0, 3.0, 2.0]])).tolist() == [1]


def test_output_hidden_states_are_the_base_states_of_the_tokens_read(tiny_model, prompts) -> None:
    """Kept while decoding (a module's training features at no second pass): the states a full
    forward over the output computes, in one row and in a batch."""
    out = tiny_model.generate(prompts[2], 12, output_hidden_states=True)
    assert out.hidden_states.shape == (1, out.sequences.shape[1] - 1, tiny_model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(out.hidden_states, tiny_model.base_hidden(out.sequences[:, :-1]))
    batch = torch.cat([prompts[2], prompts[2].flip(1)])
    both = tiny_model.generate(batch, 12, output_hidden_states=True)
    torch.testing.assert_close(both.hidden_states[:1], out.hidden_states)
    assert tiny_model.generate(prompts[2], 12).hidden_states is None
    with pytest.raises(ValueError, match="output_hidden_states needs decoding='standard'"):
        tiny_model.generate(prompts[2], 4, decoding="alternating", output_hidden_states=True)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_mask_is_causal_and_hides_padding_except_a_query_from_itself(padded: bool) -> None:
    cache = KVCache(1, 2, 1, 8, 4, torch.float32, "cpu")
    if padded:
        cache.set_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert attention_mask_for(cache, 4, 1, torch.device("cpu")) is None or padded
    mask = attention_mask_for(cache, 3, 2, torch.device("cpu"), torch.bfloat16)  # queries at 3 and 4
    assert mask.dtype == torch.bfloat16 and set(mask.unique().tolist()) <= {0.0, float("-inf")}
    sees = (mask == 0).expand(2, 1, 2, 5)[:, 0]  # [row, query, key]
    causal = torch.tensor([[True, True, True, True, False], [True] * 5])
    assert torch.equal(sees[1], causal)
    assert torch.equal(sees[0], causal & torch.tensor([not padded] * 2 + [True] * 3))
    if padded:  # the prefill: a padding query sees itself only, so its softmax row is not empty
        prefill = (attention_mask_for(cache, 0, 4, torch.device("cpu")) == 0)[0, 0]
        assert prefill[0].tolist() == [True, False, False, False] and prefill[3].tolist() == [False, False, True, True]


@pytest.mark.parametrize("draft_policy", ["adaptive", "tree"])
def test_warm_up_measures_the_step_costs_the_first_call_plans_with(tiny_model, monkeypatch, draft_policy) -> None:
    from recyclegpt.core import speculation
    from recyclegpt.core.decoding import warm_up_speculation

    model = copy.deepcopy(tiny_model)
    measured = []
    real = speculation.measure_step_costs
    monkeypatch.setattr(speculation, "measure_step_costs", lambda *a, **k: measured.append(1) or real(*a, **k))
    warm_up_speculation(model, draft_length=3, draft_policy=draft_policy)
    assert len(measured) == 1
    model.generate(torch.tensor([[1, 2, 3]]), 8, decoding="speculative", draft_length=3, draft_policy=draft_policy)
    assert len(measured) == 1  # the call planned with the warmed-up costs


def test_warm_up_of_a_fixed_policy_measures_nothing_and_bad_policies_name_themselves(tiny_model, monkeypatch) -> None:
    from recyclegpt.core import speculation
    from recyclegpt.core.decoding import warm_up_speculation

    monkeypatch.setattr(speculation, "measure_step_costs", lambda *a, **k: pytest.fail("measured"))
    warm_up_speculation(copy.deepcopy(tiny_model), draft_length=3, draft_policy="fixed")
    with pytest.raises(ValueError, match="draft_policy"):
        warm_up_speculation(tiny_model, draft_policy="greedy")
