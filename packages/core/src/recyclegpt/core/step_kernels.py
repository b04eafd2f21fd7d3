"""Fused CPU step kernels for decoding, and the decoder layer that uses them.

A decode step of a small model on a CPU is per-operator overhead: around its four matmuls an eager
SmolLM2 layer runs ~160 small operators (~150 us). :class:`KernelDecoderLayer` runs the same layer
with four fused calls from ``step_kernels.cpp`` (RMSNorm; rotary embedding + cache write +
attention; residual add + RMSNorm; SiLU-and-multiply) around the same linears. Where all four
linears run the fp32 matmul (:mod:`recyclegpt.core.float_kernels`), the whole layer is one call
(``layer_kernels.cpp``), which makes the same calls in C++: the same bits, without ~20 us of Python
and argument conversion a layer. The kernels compute
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
from types import ModuleType

import torch

from recyclegpt.core.cpu_kernels import MAX_STEP_TOKENS, build, switched_on
from recyclegpt.core.float_kernels import KernelStep, step_forward
from recyclegpt.core.model import DecoderLayer, KVCache, RMSNorm

ENV_SWITCH = "RECYCLEGPT_STEP_KERNELS"
NO_MASK = torch.empty(0)  # rope_attend's "causal, no mask"


def enabled_by_environment() -> bool:
    return switched_on(ENV_SWITCH)


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (:func:`recyclegpt.core.cpu_kernels.build`), or None where they cannot be
    built or ``RECYCLEGPT_STEP_KERNELS=0`` switches them off."""
    return build() if enabled_by_environment() else None


def few_token_cpu_step(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Is ``x`` [B, T, d] a few-token inference step on CPU in ``weight``'s dtype (fp32 or bf16), and
    are the kernels built (building them at the first such step)?"""
    return (
        x.device.type == "cpu"
        and x.dim() == 3
        and x.shape[1] <= MAX_STEP_TOKENS
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
        and load() is not None
    )


class KernelRMSNorm(RMSNorm):
    """A stack's final norm, through the kernel on few-token CPU steps (eager elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if few_token_cpu_step(x, self.weight):
            return load().rms_norm(x.contiguous(), self.weight, self.eps)
        return super().forward(x)


class KernelDecoderLayer(DecoderLayer):
    """A fused decoder layer (``qkv_proj``, ``gate_up_proj``) whose few-token steps over a KV cache
    on CPU run the step kernels; anything else (prompts, training, no cache, CUDA) runs eager."""

    def uses_kernels(self, x: torch.Tensor, cache: KVCache | None) -> bool:
        return cache is not None and few_token_cpu_step(x, self.input_layernorm.weight) and cache.keys.dtype == x.dtype

    def step_parts(self) -> tuple:
        """The submodules a kernel step calls, looked up once: ``nn.Module`` attribute lookups and
        ``__call__`` cost about a microsecond each, a sizeable share of a small model's step (the
        step calls the linears' ``forward`` directly: decoding registers no hooks). Replacing a
        submodule afterwards (quantizing) needs a fresh layer: ``fastpath.use_step_kernels`` makes one.
        The linears come as their ``forward`` (:func:`recyclegpt.core.float_kernels.step_forward`);
        the last part is their four weights where all four run the fp32 kernel (else None)."""
        parts = self.__dict__.get("_step_parts")
        if parts is None:
            attention, mlp = self.self_attn, self.mlp
            linears = [attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj]
            steps = [step_forward(linear) for linear in linears]
            # All four on the fp32 kernel: the whole layer runs as one call (fp32_layer_step).
            whole = all(isinstance(step, KernelStep) for step in steps)
            parts = (
                self.input_layernorm,
                self.post_attention_layernorm,
                *steps,
                attention.num_heads,
                attention.num_kv_heads,
                tuple(step.weight for step in steps) if whole else None,
            )
            self.__dict__["_step_parts"] = parts
        return parts

    def forward(self, x, cos, sin, mask, cache, layer_index):  # noqa: ANN001, ANN201 - hot path
        if not self.uses_kernels(x, cache):
            return super().forward(x, cos, sin, mask, cache, layer_index)
        keys, values = cache.keys[layer_index], cache.values[layer_index]
        if not (keys.is_contiguous() and values.is_contiguous()):
            return super().forward(x, cos, sin, mask, cache, layer_index)
        kernels = load()
        norm1, norm2, qkv_proj, o_proj, gate_up_proj, down_proj, heads, kv_heads, weights = self.step_parts()
        mask = NO_MASK if mask is None else mask
        if weights is not None and x.dtype is torch.float32 and weights[0].dtype is torch.float32:
            qkv_w, o_w, gate_up_w, down_w = weights
            return kernels.fp32_layer_step(
                x, norm1.weight, norm1.eps, qkv_w, o_w, norm2.weight, norm2.eps, gate_up_w, down_w,
                cos, sin, keys, values, cache.length, mask, heads, kv_heads,
            )  # fmt: skip
        x = x.contiguous()
        qkv = qkv_proj(kernels.rms_norm(x, norm1.weight, norm1.eps)).contiguous()
        attended = kernels.rope_attend(qkv, cos, sin, keys, values, cache.length, mask, heads, kv_heads)
        x, normed = kernels.add_rms_norm(x, o_proj(attended).contiguous(), norm2.weight, norm2.eps)
        return x + down_proj(kernels.silu_mul(gate_up_proj(normed).contiguous()))


class WholeStackStep:
    """Every layer of a stack in one ``fp32_layers_step`` call, for the fp32 decode steps whose layers
    all run whole (:meth:`KernelDecoderLayer.step_parts`): the same bits as a call a layer, without
    the Python between the layers (~20 us a layer, measured on a Zen 3 EPYC). ``__call__`` declines
    (None) anything else, and the stack runs its layers one by one."""

    __slots__ = ("layers", "_arguments")

    def __init__(self, layers: list[KernelDecoderLayer]) -> None:
        self.layers = list(layers)
        self._arguments: tuple | None = None

    def arguments(self) -> tuple | None:
        """(weights, eps, heads, kv_heads) for the C++ call, looked up once; None where a layer does
        not run whole (quantized or biased linears)."""
        if self._arguments is None:
            self._arguments = self._look_up() or ()
        return self._arguments or None

    def _look_up(self) -> tuple | None:
        weights, eps = [], []
        for layer in self.layers:
            norm1, norm2, *_, heads, kv_heads, whole = layer.step_parts()
            if whole is None:
                return None
            qkv, o, gate_up, down = whole
            weights += [norm1.weight, qkv, o, norm2.weight, gate_up, down]
            eps += [norm1.eps, norm2.eps]
        return (weights, eps, heads, kv_heads) if weights else None

    def __call__(self, x, cos, sin, mask, cache):  # noqa: ANN001, ANN204 - hot path
        arguments = self.arguments()
        if arguments is None or cache is None:
            return None
        weights, eps, heads, kv_heads = arguments
        keys, values = cache.keys, cache.values
        if not (
            x.dtype is torch.float32
            and weights[1].dtype is torch.float32
            and keys.dtype is torch.float32
            and few_token_cpu_step(x, weights[0])
            and keys.is_contiguous()
            and values.is_contiguous()
        ):
            return None
        mask = NO_MASK if mask is None else mask
        return load().fp32_layers_step(x, weights, eps, cos, sin, keys, values, cache.length, mask, heads, kv_heads)
