"""Turning logits into tokens: temperature, top-k, top-p (nucleus) and greedy."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampler draws from: softmax(logits / T) restricted by top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax along the last dimension (the first index among equal maxima), as ``argmax`` gives.

    ``max(-1).indices`` picks the same index and on CPU takes a quarter of ``argmax``'s time on bf16
    logits (49,152 wide: 46 against 194 us, measured), which is 1-2% of a SmolLM2 int4 step.
    """
    return logits.max(-1).indices


def sample(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: argmax when greedy, else a draw from token_probs."""
    if params.greedy:
        return greedy_tokens(logits)
    probs = token_probs(logits, params)
    return torch.multinomial(probs, 1, generator=params.generator)[:, 0]
