"""Teacher-forced quality of the base and its recyclable module, and generation-level agreement.

Alignment (as in ``recycle_losses``): at position t the base predicts x[t+1] from x[..t]; the
module predicts x[t+1] from (h[t-1], x[t]). A module at *draft depth* k reads, instead of the
true h[t-1], its own output state from position t-1, itself chained k-1 times from a true state
- what the speculative decoder's k-th draft sees (with the true tokens here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from recyclegpt.core import RecycleGPT
from recyclegpt.core.losses import shift_hidden


def _accuracy(vocab_size: int, device: torch.device) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=vocab_size, average="micro").to(device)


@torch.inference_mode()
def teacher_forced_quality(
    model: RecycleGPT, blocks: torch.Tensor, batch_size: int = 8, max_depth: int = 4
) -> dict[str, Any]:
    """Perplexities, accuracies and module/base agreement over token blocks [N, T]."""
    device = model.lm_head.weight.device
    vocab = model.config.vocab_size
    base_ppl, module_ppl, alternating_ppl = (Perplexity().to(device) for _ in range(3))
    base_acc, module_acc, agreement = (_accuracy(vocab, device) for _ in range(3))
    depth_agreement = {k: _accuracy(vocab, device) for k in range(1, max_depth + 1)}
    depth_accuracy = {k: _accuracy(vocab, device) for k in range(1, max_depth + 1)}
    for batch in blocks.split(batch_size):
        ids = batch.to(device)
        hidden = model.base_hidden(ids)
        base_logits = model.base_logits(hidden[:, :-1]).float()
        module_logits = model.lm_head(model.module_hidden(shift_hidden(hidden)[:, :-1], ids[:, :-1])).float()
        targets = ids[:, 1:]
        base_greedy = base_logits.argmax(-1)
        base_ppl.update(base_logits, targets)
        module_ppl.update(module_logits, targets)
        alternating_ppl.update(alternating_logits(base_logits, module_logits), targets)
        base_acc.update(base_greedy, targets)
        module_acc.update(module_logits.argmax(-1), targets)
        agreement.update(module_logits.argmax(-1), base_greedy)
        for depth, module_greedy, positions in chained_drafts(model, ids, hidden, max_depth):
            depth_agreement[depth].update(module_greedy, base_greedy[:, positions])
            depth_accuracy[depth].update(module_greedy, targets[:, positions])
    return {
        "base_perplexity": base_ppl.compute().item(),
        "module_perplexity": module_ppl.compute().item(),
        "alternating_perplexity": alternating_ppl.compute().item(),
        "base_accuracy": base_acc.compute().item(),
        "module_accuracy": module_acc.compute().item(),
        "agreement": agreement.compute().item(),
        "agreement_by_depth": {str(k): m.compute().item() for k, m in depth_agreement.items()},
        "module_accuracy_by_depth": {str(k): m.compute().item() for k, m in depth_accuracy.items()},
    }


def alternating_logits(base_logits: torch.Tensor, module_logits: torch.Tensor) -> torch.Tensor:
    """The logits alternating decoding scores each token with: the base predicts targets 0, 2, 4...
    (the first token after a block's start comes from the full model), the module targets 1, 3, 5...
    from the true h[t-1], since the full call before it has caught up on every token.
    """
    from_module = torch.arange(base_logits.shape[1], device=base_logits.device) % 2 == 1
    return torch.where(from_module[None, :, None], module_logits, base_logits)


def chained_drafts(
    model: RecycleGPT, ids: torch.Tensor, hidden: torch.Tensor, max_depth: int
) -> Iterator[tuple[int, torch.Tensor, int]]:
    """Yield (depth, module greedy tokens [B], position t) for every t and depth 1..max_depth.

    For each start p, the module's cache holds its depth-1 states of slots 0..p-1 (computed
    from true states, as in the speculative decoder after a verification); the module reads
    (h[p-1], x[p]) at depth 1, then its own state at p+1, p+2... with the true tokens.
    """
    batch, length = ids.shape
    cache = model.new_cache("module", batch, length)
    prev_hidden = shift_hidden(hidden)
    for start in range(length - 1):
        state = model.module_hidden(prev_hidden[:, start : start + 1], ids[:, start : start + 1], cache=cache)
        yield 1, model.draft_logits(state[:, -1]).argmax(-1), start
        for depth in range(2, max_depth + 1):
            position = start + depth - 1
            if position >= length - 1:
                break
            state = model.module_hidden(state, ids[:, position : position + 1], cache=cache)
            yield depth, model.draft_logits(state[:, -1]).argmax(-1), position
        cache.rollback(start + 1)


@torch.inference_mode()
def generation_agreement(model: RecycleGPT, prompts: list[torch.Tensor], max_new_tokens: int) -> dict[str, Any]:
    """How often greedy ``alternating`` decoding reproduces greedy ``standard`` decoding.

    EOS is ignored so that every prompt yields ``max_new_tokens`` tokens to compare.
    """
    identical, prefix = MeanMetric(), MeanMetric()
    for prompt in prompts:
        standard = model.generate(prompt, max_new_tokens, decoding="standard").new_tokens
        alternating = model.generate(prompt, max_new_tokens, decoding="alternating").new_tokens
        same = (standard == alternating)[0].cpu()
        identical.update(same.float())
        prefix.update(int(same.long().cumprod(0).sum()))  # tokens before the first difference
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "identical_fraction": identical.compute().item(),
        "mean_identical_prefix": prefix.compute().item(),
    }
