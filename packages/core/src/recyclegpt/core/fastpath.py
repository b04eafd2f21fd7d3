"""The fast decode path: transform a loaded model in place for decoding speed.

``prepare_for_decoding(model, quantize="int8", fuse=True)`` fuses each layer's q/k/v projections
into one matmul and its gate/up projections into another (fewer, bigger operators: a decode step
on a small model is dominated by per-operator overhead), then swaps every linear of the base, the
module and the LM head for a weight-only int8 one (:mod:`recyclegpt.core.quantize`).
``quantize="int4"`` gives the base's decoder layers 4-bit weights in groups of 32 (GGUF Q4_1's
format) and keeps the module and the LM head in int8: the head is also the input embedding, which
GGUF files keep at 8 bits, and the small module is where a draft's quality is decided.
``quantize="fp16"`` gives every linear fp16 weights over fp32 activations (FBGEMM's kernel on x86
CPUs): slower than int8 for one token, but k-token steps cost far less, and a row's result does
not depend on the rows beside it, so speculative decoding's verification is cheap and exact.
``quantize="w8a8"`` gives every linear int8 weights and int8 activations (blocks of 32): on AVX-512
VNNI and AVX2 CPUs both one-token and k-token steps are cheaper than int8's, at a small cost in perplexity, and
``quantize="w4a8"`` does the same with the base's decoder linears int4 (as llama.cpp runs a Q4_1
file: the fastest there). The result
is recorded in ``config.extra["decoding_setup"]``, so ``save_pretrained`` writes it and
``from_pretrained`` rebuilds the same structure before loading the weights. Fused layers also run
their few-token CPU steps through fused C++ kernels (:mod:`recyclegpt.core.step_kernels`), and
unquantized linears their fp32 CPU products through a row-independent matmul
(:mod:`recyclegpt.core.float_kernels`), where those build: a runtime choice, not recorded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recyclegpt.core.float_kernels import swap_linears
from recyclegpt.core.model import MLP, Attention, DecoderLayer, RecycleGPT, RMSNorm, apply_rotary
from recyclegpt.core.quantize import QUANTIZE_CHOICES, QuantizedLinear, quantize_linears, quantized_linear
from recyclegpt.core.speculation import forget_measurements
from recyclegpt.core.step_kernels import HeadPick, KernelDecoderLayer, KernelRMSNorm, WholeStackStep
from recyclegpt.core.step_kernels import enabled_by_environment as step_kernels_enabled

SETUP_KEY = "decoding_setup"


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One linear whose output is the concatenation of ``parts``' outputs (exact: same rows)."""
    first = parts[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=has_bias)
    fused = fused.to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    fused.requires_grad_(False)
    return fused


class FusedAttention(Attention):
    """Attention whose q, k and v come out of one ``qkv_proj`` matmul."""

    @classmethod
    def from_attention(cls, attention: Attention) -> FusedAttention:
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads, fused.num_kv_heads = attention.num_heads, attention.num_kv_heads
        fused.head_dim = attention.head_dim
        fused.qkv_proj = _fused_linear([attention.q_proj, attention.k_proj, attention.v_proj])
        fused.o_proj = attention.o_proj
        return fused

    def rotated_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`Attention.rotated_qkv` with fewer operators: queries and keys rotate as one tensor."""
        batch, num_new, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(batch, num_new, heads + 2 * kv_heads, self.head_dim).transpose(1, 2)
        qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)
        return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]


class FusedMLP(nn.Module):
    """SwiGLU MLP whose gate and up projections are one ``gate_up_proj`` matmul."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.width = mlp.gate_proj.out_features
        self.gate_up_proj = _fused_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.width, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _stacks(model: RecycleGPT) -> list[nn.Module]:
    return [model.model, model.recycle]


