"""Weight-only int8 linears: per-output-channel symmetric int8 weights, float activations.

On CPU the matmul is torch's own ``aten._weight_int8pack_mm``, fed bf16 activations (its fast
path on every x86 CPU, AVX2 included; with fp32 activations the same op is ~10x slower), so an
fp32 model casts activations to bf16 around each int8 matmul and everything else stays fp32.
Elsewhere (CUDA) the weight is dequantized into the activation dtype inside ``F.linear``.

torchao's ``Int8WeightOnlyConfig`` was measured first (torchao 0.18.0 with torch 2.13 on CPU):
a 768x3072 linear for one row took ~36 ms against ~0.3 ms for fp32, so it is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_CHOICES = ("none", "int8")
INT8_MAX = 127


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] and fp32 scales [N] with ``weight ~= int8 * scales[:, None]``."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    quantized = torch.round(weight / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scales


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight (buffer ``weight``) and per-output-channel ``scales``.

    ``weight`` keeps its name so that ``layer.weight.device`` still answers where the layer lives.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._bf16_scales: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        quantized, scales = quantize_weight(linear.weight)
        device, dtype = linear.weight.device, linear.weight.dtype
        layer.weight = quantized.to(device)
        layer.scales = scales.to(device=device, dtype=dtype)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._bf16_scales = None  # .to(...) moved or cast the scales
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._bf16_scales = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            if self._bf16_scales is None:
                self._bf16_scales = self.scales.to(torch.bfloat16)
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self._bf16_scales)
            out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def select_rows(self, ids: torch.Tensor) -> Int8Linear:
        """An Int8Linear over output rows ``ids`` only (a reduced draft vocabulary's head)."""
        rows = Int8Linear(self.in_features, ids.numel(), bias=self.bias is not None)
        rows.weight = self.weight[ids].contiguous()
        rows.scales = self.scales[ids].contiguous()
        if self.bias is not None:
            rows.bias = self.bias[ids].contiguous()
        return rows

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_linears(root: nn.Module, include: tuple[type[nn.Module], ...] = (nn.Linear,)) -> int:
    """Replace every ``nn.Linear`` under ``root`` by an :class:`Int8Linear`, in place; how many."""
    count = 0
    for name, child in list(root.named_children()):
        if isinstance(child, include) and not isinstance(child, Int8Linear):
            setattr(root, name, Int8Linear.from_linear(child))
            count += 1
        else:
            count += quantize_linears(child, include)
    return count
