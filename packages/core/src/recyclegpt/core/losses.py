"""Training losses: L = L_lm + rec_weight * L_rec (+ feature_weight * L_feature)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recyclegpt.core.model import RecycleGPT, apply_rotary


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
    distill: bool = False,
) -> RecycleLosses:
    """Teacher-forced losses over a block of tokens [B, T], all positions in one parallel pass.

    ``L_lm``: the base predicts x[t+1] from x[..t]. ``L_rec``: the module predicts x[t+1] from
    h[t-1] and x[t]. ``L_feature`` (EAGLE-style, optional): smooth L1 between the
    module's output state at t and the base's h[t], which keeps chained drafts accurate.
    With ``frozen_base`` the base runs without gradients and only the module learns. ``distill``:
    ``L_rec`` is the soft cross-entropy to the base's own (detached) distribution at t instead of
    cross-entropy to x[t+1], so the module learns to agree with the base, which is what decoding needs.
    """
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per row, got {input_ids.shape[1]}")
    if frozen_base:
        with torch.no_grad():
            hidden = model.base_hidden(input_ids)
            base_logits = model.base_logits(hidden[:, :-1])
    else:
        hidden = model.base_hidden(input_ids)
        base_logits = model.base_logits(hidden[:, :-1])
    targets = input_ids[:, 1:]
    vocab = base_logits.shape[-1]
    lm_loss = F.cross_entropy(base_logits.reshape(-1, vocab).float(), targets.reshape(-1))

    # Module position t reads (h[t-1], x[t]) and predicts x[t+1], the base's target at t too.
    # Position 0 reads a zero state, exactly as the decoders do, so the KV layouts match.
    module_state = model.module_hidden(shift_hidden(hidden)[:, :-1], input_ids[:, :-1])
    module_logits = model.lm_head(module_state)
    if distill:
        teacher = base_logits.detach().float().softmax(-1).reshape(-1, vocab)
        rec_loss = F.cross_entropy(module_logits.reshape(-1, vocab).float(), teacher)
    else:
        rec_loss = F.cross_entropy(module_logits.reshape(-1, vocab).float(), targets.reshape(-1))

    if feature_weight > 0:
        feature_loss = F.smooth_l1_loss(module_state.float(), model.final_state(hidden[:, :-1]).detach().float())
    else:
        feature_loss = torch.zeros((), device=input_ids.device)
    if frozen_base:
        loss = rec_weight * rec_loss + feature_weight * feature_loss
    else:
        loss = lm_loss + rec_weight * rec_loss + feature_weight * feature_loss
    return RecycleLosses(loss, lm_loss, rec_loss, feature_loss, base_logits, module_logits, targets)


# ------------------------------------------------------------------------------------------------
# Multi-step unrolled training over a frozen base (EAGLE-3's "training-time test", HASS).


@dataclass
class UnrolledLosses:
    """Per-depth losses of the module chained on its own states; depth 1 reads the true h[t-1]."""

    loss: torch.Tensor  # sum_k decay^(k-1) * loss_k / sum_k decay^(k-1)
    depth_losses: list[torch.Tensor]  # loss_k, k = 1..depth
    depth_agreement: list[torch.Tensor]  # fraction of valid positions where module argmax == base argmax
    depth_accuracy: list[torch.Tensor]  # fraction of valid positions where module argmax == x[t+1]


def _chain_attention(
    query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], depth: int
) -> torch.Tensor:
    """Attention of depth-``depth`` queries (0-based) over what the decoder's cache holds then.

    A draft at depth k and slot t was chained from slot t-k: the module's cache holds depth-0
    (true-state) keys at slots <= t-k and the chain's own keys, depth j at slot t-k+j (j = 1..k).
    query [B, H, T, hd]; keys/values[j] [B, H, T, hd] (GQA already expanded).
    """
    length = query.shape[2]
    scale = query.shape[-1] ** -0.5
    slots = torch.arange(length, device=query.device)
    scores = [(query @ keys[0].transpose(-1, -2)) * scale]
    visible = [slots[None, :] <= slots[:, None] - depth]  # [T, T]
    for j in range(1, depth + 1):
        shift = depth - j  # the depth-j key of this chain sits `shift` slots before the query
        key = torch.roll(keys[j], shifts=shift, dims=2)
        scores.append(((query * key).sum(-1, keepdim=True)) * scale)
        visible.append((slots >= shift)[:, None])
    scores_all = torch.cat(scores, dim=-1).float()
    mask = torch.cat(visible, dim=-1)  # [T, T + depth]
    probs = scores_all.masked_fill(~mask, float("-inf")).softmax(-1).to(query.dtype)
    out = probs[..., :length] @ values[0]
    for j in range(1, depth + 1):
        value = torch.roll(values[j], shifts=depth - j, dims=2)
        out = out + probs[..., length + j - 1 : length + j] * value
    return out


def unrolled_module_states(
    model: RecycleGPT, prev_hidden: torch.Tensor, input_ids: torch.Tensor, depth: int
) -> list[torch.Tensor]:
    """Module output states [B, T, d] at draft depths 1..``depth``, all positions in parallel.

    Depth 1 reads (h[t-1], x[t]) exactly as :meth:`RecycleGPT.module_hidden`. Depth k+1 reads the
    module's own depth-k state at t-1 instead of h[t-1] and attends as the speculative decoder's
    module does after k chained drafts (see :func:`_chain_attention`), so the state at depth k and
    slot t equals the decoder's k-th draft state when the drafts before it were right.
    """
    module = model.recycle
    config = model.config
    embeds = model.model.embed_tokens(input_ids)
    batch, length, _ = embeds.shape
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
    cos, sin = module.rotary(positions, embeds.dtype)
    groups = config.num_heads // config.num_kv_heads
    keys: list[list[torch.Tensor]] = [[] for _ in module.layers]
    values: list[list[torch.Tensor]] = [[] for _ in module.layers]
    states: list[torch.Tensor] = []
    prev = prev_hidden
    for k in range(depth):
        x = module.input_states(prev, embeds)
        for index, layer in enumerate(module.layers):
            attn = layer.self_attn
            normed = layer.input_layernorm(x)
            q = attn.q_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
            key = attn.k_proj(normed).view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            value = attn.v_proj(normed).view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
            keys[index].append(key.repeat_interleave(groups, dim=1))
            values[index].append(value.repeat_interleave(groups, dim=1))
            out = _chain_attention(q, keys[index], values[index], k)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        state = module.norm(x)
        states.append(state)
        prev = shift_hidden(state)
    return states


def unrolled_losses(
    model: RecycleGPT,
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    depth: int = 1,
    decay: float = 0.8,
    distill: bool = True,
    feature_weight: float = 0.0,
    full_vocab_agreement: bool = False,
    feature_noise: float = 0.0,
) -> UnrolledLosses:
    """Module losses at draft depths 1..``depth`` over a frozen base's states ``hidden`` [B, T, feature_width]
    (:meth:`RecycleGPT.base_hidden`).

    The module scores its draft vocabulary (all tokens when it has none). ``distill``: soft
    cross-entropy to the base's softmax renormalised over that vocabulary; else cross-entropy to
    x[t+1] (positions whose x[t+1] is outside the draft vocabulary are skipped). Depth k's first
    k-1 positions have no complete chain and are skipped. Agreement compares the module's argmax
    with the base's, over the draft vocabulary, or over the full one with ``full_vocab_agreement``.
    """
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per row, got {input_ids.shape[1]}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    hidden = hidden.to(model.lm_head.weight.dtype)
    final = model.final_state(hidden)
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    head = model.draft_head_weight()
    draft_ids = model.draft_ids
    with torch.no_grad():
        teacher = F.linear(final[:, :-1], head.detach()).float()  # [B, T-1, N]
        teacher_probs = teacher.softmax(-1) if distill else None
        if full_vocab_agreement or draft_ids is None:
            base_tokens = model.lm_head(final[:, :-1]).argmax(-1)
        else:
            base_tokens = draft_ids[teacher.argmax(-1)]
        if draft_ids is None:
            draft_targets, in_draft = targets, torch.ones_like(targets, dtype=torch.bool)
        else:
            in_draft = model.recycle.t2d[targets]
            draft_targets = (torch.cumsum(model.recycle.t2d.long(), 0) - 1)[targets].clamp(min=0)
    prev_hidden = shift_hidden(hidden)[:, :-1]
    if feature_noise > 0:
        scale = feature_noise * prev_hidden.float().pow(2).mean(-1, keepdim=True).sqrt()
        prev_hidden = prev_hidden + (scale * (2 * torch.rand_like(prev_hidden, dtype=torch.float) - 1)).to(hidden.dtype)
    states = unrolled_module_states(model, prev_hidden, inputs, depth)
    slots = torch.arange(inputs.shape[1], device=input_ids.device)
    depth_losses, agreement, accuracy = [], [], []
    for k, state in enumerate(states):
        logits = F.linear(state, head).float()  # [B, T-1, N]
        valid = (slots >= k).expand_as(targets)
        log_probs = logits.log_softmax(-1)
        if distill:
            per_token = -(teacher_probs * log_probs).sum(-1)
            loss = per_token[valid].mean()
        else:
            keep = valid & in_draft
            picked = log_probs.gather(-1, draft_targets.unsqueeze(-1)).squeeze(-1)
            loss = -(picked[keep]).sum() / keep.sum().clamp(min=1)
        if feature_weight > 0:
            feature = F.smooth_l1_loss(state.float(), final[:, :-1].float(), reduction="none").mean(-1)
            loss = loss + feature_weight * feature[valid].mean()
        depth_losses.append(loss)
        with torch.no_grad():
            tokens = logits.argmax(-1) if draft_ids is None else draft_ids[logits.argmax(-1)]
            agreement.append((tokens == base_tokens)[valid].float().mean())
            accuracy.append((tokens == targets)[valid].float().mean())
    weights = [decay**k for k in range(depth)]
    total = sum(w * loss for w, loss in zip(weights, depth_losses, strict=True)) / sum(weights)
    return UnrolledLosses(total, depth_losses, agreement, accuracy)
