"""The interleaved timing loop every benchmark uses."""

from __future__ import annotations

import pytest

from recyclegpt.core.profiling import interleaved, interleaved_items


def test_interleaved_times_every_run_each_round_and_reverses_the_order_every_other_round():
    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name) or name) for name in "abc"}
    samples = interleaved(runs, 3, warmup=lambda name, run: None)
    assert calls == list("abc" + "cba" + "abc")  # no run always follows the same one
    assert {name: [result for result, _ in values] for name, values in samples.items()} == {n: [n] * 3 for n in "abc"}
    assert all(seconds >= 0 for values in samples.values() for _, seconds in values)


def test_interleaved_items_runs_every_run_on_one_item_before_the_next_and_sums_each_round():
    calls: list[tuple[str, int]] = []
    runs = {name: (lambda item, name=name: calls.append((name, item)) or f"{name}{item}") for name in "ab"}
    rounds: list[int] = []
    samples = interleaved_items(runs, [1, 2, 3], 2, on_round=rounds.append)
    assert calls[:2] == [("a", 1), ("b", 1)]  # the untimed warm-up, on the first item
    timed = calls[2:]
    first_round = [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    second_round = [("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert timed == first_round + second_round
    assert rounds == [0, 1]
    assert [results for results, _ in samples["a"]] == [["a1", "a2", "a3"]] * 2
    assert all(seconds >= 0 for values in samples.values() for _, seconds in values)
    with pytest.raises(ValueError, match="at least one item"):
        interleaved_items(runs, [], 1)
