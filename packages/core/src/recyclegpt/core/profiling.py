"""Timing: the one interleaved timing loop every benchmark uses, and decoder step costs.

``interleaved`` runs every contender once per round after a warm-up, so the slow phases of a
shared, noisy machine hit all of them alike, and reverses the order every other round, so no
contender always runs right after the same one (on a 2-core VM, which of two models ran first
moved its step time by up to ~7%); figures are medians over rounds. ``interleaved_items`` does the
same over several inputs (prompts) with each input as its own turn, so contenders that each take
seconds over all the inputs still run within a fraction of a second of one another (a 2-core VM's
speed moved by a third from one second to the next).
``measure_step_costs`` times k-token full-model steps and the module step with filled KV caches;
the speculative decoder uses it to decide how far to draft on this machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from recyclegpt.core.losses import shift_hidden
from recyclegpt.core.model import RecycleGPT

T = TypeVar("T")
X = TypeVar("X")


def synchronize() -> None:
    """Wait for the accelerator, so wall-clock timings include its work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn`` once; its result and the seconds it took (after the device finished)."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def interleaved(
    runs: dict[str, Callable[[], T]],
    rounds: int,
    warmup: Callable[[str, Callable[[], T]], object] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[tuple[T, float]]]:
    """(result, seconds) of every run in every round: the runs in their given order in even rounds
    and in the reverse order in odd ones.

    Each run is called once untimed first (or ``warmup(name, run)`` when given).
    """
    for name, run in runs.items():
        warmup(name, run) if warmup is not None else run()
    samples: dict[str, list[tuple[T, float]]] = {name: [] for name in runs}
    order = list(runs.items())
    for index in range(rounds):
        for name, run in order if index % 2 == 0 else reversed(order):
            samples[name].append(timed(run))
        if on_round is not None:
            on_round(index)
    return samples


def interleaved_items(
    runs: dict[str, Callable[[X], T]],
    items: Sequence[X],
    rounds: int,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[tuple[list[T], float]]]:
    """(results over ``items``, total seconds) of every run in every round. A round is one turn per
    item: every run on that item, the order reversed every other turn (:func:`interleaved`, with
    ``len(items)`` turns a round). Each run is called once untimed on the first item first."""
    if not items:
        raise ValueError("interleaved_items needs at least one item")
    turn = {"item": 0}  # the item this turn's calls read; :func:`interleaved` moves it on after each turn

    def next_turn(index: int) -> None:
        turn["item"] = (index + 1) % len(items)
        if on_round is not None and turn["item"] == 0:
            on_round(index // len(items))

    per_turn = interleaved(
        {name: (lambda run=run: run(items[turn["item"]])) for name, run in runs.items()},
        rounds * len(items),
        warmup=lambda name, _call: runs[name](items[0]),
        on_round=next_turn,
    )
    samples: dict[str, list[tuple[list[T], float]]] = {}
    for name, turns in per_turn.items():
        grouped = [turns[start : start + len(items)] for start in range(0, len(turns), len(items))]
        samples[name] = [([result for result, _ in group], sum(seconds for _, seconds in group)) for group in grouped]
    return samples


def median_seconds(samples: Iterable[tuple[object, float]]) -> float:
    return statistics.median(seconds for _, seconds in samples)


def _device(model: RecycleGPT) -> torch.device:
    return model.model.norm.weight.device


@torch.inference_mode()
def measure_step_costs(
    model: RecycleGPT,
    prompt: torch.Tensor,
    token_counts: Iterable[int] = (1, 2),
    iterations: int = 30,
    inner: int = 5,
) -> dict[str, float]:
    """Milliseconds of a full-model step over k tokens (``base_<k>``) for each k in
    ``token_counts`` and of a 1-token module step with its greedy draft (``module``), all with KV
    caches filled by ``prompt``. A k-token step includes the LM head and the greedy pick at each of its k rows, as a
    k-token verification does (the head over 5 rows costs ~3x one row on CPU).
    """
    token_counts = sorted(set(token_counts))
    device = _device(model)
    prompt = prompt.to(device)
    length = prompt.shape[1]
    widest = max(token_counts)
    base_cache = model.new_cache("base", 1, length + widest)
    module_cache = model.new_cache("module", 1, length + 1)
    hidden = model.base_hidden(prompt, cache=base_cache)
    model.module_hidden(shift_hidden(hidden), prompt, cache=module_cache)
    token, last_hidden = prompt[:, -1:], hidden[:, -1:]
    step_tokens = {k: prompt[:, -1:].repeat(1, k) for k in token_counts}

    def base_step(k: int) -> Callable[[], None]:
        def step() -> None:
            for _ in range(inner):
                base_cache.rollback(length)
                model.greedy_base_token(model.base_hidden(step_tokens[k], cache=base_cache))

        return step

    def module_step() -> None:
        for _ in range(inner):
            module_cache.rollback(length)
            model.greedy_draft(model.module_hidden(last_hidden, token, cache=module_cache)[:, -1])

    runs = {f"base_{k}": base_step(k) for k in token_counts}
    runs["module"] = module_step
    samples = interleaved(runs, iterations)
    return {name: 1e3 * median_seconds(values) / inner for name, values in samples.items()}


def measure_step_cost(
    model: RecycleGPT, prompt: torch.Tensor, iterations: int = 30, inner: int = 5
) -> dict[str, float]:
    """c = time of a 1-token module step / time of a 1-token full-model step, and the 2-token step
    (what alternating decoding's full calls cost), in the keys the eval reports use."""
    ms = measure_step_costs(model, prompt, (1, 2), iterations, inner)
    c = ms["module"] / ms["base_1"]
    return {
        "base_step_ms": ms["base_1"],
        "base_2_tokens_ms": ms["base_2"],
        "module_step_ms": ms["module"],
        "c": c,
        "alternating_bound": 2 / (1 + c),
    }
