"""Timing decoder steps: how much a module step costs next to a full-model step (c)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from recyclegpt.core.losses import shift_hidden
from recyclegpt.core.model import RecycleGPT


def synchronize() -> None:
    """Wait for the accelerator, so wall-clock timings include its work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """Run ``fn`` once; its result and the seconds it took (after the device finished)."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


@torch.inference_mode()
def measure_step_cost(
    model: RecycleGPT, prompt: torch.Tensor, iterations: int = 30, inner: int = 5
) -> dict[str, float]:
    """c = time of a 1-token module step / time of a 1-token full-model step, both with KV caches
    filled by ``prompt`` and both including the LM head and the greedy pick, as in decoding.
    Also the time of a 2-token full-model step (what alternating decoding's full calls cost).
    """
    device = model.lm_head.weight.device
    prompt = prompt.to(device)
    length = prompt.shape[1]
    base_cache = model.new_cache("base", 1, length + 2)
    module_cache = model.new_cache("module", 1, length + 1)
    hidden = model.base_hidden(prompt, cache=base_cache)
    model.module_hidden(shift_hidden(hidden), prompt, cache=module_cache)
    token, last_hidden = prompt[:, -1:], hidden[:, -1:]
    two_tokens = prompt[:, -2:]

    def base_step(tokens: torch.Tensor = token) -> None:
        for _ in range(inner):
            base_cache.rollback(length)
            model.lm_head(model.base_hidden(tokens, cache=base_cache)[:, -1]).argmax(-1)

    def base_step_2() -> None:
        base_step(two_tokens)

    def module_step() -> None:
        for _ in range(inner):
            module_cache.rollback(length)
            model.draft_logits(model.module_hidden(last_hidden, token, cache=module_cache)[:, -1]).argmax(-1)

    steps = {"base_step_ms": base_step, "base_2_tokens_ms": base_step_2, "module_step_ms": module_step}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iterations):  # interleaved, so machine noise hits all alike
        for name, step in steps.items():
            times[name].append(timed(step)[1] / inner)
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    c = ms["module_step_ms"] / ms["base_step_ms"]
    return {**ms, "c": c, "alternating_bound": 2 / (1 + c)}
