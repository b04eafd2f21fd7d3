"""The full model's log-probabilities of a token sequence (prompt scoring, ``echo``, ``logprobs``).

Whatever decoder produced the tokens (standard, alternating, speculative), these are the full
model's own log p(x[t] | x[<t]), so they mean the same in every mode. ``FullModelScorer`` scores a
sequence as it grows, through its own KV cache, so scoring a streamed completion costs one extra
forward per chunk over the new tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recyclegpt.core.model import RecycleGPT


@dataclass
class TokenLogprob:
    """log p(token | everything before it) under the full model; ``None`` for the first token."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens there, best first


class FullModelScorer:
    """Scores tokens under the full model as they arrive: ``score(ids)`` for each new piece."""

    def __init__(self, model: RecycleGPT, capacity: int, top: int = 0) -> None:
        self.model = model
        self.top = top
        self.capacity = min(capacity, model.config.max_seq_len)
        self.cache = model.new_cache("base", 1, self.capacity)
        self._last: torch.Tensor | None = None  # log-probabilities [V] for the next token

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> list[TokenLogprob]:
        """The log-probability of each new token given all tokens scored before it."""
        if not token_ids:
            return []
        if self.cache.length + len(token_ids) > self.capacity:
            raise ValueError(f"scoring {self.cache.length + len(token_ids)} tokens exceeds capacity {self.capacity}")
        device = self.model.lm_head.weight.device
        ids = torch.tensor([token_ids], device=device)
        hidden = self.model.base_hidden(ids, cache=self.cache)
        rows = self.model.base_logits(hidden[0]).float().log_softmax(-1)  # row i predicts token i+1
        first_unscored = self._last is None  # the sequence's first token has no prediction
        predictors = rows[:-1] if first_unscored else torch.cat((self._last.unsqueeze(0), rows[:-1]))
        self._last = rows[-1]
        scored = token_ids[1:] if first_unscored else token_ids
        out = [TokenLogprob(token_ids[0], None)] if first_unscored else []
        if not scored:
            return out
        targets = torch.tensor(scored, device=device).unsqueeze(-1)
        chosen = predictors.gather(-1, targets)[:, 0].tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in scored]
        if self.top > 0:
            values, indices = predictors.topk(min(self.top, predictors.shape[-1]), dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        out += [TokenLogprob(t, lp, top) for t, lp, top in zip(scored, chosen, tops, strict=True)]
        return out


def sequence_logprobs(model: RecycleGPT, token_ids: list[int], top: int = 0) -> list[TokenLogprob]:
    """log p(x[t] | x[<t]) for every token of ``token_ids`` under the full model (the first: None)."""
    return FullModelScorer(model, len(token_ids), top).score(token_ids)
