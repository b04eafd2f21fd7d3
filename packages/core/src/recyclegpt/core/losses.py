"""Training losses: L = L_lm + rec_weight * L_rec (+ feature_weight * L_feature)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recyclegpt.core.model import RecycleGPT


@dataclass
class RecycleLosses:
    """Losses of one teacher-forced pass plus the logits they came from (for metrics)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    rec_loss: torch.Tensor
    feature_loss: torch.Tensor
    base_logits: torch.Tensor  # [B, T-1, V]; position t predicts x[t+1]
    module_logits: torch.Tensor  # [B, T-1, V]; position t predicts x[t+1] from h[t-1], x[t]
    targets: torch.Tensor  # [B, T-1]: x[1:]


def shift_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """h[t-1] for every position t; zeros at t = 0, where no earlier state exists."""
    return torch.cat((torch.zeros_like(hidden[:, :1]), hidden[:, :-1]), dim=1)


def recycle_losses(
    model: RecycleGPT,
    input_ids: torch.Tensor,
    rec_weight: float = 1.0,
    feature_weight: float = 0.0,
    frozen_base: bool = False,
) -> RecycleLosses:
    """Teacher-forced losses over a block of tokens [B, T], all positions in one parallel pass.

    ``L_lm``: the base predicts x[t+1] from x[..t]. ``L_rec``: the module predicts x[t+1] from
    h[t-1] and x[t]. ``L_feature`` (EAGLE-style, optional): smooth L1 between the
    module's output state at t and the base's h[t], which keeps chained drafts accurate.
    With ``frozen_base`` the base runs without gradients and only the module learns.
    """
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per row, got {input_ids.shape[1]}")
    if frozen_base:
        with torch.no_grad():
            hidden = model.base_hidden(input_ids)
            base_logits = model.lm_head(hidden[:, :-1])
    else:
        hidden = model.base_hidden(input_ids)
        base_logits = model.lm_head(hidden[:, :-1])
    targets = input_ids[:, 1:]
    vocab = base_logits.shape[-1]
    lm_loss = F.cross_entropy(base_logits.reshape(-1, vocab).float(), targets.reshape(-1))

    # Module position t reads (h[t-1], x[t]) and predicts x[t+1], the base's target at t too.
    # Position 0 reads a zero state, exactly as the decoders do, so the KV layouts match.
    module_state = model.module_hidden(shift_hidden(hidden)[:, :-1], input_ids[:, :-1])
    module_logits = model.lm_head(module_state)
    rec_loss = F.cross_entropy(module_logits.reshape(-1, vocab).float(), targets.reshape(-1))

    if feature_weight > 0:
        feature_loss = F.smooth_l1_loss(module_state.float(), hidden[:, :-1].detach().float())
    else:
        feature_loss = torch.zeros((), device=input_ids.device)
    if frozen_base:
        loss = rec_weight * rec_loss + feature_weight * feature_loss
    else:
        loss = lm_loss + rec_weight * rec_loss + feature_weight * feature_loss
    return RecycleLosses(loss, lm_loss, rec_loss, feature_loss, base_logits, module_logits, targets)
