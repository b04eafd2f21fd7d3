"""The interleaved timing loop every benchmark uses."""

from __future__ import annotations

from recyclegpt.core.profiling import interleaved


def test_interleaved_times_every_run_each_round_and_reverses_the_order_every_other_round():
    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name) or name) for name in "abc"}
    samples = interleaved(runs, 3, warmup=lambda name, run: None)
    assert calls == list("abc" + "cba" + "abc")  # no run always follows the same one
    assert {name: [result for result, _ in values] for name, values in samples.items()} == {n: [n] * 3 for n in "abc"}
    assert all(seconds >= 0 for values in samples.values() for _, seconds in values)
