"""Fused CPU step kernels for decoding, and the decoder layer that uses them.

A decode step of a small model on a CPU is per-operator overhead: around its four matmuls an eager
SmolLM2 layer runs ~160 small operators (~150 us). :class:`KernelDecoderLayer` runs the same layer
with four fused calls from ``step_kernels.cpp`` (RMSNorm; rotary embedding + cache write +
attention; residual add + RMSNorm; SiLU-and-multiply) around the same linears. Where all four
linears run this project's kernels (the fp32 matmul of :mod:`recyclegpt.core.float_kernels`, or the
w8a8 / w4a8 ones), the layers of a step are one call (``layer_kernels.cpp``, :class:`WholeLayers`),
which makes the same calls in C++: the same bits, without ~20 us of Python and argument conversion a
layer. The kernels compute
each token's row on its own, so a k-token step gives exactly what k one-token steps give (greedy
speculative decoding stays equal to standard), and round where the eager layer rounds. Where the
CPU has AVX2 they run eight-lane code that gives the same bits as their one-lane code.

The extension (:mod:`recyclegpt.core.cpu_kernels`) is compiled once per machine at the first CPU
step that uses it and cached by torch. Where it cannot be built, or with
``RECYCLEGPT_STEP_KERNELS=0``, layers run the eager code, which computes the same model (within
rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn

from recyclegpt.core.cpu_kernels import MAX_STEP_TOKENS, PROMPT_STEP_TOKENS, build, switched_on
from recyclegpt.core.float_kernels import KernelStep, step_forward
from recyclegpt.core.model import DecoderLayer, KVCache, RMSNorm
from recyclegpt.core.quantize import QuantizedLinear

ENV_SWITCH = "RECYCLEGPT_STEP_KERNELS"
WHOLE_LAYERS_SWITCH = "RECYCLEGPT_WHOLE_LAYERS"  # 0: layers call their kernels one by one
NO_MASK = torch.empty(0)  # rope_attend's "causal, no mask"


def enabled_by_environment() -> bool:
    return switched_on(ENV_SWITCH)


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (:func:`recyclegpt.core.cpu_kernels.build`), or None where they cannot be
    built or ``RECYCLEGPT_STEP_KERNELS=0`` switches them off."""
    return build() if enabled_by_environment() else None


def few_token_cpu_step(x: torch.Tensor, weight: torch.Tensor, max_tokens: int = MAX_STEP_TOKENS) -> bool:
    """Is ``x`` [B, T, d] an inference step of at most ``max_tokens`` on CPU in ``weight``'s dtype (fp32
    or bf16), and are the kernels built (building them at the first such step)?"""
    return (
        x.device.type == "cpu"
        and x.dim() == 3
        and x.shape[1] <= max_tokens
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
        and load() is not None
    )


