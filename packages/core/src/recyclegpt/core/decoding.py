"""The three decoders: standard, alternating (the paper's) and speculative (lossless).

Conventions: the base's KV cache holds positions 0..n-1; ``hidden`` is the base's final state
h[n-1] that predicted the pending token x[n]. The module at position t reads (h[t-1], x[t]) and
predicts x[t+1]; its KV cache covers every position, exactly as in training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recyclegpt.core.draft_tree import MAX_TREE_NODES, TREE_TOP_K, grow_tree
from recyclegpt.core.losses import shift_hidden
from recyclegpt.core.model import KVCache, RecycleGPT
from recyclegpt.core.sampling import SamplingParams, greedy_tokens, sample, token_probs
from recyclegpt.core.speculation import DRAFT_POLICIES, DraftPlanner, draft_planner, remember_acceptance, step_costs

DECODING_MODES = ("standard", "alternating", "speculative")


@dataclass
class GenerationOutput:
    """Prompt plus new tokens, and what it cost."""

    sequences: torch.Tensor  # [B, prompt + new]
    full_model_calls: int = 0
    module_calls: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prompt_length: int = 0
    # With output_hidden_states: the base's states [B, length - 1, feature_width] of every token it read
    # (all but the last), computed as it decoded; slots after a row's EOS hold the states of the
    # tokens it wrote there, before they were replaced by padding.
    hidden_states: torch.Tensor | None = None

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


def validate_generation_args(
    model: RecycleGPT,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    decoding: str,
    draft_length: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    """Raise ValueError naming the first bad argument."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    context = model.config.max_seq_len
    if input_ids.shape[1] + max_new_tokens > context:
        raise ValueError(
            f"prompt length ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's context of {context} tokens"
        )
    if decoding not in DECODING_MODES:
        raise ValueError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {decoding!r}")
    if not isinstance(draft_length, int) or draft_length < 1:
        raise ValueError(f"draft_length must be an integer >= 1, got {draft_length!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= model.config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {model.config.vocab_size}), the model's vocabulary")


def _check_draft_policy(draft_policy: str) -> None:
    if draft_policy not in DRAFT_POLICIES:
        raise ValueError(f"draft_policy must be one of {', '.join(DRAFT_POLICIES)}, got {draft_policy!r}")


def _widest_verify(draft_length: int, tree: bool) -> int:
    """Tokens in the widest verify step a planned speculative call may take (a tree verifies more)."""
    return max(draft_length, MAX_TREE_NODES) + 1 if tree else draft_length + 1


def warm_up_speculation(model: RecycleGPT, draft_length: int = 4, draft_policy: str = "adaptive") -> None:
    """Measure now the step costs that ``speculative`` calls with this draft length and policy plan
    with, which their first call would otherwise measure (for SmolLM2 on one AVX2 core 1.5-2.8 s, more
    than the call's own decoding); a server does this before it reports ready."""
    _check_draft_policy(draft_policy)
    if draft_policy != "fixed":
        step_costs(model, _widest_verify(draft_length, draft_policy == "tree"))


