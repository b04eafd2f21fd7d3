"""The RecycleGPT model: a Llama-family decoder plus a recyclable module, in one readable file.

Module names follow transformers' ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj`` ...),
so a Llama checkpoint's state dict loads into the base unchanged. The recyclable module lives
under ``recycle.*``.

Shapes: B batch, T new tokens, L cached + new tokens, d hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from recyclegpt.core.config import RecycleConfig
from recyclegpt.core.sampling import greedy_tokens

if TYPE_CHECKING:
    from recyclegpt.core.decoding import GenerationOutput


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    @classmethod
    def from_norm(cls, norm: RMSNorm) -> RMSNorm:
        """A norm of this class over ``norm``'s own weight (shared, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight, new.eps = norm.weight, norm.eps
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, round to x's dtype, then scale: transformers' LlamaRMSNorm to the bit
        # (F.rms_norm alone scales before rounding, which differs in bf16).
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, indexed by absolute position (rotate-half convention)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> cos, sin [B, 1, T, head_dim]
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def span(self, start: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of positions start..start+count-1 for every row: views of the tables, [1, 1, T,
        head_dim] (indexing by a position tensor costs ~20 us a table on a CPU: a sizeable share of a
        small model's decode step)."""
        cos, sin = self.cos.narrow(0, start, count)[None, None], self.sin.narrow(0, start, count)[None, None]
        return (cos, sin) if cos.dtype == dtype else (cos.to(dtype), sin.to(dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values of a stack of layers.

    ``length`` positions are valid; ``rollback(n)`` discards everything after position n (the
    speculative decoder uses it to drop rejected drafts). ``key_valid`` marks left padding.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.length = 0
        self.max_len = max_len

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Mark the positions of a left-padded prompt (0 = padding) as invalid keys."""
        width = attention_mask.shape[1]
        self.key_valid[:, :width] = attention_mask.bool()
        self.has_padding = bool((attention_mask == 0).any())

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of length {self.length} to {length}")
        self.length = length

    def keep(self, start: int, slots: torch.Tensor) -> None:
        """Keep the entries at ``slots`` (ascending, each >= ``start``) as positions start, start + 1, ...
        and drop everything after them (the path of a draft tree that verification accepted)."""
        count = slots.numel()
        if count and (int(slots[0]) < start or int(slots[-1]) >= self.length):
            raise ValueError(f"slots must lie in [{start}, {self.length}), got {slots.tolist()}")
        # Every layer at once; the gather copies before the write, so overlapping ranges are safe.
        self.keys[:, :, :, start : start + count] = self.keys[:, :, :, slots]
        self.values[:, :, :, start : start + count] = self.values[:, :, :, slots]
        self.length = start + count


def attention_mask_for(
    cache: KVCache | None, start: int, num_new: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """Additive [B or 1, 1, T, L] mask in ``dtype`` (0 = attend, -inf = masked), or None when plain
    causal attention is exact. Built once per step (a boolean mask would be converted by every layer's
    attention: ~3 us a layer on CPU)."""
    if cache is None:
        return None
    if num_new == 1 and not cache.has_padding:
        return None
    total = start + num_new
    # Query i (position start + i) sees keys 0..start + i: -inf strictly above that diagonal.
    mask = torch.full((num_new, total), float("-inf"), dtype=dtype, device=device).triu_(start + 1)
    if not cache.has_padding:
        return mask[None, None]
    # A padded query still attends to itself, so no softmax row is empty (which would give NaN).
    own = torch.arange(total, device=device)[None, :] == torch.arange(start, total, device=device)[:, None]
    hidden = ~cache.key_valid[:, None, None, :total] & ~own
    return mask.masked_fill(hidden, float("-inf"))


def tree_attention_mask(start: int, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, T, start + T] mask for T new tokens that form a tree (a draft tree): ``visible``
    [T, W] (bool) says which of the last W keys, the T new ones last, each new token attends to; every
    earlier key is visible to all of them. Batch 1, no padding."""
    num_new, width = visible.shape
    total = start + num_new
    if width < num_new or width > total:
        raise ValueError(f"tree visibility must cover between {num_new} and {total} keys, got {width}")
    mask = torch.zeros((num_new, total), dtype=dtype, device=visible.device)
    mask[:, total - width :].masked_fill_(~visible, float("-inf"))
    return mask[None, None]


class Attention(nn.Module):
    def __init__(self, config: RecycleConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def rotated_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, heads, T, head_dim], queries and keys rotated (one fused
        matmul and one rotation in core.fastpath)."""
        batch, num_new, _ = x.shape
        q = self.q_proj(x).view(batch, num_new, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer_index: int,
    ) -> torch.Tensor:
        batch, num_new, _ = x.shape
        q, k, v = self.rotated_qkv(x, cos, sin)
        if cache is not None:
            start, end = cache.length, cache.length + num_new
            keys, values = cache.keys[layer_index], cache.values[layer_index]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            k, v = keys[:, :, :end], values[:, :, :end]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=cache is None and mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_new, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: RecycleConfig, intermediate_size: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, intermediate_size)

    @classmethod
    def from_layer(cls, layer: DecoderLayer) -> DecoderLayer:
        """A layer of this class over ``layer``'s own submodules (the same weights, not copies)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in layer.named_children():
            setattr(new, name, child)
        return new

    def forward(self, x, cos, sin, mask, cache, layer_index):  # noqa: ANN001, ANN201 - hot path
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_index)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Decoder layers over their own rotary table and KV cache; returns pre-norm states."""

    def __init__(self, config: RecycleConfig, num_layers: int, intermediate_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config, intermediate_size) for _ in range(num_layers))
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.kept_layers: frozenset[int] = frozenset()
        # Set by the fast path (recyclegpt.core.step_kernels.WholeStackStep): runs every layer of a
        # decode step in one call where it can, else returns None; its whole_step runs a decode step
        # (padded or at explicit positions too) from token ids to final states (the stack's forward) in one call.
        self.layers_step: Callable | None = None

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None,
        cache: KVCache | None,
        tree: torch.Tensor | None = None,
        kept: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``tree``: the new tokens' visibility over the cache's last keys (:func:`tree_attention_mask`)
        instead of causal attention; needs a cache and the tokens' positions. ``kept``: receives the
        output of each layer in ``kept_layers``, in order."""
        num_new = x.shape[1]
        start = cache.length if cache is not None else 0
        if positions is None:
            cos, sin = self.rotary.span(start, num_new, x.dtype)
        else:
            cos, sin = self.rotary(positions, x.dtype)
        if tree is not None:
            if cache is None or cache.has_padding or x.shape[0] != 1:
                raise ValueError("tree attention needs a KV cache and one unpadded row")
            mask = tree_attention_mask(start, tree, x.dtype)
        elif cache is not None and cache.has_padding:
            mask = attention_mask_for(cache, start, num_new, x.device, x.dtype)
        else:
            mask = None  # causal: a one-call step attends causally over the cache without a mask tensor
        if self.layers_step is not None and (kept is None or not self.kept_layers):
            out = self.layers_step(x, cos, sin, mask, cache)
            if out is not None:
                cache.length = start + num_new
                return out
        if mask is None:
            mask = attention_mask_for(cache, start, num_new, x.device, x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, index)
            if kept is not None and index in self.kept_layers:
                kept.append(x)
        if cache is not None:
            cache.length = start + num_new
        return x


class LlamaBackbone(DecoderStack):
    """The base decoder: token embeddings, decoder layers and the final norm."""

    def __init__(self, config: RecycleConfig) -> None:
        super().__init__(config, config.num_layers, config.intermediate_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.kept_layers = frozenset(config.feature_layers)

    def forward(self, input_ids, positions=None, cache=None, tree=None, kept=None) -> torch.Tensor:  # noqa: ANN001
        step = self.layers_step
        if step is not None and tree is None and kept is None:
            out = step.whole_step(input_ids, cache, None, positions)  # a decode step in one call, where it can be
            if out is not None:
                return out
        return self.norm(self.run_layers(self.embed_tokens(input_ids), positions, cache, tree, kept))


class RecyclableModule(DecoderStack):
    """Predicts x[t+1] from the base's last hidden state h[t-1] and the embedding of x[t]."""

    def __init__(self, config: RecycleConfig) -> None:
        super().__init__(config, config.module_layers, config.module_intermediate_size)
        # EAGLE-3's fused features: the base's final state and its feature layers' outputs, projected
        # to one state. The module's own states (chained drafts) enter fc as they are.
        self.fuse = nn.Linear(config.feature_width, config.hidden_size, bias=False) if config.feature_layers else None
        self.hidden_size = config.hidden_size
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.draft_vocab_size is not None:
            # EAGLE-3's tables: draft index i is token i + d2t[i]; t2d[token] marks draft tokens.
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    def forward(self, prev_hidden, token_embeds, positions=None, cache=None, tree=None) -> torch.Tensor:  # noqa: ANN001
        return self.norm(self.run_layers(self.input_states(prev_hidden, token_embeds), positions, cache, tree))

    def input_states(self, prev_hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """The first layer's input from ``prev_hidden``: the base's states at t-1 ([..., feature_width],
        fused first when the module has feature layers) or the module's own state there ([..., d])."""
        if self.fuse is not None and prev_hidden.shape[-1] != self.hidden_size:
            prev_hidden = self.fuse(prev_hidden)
        return self.fc(torch.cat((prev_hidden, token_embeds), dim=-1))


class RecycleGPT(nn.Module):
    """A Llama-family causal LM with a recyclable module that shares its embeddings and LM head."""

    def __init__(self, config: RecycleConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.recycle = RecyclableModule(config)
        self.tokenizer: Any = None
        # Set by the fast path (recyclegpt.core.step_kernels.HeadPick): a head's logits and greedy
        # tokens in one call where it can, else None.
        self.head_pick: Callable | None = None
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # ----------------------------------------------------------------------------- parameters
    def base_parameters(self) -> list[nn.Parameter]:
        """Parameters of the full model (embeddings and LM head included)."""
        module_ids = {id(p) for p in self.recycle.parameters()}
        return [p for p in self.parameters() if id(p) not in module_ids]

    def freeze_base(self) -> None:
        """Frozen-base mode: only the recyclable module (``recycle.*``) keeps gradients."""
        for p in self.base_parameters():
            p.requires_grad_(False)

    def num_parameters(self, part: str = "all") -> int:
        params = {
            "all": list(self.parameters()),
            "base": self.base_parameters(),
            "module": list(self.recycle.parameters()),
        }[part]
        return sum(p.numel() for p in params)

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Base logits [B, T, V] (no cache), as ``LlamaForCausalLM(...).logits``."""
        return self.lm_head(self.model(input_ids))  # the backbone alone keeps no feature layers

    def base_hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        tree: torch.Tensor | None = None,
        features: bool = True,
    ) -> torch.Tensor:
        """The base's states the module reads [B, T, feature_width]: its final (normed) hidden states h
        [B, T, d], the input of the LM head (:meth:`final_state`, :meth:`base_logits`), followed, with
        ``feature_layers``, by the RMS-normalised outputs of those layers (not with ``features=False``:
        h alone, for a caller that only needs the base's logits). ``tree``: see
        :meth:`DecoderStack.run_layers`."""
        if not self.config.feature_layers or not features:
            return self.model(input_ids, positions, cache, tree)
        kept: list[torch.Tensor] = []
        final = self.model(input_ids, positions, cache, tree, kept)
        eps = self.config.rms_norm_eps
        return torch.cat(
            (final, *(x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) for x in kept)), dim=-1
        )

    def final_state(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's input h [..., d] of :meth:`base_hidden`'s states (a view, or the states
        themselves where they are h alone: slicing costs ~1 us, a share of a small model's step)."""
        width = self.config.hidden_size
        return hidden if hidden.shape[-1] == width else hidden[..., :width]

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's logits [..., V] from :meth:`base_hidden`'s states."""
        return self.lm_head(self.final_state(hidden))

    def greedy_base_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's greedy token [...] from :meth:`base_hidden`'s states: the argmax of
        :meth:`base_logits` (the first index among equal maxima)."""
        return self._pick(self.lm_head, self.final_state(hidden))[1]

    def _pick(self, head: nn.Module | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, their argmax) of ``head`` over ``x`` (:meth:`_head_logits`): one call where the
        fast path's ``head_pick`` takes it, else the logits and :func:`greedy_tokens`."""
        pick = self.head_pick
        if pick is not None and head is not None:
            found = pick(head, x)
            if found is not None:
                return found[0], found[1]
        logits = self._head_logits(head, x)
        return logits, greedy_tokens(logits)

    def _head_logits(self, head: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """``head(x)``; no head (:meth:`_draft_head`): ``F.linear`` over :meth:`draft_head_weight`."""
        return head(x) if head is not None else F.linear(x, self.draft_head_weight())

    def module_hidden(
        self,
        prev_hidden: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The module's output state at position t from the base's states at t-1 [B, T, feature_width]
        (or its own state there [B, T, d]) and x[t] [B, T]."""
        step = self.recycle.layers_step
        if step is not None and tree is None:
            out = step.whole_step(input_ids, cache, prev_hidden, positions)  # a decode step in one call
            if out is not None:
                return out
        return self.recycle(prev_hidden, self.model.embed_tokens(input_ids), positions, cache, tree)

    def new_cache(self, part: str, batch_size: int, max_len: int) -> KVCache:
        """A preallocated KV cache for the ``base`` or the ``module``."""
        num_layers = self.config.num_layers if part == "base" else self.config.module_layers
        weight = self.model.norm.weight  # the compute dtype, also when the linears hold int8 weights
        return KVCache(
            num_layers, batch_size, self.config.num_kv_heads, max_len, self.config.head_dim, weight.dtype, weight.device
        )

    # ----------------------------------------------------------------------------- draft vocabulary
    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Let the module score only ``token_ids`` (e.g. the most frequent tokens of the training data)."""
        ids = torch.unique(token_ids.long().flatten().cpu())  # sorted
        vocab = self.config.vocab_size
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= vocab:
            raise ValueError(f"draft token ids must be a non-empty subset of [0, {vocab})")
        device = self.lm_head.weight.device
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[ids] = True
        self.recycle.register_buffer("d2t", (ids - torch.arange(ids.numel())).to(device))
        self.recycle.register_buffer("t2d", t2d.to(device))
        self.config.draft_vocab_size = ids.numel()
        self._draft_weight = None

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """Full-vocabulary id of every draft index [N], or None when the module scores every token."""
        if self.config.draft_vocab_size is None:
            return None
        d2t = self.recycle.d2t
        return d2t + torch.arange(d2t.numel(), device=d2t.device)

    def draft_head_weight(self) -> torch.Tensor:
        """The LM head rows of the draft vocabulary [N, d] (a cached copy while the head is frozen)."""
        weight = self.lm_head.weight
        if self.config.draft_vocab_size is None:
            return weight
        if weight.requires_grad and torch.is_grad_enabled():
            return weight[self.draft_ids]
        return self._cached_draft_rows(lambda: weight.detach()[self.draft_ids].contiguous())

    def _cached_draft_rows(self, build: Callable[[], Any]) -> Any:
        """``build()`` (the head's draft rows), rebuilt only when the head or the tables change."""
        weight, d2t = self.lm_head.weight, self.recycle.d2t
        key = (weight.data_ptr(), weight._version, weight.dtype, d2t.data_ptr(), d2t._version)
        cached = getattr(self, "_draft_rows", None)
        if cached is None or cached[0] != key:
            cached = (key, build())
            self._draft_rows = cached
        return cached[1]

    def draft_head_logits(self, module_state: torch.Tensor) -> torch.Tensor:
        """Module logits over the draft vocabulary [..., N] (the full vocabulary when there is none)."""
        return self._head_logits(self._draft_head(), module_state)

    def _draft_head(self) -> nn.Module | None:
        """The linear that computes :meth:`draft_head_logits`, or None where they are ``F.linear`` over
        :meth:`draft_head_weight` (a plain head over a reduced draft vocabulary, or training)."""
        if self.config.draft_vocab_size is None:
            return self.lm_head
        select_rows = getattr(self.lm_head, "select_rows", None)
        if select_rows is not None and not (torch.is_grad_enabled() and self.lm_head.weight.requires_grad):
            # a quantized or kernel head (core.quantize, core.float_kernels) keeps its own kind
            return self._cached_draft_rows(lambda: select_rows(self.draft_ids))
        return None

    def greedy_draft(self, module_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's greedy token [...] and the probability it gives it [...] (fp32): what the argmax
        and the top softmax value of :meth:`draft_logits` are, computed over the draft vocabulary
        only (its logits, not a full-vocabulary scatter: ~0.4 of a SmolLM2 module step less)."""
        logits, index = self._pick(self._draft_head(), module_state)
        return self._draft_token(index), logits.float().softmax(-1).amax(-1)

    def greedy_draft_token(self, module_state: torch.Tensor) -> torch.Tensor:
        """:meth:`greedy_draft`'s token alone (alternating decoding needs no probability: a softmax less)."""
        return self._draft_token(self._pick(self._draft_head(), module_state)[1])

    def _draft_token(self, index: torch.Tensor) -> torch.Tensor:
        """The full-vocabulary id of draft index ``index``, the argmax of :meth:`draft_head_logits`
        (the first draft index among equal maxima: draft ids ascend)."""
        return index if self.config.draft_vocab_size is None else index + self.recycle.d2t[index]

    def draft_logits(self, module_state: torch.Tensor) -> torch.Tensor:
        """Module logits over the full vocabulary [..., V]: -inf outside the draft vocabulary,
        so the draft distribution q is zero there and verification stays exact."""
        logits = self.draft_head_logits(module_state)
        if self.config.draft_vocab_size is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_ids, logits)

    # ----------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_module_from_base(self) -> None:
        """Start the module near the base: every module layer a copy of the base's last layer, the
        final norm the base's, and ``fc`` a pass-through of the h[t-1] half (the embedding half zero)."""
        last = self.model.layers[-1]
        for layer in self.recycle.layers:
            if layer.mlp.gate_proj.weight.shape != last.mlp.gate_proj.weight.shape:
                raise ValueError("init from base needs module_intermediate_size == intermediate_size")
            layer.load_state_dict(last.state_dict())
        self.recycle.norm.load_state_dict(self.model.norm.state_dict())
        d = self.config.hidden_size
        for projection in (self.recycle.fc, self.recycle.fuse):
            if projection is not None:  # fuse, too, passes the final state through
                projection.weight.zero_()
                projection.weight[:, :d].copy_(torch.eye(d))

    # ----------------------------------------------------------------------------- decoding
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> GenerationOutput:
        """Decode with ``decoding`` = ``standard``, ``alternating`` or ``speculative``.

        See :func:`recyclegpt.core.decoding.generate` for every argument.
        """
        from recyclegpt.core.decoding import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ----------------------------------------------------------------------------- weights
    def save_pretrained(self, path: str, tokenizer: Any = None) -> None:
        """Write config.json, model.safetensors and (if any) the tokenizer files, atomically."""
        from recyclegpt.core.checkpoint import save_pretrained

        save_pretrained(self, path, tokenizer if tokenizer is not None else self.tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> RecycleGPT:
        """Load a saved RecycleGPT directory, a HF Llama-family directory or a ``.gguf`` file."""
        from recyclegpt.core.checkpoint import load_pretrained

        return load_pretrained(path, **kwargs)


def module_parameter_ratio(config: RecycleConfig) -> float:
    """Extra parameters of the module as a fraction of the base (the paper: about 15%)."""
    with torch.device("meta"):
        model = RecycleGPT(config)
    return model.num_parameters("module") / model.num_parameters("base")