def fuse_projections(model: RecycleGPT) -> None:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj in every layer of the base and the module."""
    for stack in _stacks(model):
        for layer in stack.layers:
            if not isinstance(layer.self_attn, FusedAttention):
                layer.self_attn = FusedAttention.from_attention(layer.self_attn)
            if not isinstance(layer.mlp, FusedMLP):
                layer.mlp = FusedMLP(layer.mlp)


def use_step_kernels(
    model: RecycleGPT, enabled: bool = True, float_matmul: bool = True, whole_layers: bool = True
) -> bool:
    """Run the fused layers' few-token CPU steps through the step kernels and (``float_matmul``) the
    unquantized linears' fp32 CPU products through the fp32 kernel
    (:mod:`recyclegpt.core.float_kernels`) (``enabled``, unless the environment switches them off),
    or eagerly; whether kernel layers are in place afterwards. The kernels are built at the first
    CPU step that needs them (a model that only runs on CUDA never builds them); where they cannot be
    built, kernel layers run eagerly. ``whole_layers``: a step whose layers can be one C++ call is
    one (:class:`recyclegpt.core.step_kernels.WholeLayers`; the same bits), else each layer calls
    its kernels one by one; so does a step's head with its greedy pick
    (:class:`recyclegpt.core.step_kernels.HeadPick`)."""
    enabled = enabled and step_kernels_enabled()
    swap_linears(model, enabled and float_matmul)  # before the fresh layers below, which look their linears up once
    for stack in _stacks(model):
        if enabled and not isinstance(stack.norm, KernelRMSNorm):
            stack.norm = KernelRMSNorm.from_norm(stack.norm)
        elif not enabled and isinstance(stack.norm, KernelRMSNorm):
            stack.norm = RMSNorm.from_norm(stack.norm)
        for index, layer in enumerate(stack.layers):
            # A fresh layer object either way: a kernel layer's cached submodules may predate quantization.
            stack.layers[index] = (KernelDecoderLayer if enabled else DecoderLayer).from_layer(layer)
            if enabled:
                stack.layers[index].one_call = whole_layers
        stack.layers_step = (
            WholeStackStep(stack.layers, **_stack_ends(model, stack)) if enabled and whole_layers else None
        )
    model.head_pick = HeadPick() if enabled and whole_layers else None
    return enabled


def _stack_ends(model: RecycleGPT, stack: nn.Module) -> dict[str, Any]:
    """What :meth:`WholeStackStep.whole_step` reads around a stack's layers (nothing for a module with
    feature layers, whose input fuses them first)."""
    if getattr(stack, "fuse", None) is not None:
        return {}
    ends = {"embedding": model.model.embed_tokens, "norm": stack.norm, "rotary": stack.rotary}
    return ends if stack is model.model else {**ends, "input_linear": stack.fc}


def quantize_model(model: RecycleGPT, quantize: str = "int8") -> int:
    """``quantize`` weights (int8, int4, fp16, w8a8 or w4a8) for the base's decoder layers; the module
    and the LM head get int8 with int4, w8a8 with w4a8, else the same; how many linears."""
    rest = {"int4": "int8", "w4a8": "w8a8"}.get(quantize, quantize)
    count = quantize_linears(model.model, quantize) + quantize_linears(model.recycle, rest)
    if not isinstance(model.lm_head, QuantizedLinear):
        model.lm_head = quantized_linear(model.lm_head, rest)
        count += 1
    return count


def decoding_setup(model: RecycleGPT) -> dict[str, Any]:
    """What :func:`prepare_for_decoding` did to ``model`` (``{}``: nothing)."""
    return dict(model.config.extra.get(SETUP_KEY, {}))


@torch.no_grad()
def prepare_for_decoding(
    model: RecycleGPT, quantize: str | None = None, fuse: bool = True, step_kernels: bool = True
) -> RecycleGPT:
    """Transform ``model`` in place for fast decoding and return it.

    ``quantize``: ``None``/``"none"`` keeps the weights, ``"int8"`` makes every linear weight-only
    int8, ``"int4"`` the base's decoder linears int4 and the rest int8, ``"fp16"`` every linear
    fp16, ``"w8a8"`` every linear int8 with int8 activations, ``"w4a8"`` as int4 with int8 activations.
    ``fuse``: one matmul for
    q/k/v and one for gate/up. Both are idempotent; neither undoes. ``step_kernels`` (with ``fuse``):
    few-token CPU steps run the fused C++ kernels where they build (``False`` turns them off again).
    Quantize fp32 weights where you can (``from_pretrained`` does): scales computed from bf16-rounded
    weights lose a little more.
    Greedy outputs of the three decoders keep their relations (speculative equals standard) on the
    transformed model; quantization changes the model itself (see the README for its perplexity cost).
    """
    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    setup = decoding_setup(model)
    done = setup.get("quantize")
    if quantize != "none" and done not in (None, quantize):
        raise ValueError(
            f"the model is already quantized as {done}; load its unquantized weights to quantize them as {quantize}"
        )
    if fuse:
        fuse_projections(model)
        setup["fuse"] = True
    if quantize != "none" and done is None:
        quantize_model(model, quantize)
        setup["quantize"] = quantize
    if setup.get("fuse"):
        use_step_kernels(model, step_kernels)
    model.requires_grad_(False)
    if setup:
        model.config.extra[SETUP_KEY] = setup
    forget_measurements(model)  # measured step costs no longer hold
    return model.eval()


def rebuild_structure(model: RecycleGPT, setup: dict[str, Any]) -> None:
    """Give a freshly built model the layout ``setup`` describes, so a saved state dict loads."""
    model.config.extra.pop(SETUP_KEY, None)  # its config already records the setup; its layers do not yet
    prepare_for_decoding(model, quantize=setup.get("quantize"), fuse=bool(setup.get("fuse")))