@torch.inference_mode()
def generate(
    model: RecycleGPT,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    decoding: str = "standard",
    draft_length: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    on_tokens: Callable[[torch.Tensor], bool | None] | None = None,
    draft_policy: str = "adaptive",
    output_hidden_states: bool = False,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, P].

    ``standard``: the full model, token by token. ``alternating``: a full-model call, then a
    module call, so each full call yields two tokens (lossy, the paper's). ``speculative``: the
    module drafts ``draft_length`` tokens, the full model verifies them in one forward; output
    equals ``standard`` (greedy) or follows its distribution (sampling). Batches need left
    padding described by ``attention_mask`` (1 = token, 0 = padding); rows that emit
    ``eos_token_id`` are padded with ``pad_token_id`` (default: the EOS id) afterwards.
    ``on_tokens`` is called with each group of tokens [B, k] as soon as it is accepted (streaming);
    when it returns True, decoding stops there and the output so far is returned.
    ``draft_policy``: ``adaptive`` drafts as far as pays on this machine (measured step costs,
    acceptance seen so far in this and earlier calls, the module's confidence; at most
    ``draft_length``); ``fixed`` always drafts ``draft_length`` tokens; ``tree`` drafts a tree of
    the module's top guesses (depth <= ``draft_length``) and verifies as many of its nodes as pay
    (:mod:`recyclegpt.core.draft_tree`), greedy only: a sampling call drafts as ``adaptive`` does.
    """
    _check_draft_policy(draft_policy)
    validate_generation_args(model, input_ids, max_new_tokens, decoding, draft_length, temperature, top_k, top_p)
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if output_hidden_states and decoding != "standard":
        raise ValueError(f"output_hidden_states needs decoding='standard', got {decoding!r}")
    if decoding == "speculative" and input_ids.shape[0] > 1:
        raise ValueError("decoding='speculative' supports batch size 1; use standard or alternating for batches")
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    params = SamplingParams(temperature, top_k, top_p, generator)
    lookahead = draft_length if decoding == "speculative" else 1
    if decoding == "speculative" and draft_policy == "tree":  # room for a whole tree in both caches
        lookahead = max(draft_length, MAX_TREE_NODES, TREE_TOP_K * draft_length)
    state = _DecodeState(model, input_ids, attention_mask, max_new_tokens, lookahead, on_tokens)
    if decoding == "standard":
        _standard(state, params, eos_token_id, output_hidden_states)
    elif decoding == "alternating":
        _alternating(state, params, eos_token_id)
    else:
        # A seeded sampling call plans from the prior and the costs as measured, so that it repeats
        # whatever ran before it.
        remember = params.greedy or seed is None
        tree = draft_policy == "tree" and params.greedy
        planner = (
            draft_planner(model, draft_length, remember, _widest_verify(draft_length, tree))
            if draft_policy != "fixed"
            else None
        )
        _speculative(state, params, eos_token_id, draft_length, planner, tree)
        if planner is not None and remember:
            remember_acceptance(model, planner)
    return state.finish(pad_token_id if pad_token_id is not None else eos_token_id)


class _DecodeState:
    """Caches, positions and the growing output shared by the decoders."""

    def __init__(
        self,
        model: RecycleGPT,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        lookahead: int,
        on_tokens: Callable[[torch.Tensor], bool | None] | None = None,
    ) -> None:
        self.model = model
        self.on_tokens = on_tokens
        self.stopped = False  # set when on_tokens asks to stop
        self.batch, self.prompt_length = input_ids.shape
        self.max_new_tokens = max_new_tokens
        device = input_ids.device
        # Room for the prompt, the new tokens and the last (partly rejected) draft.
        capacity = min(self.prompt_length + max_new_tokens + lookahead + 1, model.config.max_seq_len)
        self.base_cache = model.new_cache("base", self.batch, capacity)
        self.module_cache: KVCache | None = None
        self.capacity = capacity
        self.tokens = torch.zeros(
            self.batch, self.prompt_length + max_new_tokens + lookahead + 1, dtype=torch.long, device=device
        )
        self.tokens[:, : self.prompt_length] = input_ids
        self.length = self.prompt_length  # tokens written so far (prompt + new)
        self.slot_positions: torch.Tensor | None = None
        self.padding_mask: torch.Tensor | None = None
        if attention_mask is not None and bool((attention_mask == 0).any()):
            self.padding_mask = attention_mask.to(device)
            self.base_cache.set_padding(self.padding_mask)
            # Rotary positions count real tokens only, so a left-padded row decodes as if unpadded.
            prompt_positions = (self.padding_mask.long().cumsum(-1) - 1).clamp(min=0)
            later = torch.arange(1, self.tokens.shape[1] - self.prompt_length + 1, device=device)
            self.slot_positions = torch.cat((prompt_positions, prompt_positions[:, -1:] + later), dim=1)
        # Kept on the host: a few tensor operations per token cost ~50 us on a CPU, a sizeable share
        # of a small model's step (and ``done`` reads them back every step anyway).
        self.finished = [False] * self.batch
        self.eos_at = [-1] * self.batch  # slot of each row's first EOS
        self.out = GenerationOutput(sequences=input_ids, prompt_length=self.prompt_length)

    @property
    def num_new(self) -> int:
        return self.length - self.prompt_length

    @property
    def done(self) -> bool:
        return self.stopped or self.num_new >= self.max_new_tokens or all(self.finished)

    def positions(self, start: int, count: int) -> torch.Tensor | None:
        """Rotary positions of slots start..start+count-1 (None: the slot indices themselves)."""
        if self.slot_positions is None:
            return None
        return self.slot_positions[:, start : start + count]

    def base_step(self, start: int, count: int, features: bool = True) -> torch.Tensor:
        """Run the base on slots start..start+count-1 (its cache must end at start); hidden states
        (h alone with ``features=False``: see :meth:`RecycleGPT.base_hidden`)."""
        self.out.full_model_calls += 1
        ids = self.tokens[:, start : start + count]
        return self.model.base_hidden(ids, self.positions(start, count), self.base_cache, features=features)

    def module_step(self, prev_hidden: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """Run the module on slots start..start+count-1 with the given h[t-1]; output states."""
        if self.module_cache is None:
            self.module_cache = self.model.new_cache("module", self.batch, self.capacity)
            if self.padding_mask is not None:
                self.module_cache.set_padding(self.padding_mask)
        self.out.module_calls += 1
        ids = self.tokens[:, start : start + count]
        return self.model.module_hidden(prev_hidden, ids, self.positions(start, count), self.module_cache)

    def prompt_prev_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """h[t-1] for every prompt slot: zeros at the first real token and on padding."""
        prev = shift_hidden(hidden)
        if self.padding_mask is not None:
            has_prev = shift_hidden(self.padding_mask.unsqueeze(-1))  # was the slot before a real token?
            prev = prev * has_prev.to(prev.dtype)
        return prev

    def append(self, new_tokens: torch.Tensor, eos_token_id: int | None) -> None:
        """Write tokens [B, k] at the end; note rows that reach EOS."""
        count = min(new_tokens.shape[1], self.max_new_tokens - self.num_new)
        if count < new_tokens.shape[1]:
            new_tokens = new_tokens[:, :count]
        self.tokens[:, self.length : self.length + count] = new_tokens
        if eos_token_id is not None:
            for row, tokens in enumerate(new_tokens.tolist()):
                if not self.finished[row] and eos_token_id in tokens:
                    self.eos_at[row] = self.length + tokens.index(eos_token_id)
                    self.finished[row] = True
        self.length += count
        if self.on_tokens is not None and self.on_tokens(new_tokens):
            self.stopped = True

    def finish(self, pad_token_id: int | None) -> GenerationOutput:
        sequences = self.tokens[:, : self.length].clone()
        if pad_token_id is not None:
            slots = torch.arange(self.length, device=sequences.device).unsqueeze(0)
            eos_at = torch.tensor(self.eos_at, device=sequences.device).unsqueeze(1)
            after_eos = (eos_at >= 0) & (slots > eos_at)
            sequences[after_eos] = pad_token_id
        self.out.sequences = sequences
        return self.out


def _standard(state: _DecodeState, params: SamplingParams, eos_token_id: int | None, keep_hidden: bool = False) -> None:
    model = state.model
    hidden = state.base_step(0, state.prompt_length, features=keep_hidden)  # no module reads them here
    kept = [hidden] if keep_hidden else []
    while True:
        state.append(_next_token(model, hidden[:, -1], params).unsqueeze(1), eos_token_id)
        if state.done:
            break
        hidden = state.base_step(state.length - 1, 1, features=keep_hidden)
        if keep_hidden:
            kept.append(hidden)
    if keep_hidden:
        state.out.hidden_states = torch.cat(kept, dim=1)


def _alternating(state: _DecodeState, params: SamplingParams, eos_token_id: int | None) -> None:
    """Full call (prompt, or the last two tokens) -> token; module call -> one more token."""
    model = state.model
    hidden = state.base_step(0, state.prompt_length)
    state.append(_next_token(model, hidden[:, -1], params).unsqueeze(1), eos_token_id)
    if state.done:
        return
    # Module catch-up over the prompt (zero state before the first token) plus the new token.
    prev = torch.cat((state.prompt_prev_hidden(hidden), hidden[:, -1:]), dim=1)
    module_state = state.module_step(prev, 0, state.length)
    while True:
        if params.greedy:
            draft = model.greedy_draft_token(module_state[:, -1])
        else:
            draft = sample(model.draft_logits(module_state[:, -1]), params)
        state.append(draft.unsqueeze(1), eos_token_id)
        if state.done:
            return
        hidden = state.base_step(state.length - 2, 2)
        state.append(_next_token(model, hidden[:, -1], params).unsqueeze(1), eos_token_id)
        if state.done:
            return
        # The module covers the two slots the full call just read, each with its true h[t-1].
        module_state = state.module_step(hidden, state.length - 2, 2)


def _speculative(
    state: _DecodeState,
    params: SamplingParams,
    eos_token_id: int | None,
    draft_length: int,
    planner: DraftPlanner | None = None,
    tree: bool = False,
) -> None:
    """Draft with the module, verify with the base in one forward, roll back the rejected tail.

    Without a ``planner`` every cycle drafts ``draft_length`` tokens; with one, each cycle drafts
    as far as the planner expects to pay (possibly none: a plain standard step). With ``tree`` (greedy,
    with a planner) a cycle that drafts drafts a tree instead of a chain (:func:`_tree_cycle`). The
    planner's step costs learn from the time each draft and each verification takes here.
    """
    model = state.model
    out = state.out
    costs = planner.costs if planner is not None and planner.costs.learning else None
    prompt_hidden = state.base_step(0, state.prompt_length)
    hidden_log = torch.zeros(
        1, state.tokens.shape[1], model.config.feature_width, dtype=prompt_hidden.dtype, device=prompt_hidden.device
    )
    hidden_log[:, : state.prompt_length] = prompt_hidden
    state.append(_next_token(model, prompt_hidden[:, -1], params).unsqueeze(1), eos_token_id)
    module_done = 0  # the module cache holds slots 0..module_done-1, computed from true states
    greedy = params.greedy
    while not state.done:
        pending = state.length - 1  # slot of the token the base has not yet seen
        limit = min(draft_length, state.max_new_tokens - state.num_new - 1)  # +1 comes from the base
        depth = planner.plan(limit) if planner is not None else limit
        if planner is not None and depth > 0 and not planner.probing:
            depth = limit  # how far is decided draft by draft, from the module's confidence
        started = time.perf_counter()
        # The first draft's time is a cycle's cost when its catch-up is a cycle's: not over a whole
        # prompt, nor over every token of a stretch of standard steps.
        steady = 0 < module_done and pending + 1 - module_done <= draft_length + 1
        if depth > 0:
            # Catch the module up on true states h[module_done-1 .. pending-1]; drafts chain its own.
            prev = hidden_log[:, max(module_done - 1, 0) : pending]
            if module_done == 0:
                prev = torch.cat((torch.zeros_like(prev[:, :1]), prev), dim=1)
            module_state = state.module_step(prev, module_done, pending + 1 - module_done)[:, -1:]
            module_done = pending + 1
        if tree and depth > 0 and not planner.probing:
            new = _tree_cycle(state, planner, module_state, pending, depth, hidden_log)
            state.module_cache.rollback(module_done)
            state.append(new, eos_token_id)
            continue
        chain_confidence = 1.0
        draft_tokens: list[torch.Tensor] = []
        draft_probs: list[torch.Tensor] = []
        confidences: list[float] = []  # the module's probability of each draft (adaptive only)
        dropped = False  # the planner judged the last draft not worth verifying
        if depth > 0:
            for step in range(depth):
                if greedy:
                    token, top = model.greedy_draft(module_state[:, -1])
                    probs = None
                else:
                    probs = token_probs(model.draft_logits(module_state[:, -1]), params)
                    token = torch.multinomial(probs, 1, generator=params.generator)[:, 0]
                if planner is not None:
                    confidence = float(top[0] if probs is None else probs[0, token])
                    if costs is not None and (step > 0 or steady):  # float() waited for the draft
                        costs.observe_module(1e3 * (time.perf_counter() - started), first=step == 0)
                    # A draft costs until the next one is picked, its bookkeeping here included (on the
                    # demo model ~20% of a module step: left out, drafts looked cheaper than they are).
                    started = time.perf_counter()
                    chain_confidence *= planner.calibrated(confidence)
                    # Too unsure to verify at all (greedy: a sampled draft passes with chance
                    # min(1, p/q), which a low q says little about), or (past the first draft, which
                    # the plan paid for) not worth its verified row: the draft is dropped.
                    if (greedy and not planner.confident(confidence)) or (
                        step > 0 and not planner.worth_verifying(step + 1, chain_confidence)
                    ):
                        dropped = True
                        break
                draft_tokens.append(token)
                if planner is not None:
                    confidences.append(confidence)
                if probs is not None:
                    draft_probs.append(probs)
                state.tokens[:, pending + 1 + step] = token
                if step + 1 >= depth or (planner is not None and not planner.keep_drafting(step + 1, chain_confidence)):
                    break
                module_state = state.module_step(module_state, pending + 1 + step, 1)
            out.drafted_tokens += len(draft_tokens)
        # Verify: the base reads the pending token and every draft in one forward.
        started = time.perf_counter()
        verify_hidden = state.base_step(pending, len(draft_tokens) + 1)
        if greedy:  # the head and its greedy pick in one call where the fast path can
            accepted, next_token = _verify_greedy(model.greedy_base_token(verify_hidden[0]), draft_tokens)
        else:
            accepted, next_token = _verify(model.base_logits(verify_hidden[0]), draft_tokens, draft_probs, params)
        if costs is not None:
            costs.observe_base(len(draft_tokens) + 1, _elapsed_ms(started, next_token))
        out.accepted_tokens += accepted
        if planner is not None and depth > 0:
            planner.observe(len(draft_tokens), accepted, dropped, confidences)
        hidden_log[:, pending : pending + accepted + 1] = verify_hidden[:, : accepted + 1]
        state.base_cache.rollback(pending + accepted + 1)
        if state.module_cache is not None:
            state.module_cache.rollback(min(module_done, state.module_cache.length))
        new = torch.cat([*draft_tokens[:accepted], next_token.view(1)]).view(1, -1)
        state.append(new, eos_token_id)


def _tree_cycle(
    state: _DecodeState,
    planner: DraftPlanner,
    module_state: torch.Tensor,
    pending: int,
    max_depth: int,
    hidden_log: torch.Tensor,
) -> torch.Tensor:
    """One greedy cycle with a draft tree: grow it, verify the nodes that pay in one tree-attention
    forward, keep the accepted path in the base cache and ``hidden_log``; the new tokens [1, k]."""
    model, out, costs = state.model, state.out, planner.costs
    draft = grow_tree(model, state.module_cache, module_state, pending, max_depth, planner.calibrated, costs)
    out.module_calls += draft.module_steps
    room = state.base_cache.max_len - pending - 1
    chosen = draft.choose(costs, costs.drafting_ms(draft.module_steps + 1), min(MAX_TREE_NODES, room))
    device = module_state.device
    ids = torch.tensor([[int(state.tokens[0, pending]), *(draft.tokens[n] for n in chosen)]], device=device)
    positions = torch.tensor([[pending, *(pending + draft.depths[n] for n in chosen)]], device=device)
    out.full_model_calls += 1
    started = time.perf_counter()
    verify_hidden = model.base_hidden(ids, positions, state.base_cache, tree=draft.visibility(chosen).to(device))
    targets = model.greedy_base_token(verify_hidden[0]).tolist()
    costs.observe_base(len(chosen) + 1, _elapsed_ms(started, verify_hidden))
    path = draft.accept(chosen, targets)
    out.drafted_tokens += len(chosen)
    out.accepted_tokens += len(path)
    # Teach the planner: every node whose parent was accepted (or is the pending token) was tested, once.
    accepted_nodes = [chosen[row - 1] for row in path]
    tested_parents = {-1, *accepted_nodes}
    for node in chosen:
        if draft.parents[node] in tested_parents:
            planner.calibration.observe(draft.probabilities[node], node in accepted_nodes)
    if chosen:
        last = accepted_nodes[-1] if accepted_nodes else -1
        deeper = any(draft.parents[n] == last for n in chosen)  # was a child of the last accepted node verified?
        planner.observe(len(path) + int(deeper), len(path), dropped=False)
    else:
        planner.observe(0, 0, dropped=True)  # no node was worth its row: as a chain's dropped first draft
    rows = torch.tensor([0, *path], device=device)
    hidden_log[:, pending : pending + len(path) + 1] = verify_hidden[:, rows]
    state.base_cache.keep(pending + 1, pending + rows[1:])
    return torch.tensor([[*(draft.tokens[n] for n in accepted_nodes), targets[path[-1] if path else 0]]], device=device)


def _elapsed_ms(started: float, result: torch.Tensor) -> float:
    """Milliseconds since ``started`` (a ``perf_counter``) until ``result`` is computed. (A chain
    verification without drafts reads nothing back, so on a GPU its kernels may still be running.)"""
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return 1e3 * (time.perf_counter() - started)


def _next_token(model: RecycleGPT, hidden: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The base's next token [B] from its states [B, feature_width]."""
    return model.greedy_base_token(hidden) if params.greedy else sample(model.base_logits(hidden), params)


def _verify_greedy(targets: torch.Tensor, draft_tokens: list[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Accepted draft count and the token that follows them, from the base's greedy tokens [depth+1]."""
    accepted = 0
    for token in draft_tokens:
        if int(token) != int(targets[accepted]):
            break
        accepted += 1
    return accepted, targets[accepted]


def _verify(
    base_logits: torch.Tensor,
    draft_tokens: list[torch.Tensor],
    draft_probs: list[torch.Tensor],
    params: SamplingParams,
) -> tuple[int, torch.Tensor]:
    """Accepted draft count and the token that follows them (batch 1)."""
    if params.greedy:
        return _verify_greedy(greedy_tokens(base_logits), draft_tokens)
    base_probs = token_probs(base_logits, params)  # [depth+1, V]
    for i, token in enumerate(draft_tokens):
        p, q = base_probs[i], draft_probs[i][0]
        t = int(token)
        accept_prob = min(1.0, float(p[t]) / max(float(q[t]), 1e-20))
        u = float(torch.rand((), generator=params.generator, device=p.device))
        if u >= accept_prob:
            residual = (p - q).clamp(min=0)
            total = residual.sum()
            residual = residual / total if float(total) > 0 else p
            return i, torch.multinomial(residual, 1, generator=params.generator)[0]
    last = base_probs[len(draft_tokens)]
    return len(draft_tokens), torch.multinomial(last, 1, generator=params.generator)[0]