class KernelRMSNorm(RMSNorm):
    """A stack's final norm, through the kernel on few-token CPU steps and the short prompts that run
    as steps (:data:`PROMPT_STEP_TOKENS`: their states stay those of one-token steps), eager elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if few_token_cpu_step(x, self.weight, PROMPT_STEP_TOKENS):
            return load().rms_norm(x.contiguous(), self.weight, self.eps)
        return super().forward(x)


class KernelDecoderLayer(DecoderLayer):
    """A fused decoder layer (``qkv_proj``, ``gate_up_proj``) whose few-token steps over a KV cache
    on CPU run the step kernels; anything else (prompts, training, no cache, CUDA) runs eager."""

    one_call = True  # may the layer's steps run as one call (WholeLayers)? use_step_kernels sets it

    def uses_kernels(self, x: torch.Tensor, cache: KVCache | None) -> bool:
        return cache is not None and few_token_cpu_step(x, self.input_layernorm.weight) and cache.keys.dtype == x.dtype

    def step_parts(self) -> tuple:
        """The submodules a kernel step calls, looked up once: ``nn.Module`` attribute lookups and
        ``__call__`` cost about a microsecond each, a sizeable share of a small model's step (the
        step calls the linears' ``forward`` directly: decoding registers no hooks). Replacing a
        submodule afterwards (quantizing) needs a fresh layer: ``fastpath.use_step_kernels`` makes one.
        The linears come as their ``forward`` (:func:`recyclegpt.core.float_kernels.step_forward`);
        the last part is the layer as one call (:class:`WholeLayers`), or None where it cannot be."""
        parts = self.__dict__.get("_step_parts")
        if parts is None:
            attention, mlp = self.self_attn, self.mlp
            linears = [attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj]
            parts = (
                self.input_layernorm,
                self.post_attention_layernorm,
                *(step_forward(linear) for linear in linears),
                attention.num_heads,
                attention.num_kv_heads,
                WholeLayers.of_layer(self.input_layernorm, self.post_attention_layernorm, linears)
                if self.one_call
                else None,
            )
            self.__dict__["_step_parts"] = parts
        return parts

    def current_parts(self) -> tuple:
        """:meth:`step_parts`, looked up again where a quantized linear has rebuilt its kernel copy since
        (moved or reloaded): the one-call layer would otherwise read the old copy."""
        parts = self.step_parts()
        if parts[-1] is not None and not parts[-1].current():
            self.__dict__.pop("_step_parts")
            parts = self.step_parts()
        return parts

    def forward(self, x, cos, sin, mask, cache, layer_index):  # noqa: ANN001, ANN201 - hot path
        if not self.uses_kernels(x, cache):
            return super().forward(x, cos, sin, mask, cache, layer_index)
        keys, values = cache.keys[layer_index], cache.values[layer_index]
        if not (keys.is_contiguous() and values.is_contiguous()):
            return super().forward(x, cos, sin, mask, cache, layer_index)
        kernels = load()
        norm1, norm2, qkv_proj, o_proj, gate_up_proj, down_proj, heads, kv_heads, whole = self.current_parts()
        mask = NO_MASK if mask is None else mask
        if whole is not None and whole.runs(x):
            keys, values = cache.keys.narrow(0, layer_index, 1), cache.values.narrow(0, layer_index, 1)
            return whole(kernels, x, cos, sin, keys, values, cache.length, mask, heads, kv_heads)
        x = x.contiguous()
        qkv = qkv_proj(kernels.rms_norm(x, norm1.weight, norm1.eps)).contiguous()
        attended = kernels.rope_attend(qkv, cos, sin, keys, values, cache.length, mask, heads, kv_heads)
        x, normed = kernels.add_rms_norm(x, o_proj(attended).contiguous(), norm2.weight, norm2.eps)
        return x + down_proj(kernels.silu_mul(gate_up_proj(normed).contiguous()))


class WholeLayers:
    """Decoder layers as one ``decode_layers_step`` call (``layer_kernels.cpp``): the same bits as
    their kernels one by one, without the Python between them. Each linear runs the fp32 matmul
    (fp32 steps) or a w8a8 / w4a8 kernel (fp32 or bf16 steps); a layer with any other linear
    (biased, weight-only quantized, a torch fallback) cannot be one."""

    __slots__ = ("tensors", "ints", "eps", "sources", "float_weight", "drops")

    def __init__(self, tensors: list, ints: list[int], eps: list[float], sources: tuple, float_weight) -> None:  # noqa: ANN001
        self.tensors, self.ints, self.eps = tensors, ints, eps
        self.sources = sources  # (quantized linear, the kernel tuple its operands came from)
        self.float_weight = float_weight  # one fp32-kernel weight, or None: fp32 steps only where set
        self.drops = QuantizedLinear.kernel_drops  # the sources were current then

    @classmethod
    def of_layer(cls, input_norm: RMSNorm, post_norm: RMSNorm, linears: list[nn.Module]) -> WholeLayers | None:
        """A layer as one call, or None where it cannot be or ``RECYCLEGPT_WHOLE_LAYERS=0`` says not to."""
        parts = [cls.of_linear(linear) for linear in linears]
        if any(part is None for part in parts):
            return None
        joined = cls.joined(parts)
        joined.tensors[:0] = [input_norm.weight, post_norm.weight]
        joined.eps = [input_norm.eps, post_norm.eps]
        return joined

    @classmethod
    def of_linear(cls, linear: nn.Module) -> WholeLayers | None:
        """A linear's operands and three ints (kind, out_features, vnni) as a layer's calls read them,
        or None where it cannot be one or ``RECYCLEGPT_WHOLE_LAYERS=0`` says not to."""
        if not switched_on(WHOLE_LAYERS_SWITCH):
            return None
        step = step_forward(linear)
        if isinstance(step, KernelStep):
            return cls([step.weight], [0, 0, 0], [], (), step.weight)
        operands = quantized_operands(linear)
        if operands is None:
            return None
        kind, kernel = operands
        _, *rest = kernel
        return cls(rest[:-2], [kind, rest[-2], int(rest[-1])], [], ((linear, kernel),), None)

    @classmethod
    def joined(cls, parts: list[WholeLayers]) -> WholeLayers:
        """One call for ``parts``, in order."""
        float_weights = [part.float_weight for part in parts if part.float_weight is not None]
        joined = cls(
            [t for part in parts for t in part.tensors],
            [n for part in parts for n in part.ints],
            [e for part in parts for e in part.eps],
            tuple(source for part in parts for source in part.sources),
            float_weights[0] if float_weights else None,
        )
        joined.drops = min((part.drops for part in parts), default=joined.drops)
        return joined

    def current(self) -> bool:
        """Are the quantized linears' kernels still the ones read (``.to`` and reloading rebuild them)?
        Asked every step: no quantized linear has dropped its kernel since is the quick answer (a
        look at each of a SmolLM2 stack's 120 linears cost ~20 us)."""
        if self.drops == QuantizedLinear.kernel_drops:
            return True
        if all(linear._kernel is kernel for linear, kernel in self.sources):
            self.drops = QuantizedLinear.kernel_drops
            return True
        return False

    def runs(self, x: torch.Tensor) -> bool:
        """Can a step of ``x`` (dtype; the rest is checked by the caller) run as this call?"""
        if x.dtype is torch.float32:
            return self.float_weight is None or self.float_weight.dtype is torch.float32
        return x.dtype is torch.bfloat16 and self.float_weight is None

    def __call__(self, kernels, x, cos, sin, keys, values, start, mask, heads, kv_heads):  # noqa: ANN001, ANN204
        return kernels.decode_layers_step(
            x, self.tensors, self.ints, self.eps, cos, sin, keys, values, start, mask, heads, kv_heads
        )


def quantized_operands(linear: nn.Module) -> tuple[int, tuple] | None:
    """(kind, kernel tuple) of a bias-free w8a8 (1) or w4a8 (2) linear on its int8-activation kernel
    here (building its kernel copy now), else None."""
    if not (
        isinstance(linear, QuantizedLinear)
        and linear.bias is None
        and linear.weight.device.type == "cpu"
        and linear.has_cpu_kernel()
    ):
        return None
    kernels = load()
    if kernels is None:
        return None
    kernel = linear.cpu_kernel()
    if kernel[0] is kernels.int8_dynamic_matmul:
        return 1, kernel
    if kernel[0] is kernels.int4_dynamic_matmul:
        return 2, kernel
    return None


def _looked_up(found: WholeLayers | bool | None, build: Callable[[], WholeLayers | None]) -> WholeLayers | bool:
    """``found`` (a call; False: it cannot be one; None: not looked up yet), built again with ``build``
    where missing or where a quantized linear has rebuilt its kernel since."""
    if found is None or (found and not found.current()):
        found = build() or False
    return found


class StackCall(NamedTuple):
    """A stack's whole decode step as ``decode_stack_step`` takes it, less what each step brings."""

    dtype: torch.dtype
    embedding: torch.Tensor
    weights: tuple  # the input projection's operands and ints, the layers', the rotary tables
    ends: tuple  # heads, kv_heads, the final norm's weight and eps


class _KnownCall(NamedTuple):
    """A :class:`StackCall` (or None: no one-call step) and what it was made from."""

    norm_weight: torch.Tensor
    embedding: torch.Tensor
    tables: tuple  # the rotary cos and sin
    dtype: torch.dtype
    drops: int  # QuantizedLinear.kernel_drops then
    call: StackCall | None

    def still(self, norm_weight: torch.Tensor, embedding: torch.Tensor, tables: tuple) -> bool:
        """Made from these very tensors, in the same dtype, with no quantized kernel dropped since?"""
        return (
            self.drops == QuantizedLinear.kernel_drops
            and norm_weight is self.norm_weight
            and embedding is self.embedding
            and tables[0] is self.tables[0]
            and tables[1] is self.tables[1]
            and norm_weight.dtype is self.dtype
            and embedding.dtype is self.dtype
        )


class WholeStackStep:
    """Every layer of a stack in one ``decode_layers_step`` call, for the decode steps whose layers
    can all be one call (:class:`WholeLayers`): the same bits as a call a layer, without the Python
    between the layers (~20 us a layer, measured on a Zen 3 EPYC). ``__call__`` declines (None)
    anything else, and the stack runs its layers one by one. A short prompt (up to
    :data:`PROMPT_STEP_TOKENS`) runs as steps of :data:`MAX_STEP_TOKENS` tokens.

    Given the stack's ends (its token embedding, input projection, final norm and rotary tables),
    :meth:`whole_step` runs a decode step (padded or at explicit positions too) from token ids to
    final states as one ``decode_stack_step`` call, the same bits again."""

    __slots__ = ("layers", "heads", "_whole", "embedding", "input_linear", "norm", "rotary", "_input", "_calls")

    def __init__(
        self,
        layers: list[KernelDecoderLayer],
        embedding: nn.Embedding | None = None,
        norm: RMSNorm | None = None,
        rotary: nn.Module | None = None,
        input_linear: nn.Module | None = None,
    ) -> None:
        self.layers = list(layers)
        attention = self.layers[0].self_attn if self.layers else None
        self.heads = (attention.num_heads, attention.num_kv_heads) if attention is not None else (0, 0)
        self._whole: WholeLayers | bool | None = None
        self.embedding, self.norm, self.rotary, self.input_linear = embedding, norm, rotary, input_linear
        self._input: WholeLayers | bool | None = None
        self._calls: list[_KnownCall | None] = [None, None]  # whole_step's, without and with prev states

    def whole(self) -> WholeLayers | None:
        """The layers as one call, looked up once (again where a quantized linear rebuilt its kernel)."""
        self._whole = _looked_up(self._whole, self._joined_layers)
        return self._whole or None

    def _joined_layers(self) -> WholeLayers | None:
        parts = [layer.current_parts()[-1] for layer in self.layers]
        return WholeLayers.joined(parts) if parts and all(part is not None for part in parts) else None

    def input_call(self) -> WholeLayers | None:
        """The input projection as a layer's linear, looked up once (as :meth:`whole`)."""
        self._input = _looked_up(self._input, lambda: WholeLayers.of_linear(self.input_linear))
        return self._input or None

    def __call__(self, x, cos, sin, mask, cache):  # noqa: ANN001, ANN204 - hot path
        # The cheap checks first: a prompt, training or a CUDA step never looks the layers up (which
        # builds the kernels, and packs quantized weights for the CPU).
        if cache is None or not self.layers:
            return None
        if not few_token_cpu_step(x, self.layers[0].input_layernorm.weight, PROMPT_STEP_TOKENS):
            return None
        whole = self.whole()
        if not (whole is not None and whole.runs(x) and self.cache_fits(cache, x.dtype)):
            return None
        heads, kv_heads = self.heads
        kernels, start, steps = load(), cache.length, x.shape[1]
        if steps <= MAX_STEP_TOKENS:
            mask = NO_MASK if mask is None else mask
            return whole(kernels, x, cos, sin, cache.keys, cache.values, start, mask, heads, kv_heads)
        pieces = []
        for first in range(0, steps, MAX_STEP_TOKENS):
            last = min(first + MAX_STEP_TOKENS, steps)
            piece_mask = NO_MASK if mask is None else mask[..., first:last, : start + last].contiguous()
            piece_cos, piece_sin = (t[..., first:last, :].contiguous() for t in (cos, sin))
            piece = x[:, first:last]
            pieces.append(
                whole(
                    kernels,
                    piece,
                    piece_cos,
                    piece_sin,
                    cache.keys,
                    cache.values,
                    start + first,
                    piece_mask,
                    heads,
                    kv_heads,
                )
            )
        return torch.cat(pieces, dim=1)

    @staticmethod
    def cache_fits(cache: KVCache, dtype: torch.dtype) -> bool:
        """Is the cache in the step's dtype, each layer's part contiguous? (One layer's is enough: a
        batch's view of the server's cache is not contiguous as a whole.)"""
        keys, values = cache.keys, cache.values
        known = cache.__dict__.get("_step_fit")  # asked every step: the answer for these tensors, kept
        if known is not None and known[0] is keys and known[1] is values and known[2] is dtype:
            return known[3]
        fits = keys.dtype is dtype and keys.select(0, 0).is_contiguous() and values.select(0, 0).is_contiguous()
        cache.__dict__["_step_fit"] = (keys, values, dtype, fits)
        return fits

    def _stack_call(self, with_prev: bool) -> StackCall | None:
        """:meth:`whole_step`'s arguments that stay the same from step to step, made again only where
        one may have changed (a weight or table replaced or cast, a quantized linear's kernel
        dropped): looking them up and checking them each step cost ~10 us of a ~75 us demo-model
        step (measured on a Zen 4 EPYC). None where the stack's steps cannot be one call."""
        if self.norm is None or (self.input_linear is None) is with_prev:
            return None
        norm_weight = self.norm._parameters["weight"]
        embedding = self.embedding._parameters["weight"]
        tables = self.rotary._buffers["cos"], self.rotary._buffers["sin"]
        known = self._calls[with_prev]
        if known is not None and known.still(norm_weight, embedding, tables):
            return known.call
        drops = QuantizedLinear.kernel_drops
        call = self._make_stack_call(with_prev, norm_weight, embedding, tables)
        self._calls[with_prev] = _KnownCall(norm_weight, embedding, tables, norm_weight.dtype, drops, call)
        return call

    def _make_stack_call(self, with_prev, norm_weight, embedding, tables) -> StackCall | None:  # noqa: ANN001
        dtype = norm_weight.dtype
        if embedding.dtype is not dtype or dtype not in (torch.float32, torch.bfloat16) or load() is None:
            return None
        whole = self.whole()
        projection = self.input_call() if with_prev else None
        if whole is None or (with_prev and projection is None):
            return None
        if not (whole.runs(norm_weight) and (projection is None or projection.runs(norm_weight))):
            return None
        heads, kv_heads = self.heads
        return StackCall(
            dtype,
            embedding,
            (
                [] if projection is None else projection.tensors,
                [] if projection is None else projection.ints,
                whole.tensors,
                whole.ints,
                whole.eps,
                *tables,
            ),
            (heads, kv_heads, norm_weight, self.norm.eps),
        )

    def whole_step(  # noqa: ANN201 - hot path
        self,
        ids: torch.Tensor,
        cache: KVCache | None,
        prev: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ):
        """The stack's final states [B, T, d] of a causal decode step over ``ids`` [B, T] (the module:
        with its h[t-1] states ``prev``) at rotary ``positions`` [B, T] (int64 rows of the rotary
        tables, so 0 .. max_len - 1; None: the cache's next columns), attending as the cache's padding
        allows, as one call; None where it cannot be one."""
        if (
            cache is None
            or ids.device.type != "cpu"
            or ids.dtype is not torch.long
            or ids.dim() != 2
            or ids.shape[1] > MAX_STEP_TOKENS
            or (positions is not None and (positions.dtype is not torch.long or positions.shape != ids.shape))
            or (
                cache.has_padding
                and (
                    cache.key_valid.shape[0] != ids.shape[0]
                    or cache.key_valid.shape[1] < cache.length + ids.shape[1]
                    or cache.key_valid.device.type != "cpu"
                )
            )
            or torch.is_grad_enabled()
        ):
            return None
        call = self._stack_call(prev is not None)
        if call is None or (prev is not None and prev.dtype is not call.dtype):
            return None
        if not self.cache_fits(cache, call.dtype):
            return None
        start = cache.length
        out = load().decode_stack_step(
            ids,
            call.embedding,
            NO_MASK if prev is None else prev,
            *call.weights,
            cache.keys,
            cache.values,
            start,
            *call.ends,
            NO_MASK if positions is None else positions,
            cache.key_valid if cache.has_padding else NO_MASK,
        )
        cache.length = start + ids.shape[1]
        return out


class HeadPick:
    """A head's logits and greedy tokens in one ``head_argmax`` call (``layer_kernels.cpp``) on CPU
    inference rows whose head runs a layer's linear kinds (:meth:`WholeLayers.of_linear`): the same
    logits and the same tokens as the head's forward and :func:`recyclegpt.core.sampling.greedy_tokens`,
    without a head call and an aten max from Python (~20-30 us a step on a Zen 3 EPYC). ``__call__``
    declines (None) anything else."""

    __slots__ = ("_heads",)

    def __init__(self) -> None:
        self._heads: dict[int, tuple[nn.Module, WholeLayers | bool]] = {}  # id -> (head, its call or False)

    def __call__(self, head: nn.Module, x: torch.Tensor):  # noqa: ANN204 - hot path
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled():
            return None
        entry = self._heads.get(id(head))
        if entry is None or entry[0] is not head or (entry[1] and not entry[1].current()):
            if load() is None:
                return None
            if len(self._heads) > 8:  # draft-row heads rebuilt over time: keep the few in use
                self._heads.clear()
            entry = (head, WholeLayers.of_linear(head) or False)
            self._heads[id(head)] = entry
        call = entry[1]
        if not call or not call.runs(x):
            return None
        if call.float_weight is not None and x.dim() == 3 and x.shape[1] > MAX_STEP_TOKENS:
            return None  # the head's forward takes torch's matmul there (float_kernels.runs_kernel)
        return load().head_argmax(x, call.tensors, call.ints)
