"""Weight-only int8, int4 and fp16 linears (float activations, compact weights), and w8a8 / w4a8:
int8 / int4 weights with activations quantized to int8 on the fly.

int8: per-output-channel symmetric weights. int4: groups of ``INT4_GROUP_SIZE`` weights along a
row, each with a scale and a minimum (value = q * scale + min, q in 0..15): GGUF's Q4_1 format, so
a Q4_1 checkpoint's linears come back exactly, up to the bf16 rounding of scales and minimums.

On AVX-512 CPUs the int8 matmul is this project's own (:mod:`recyclegpt.core.quant_kernels`):
one pass over the weight serves up to eight activation rows, each row's result independent of the
others, in the activations' own dtype, on a packed copy of the weight made at the first call (the
state dict keeps the plain one). Elsewhere (AVX2 CPUs, where it measured slower), and for int4,
torch's own kernels run: ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``,
fed bf16 activations (their fast path; with fp32 activations the int8 op is ~10x slower), so an
fp32 model then casts activations to bf16 around each of those matmuls. On CUDA the weight is
dequantized into the activation dtype inside ``F.linear`` at every call: correct, not fast (no GPU
was at hand to build and measure a CUDA kernel path).

fp16: the weight rounded to fp16, multiplied by FBGEMM's packed fp16 GEMM
(``quantized::linear_dynamic_fp16``, x86 CPUs, fp32 activations in and out, fp32 accumulation):
it reads 2 bytes a weight and converts them as it goes. A 1-token SmolLM2 step costs ~1.2-1.35x
int8's, but 5 rows cost ~1.3x one row (int8 ~1.85x), and each row's result does not depend on how
many rows come with it: cheap, exact draft verification and batch-invariant batched decoding.

w8a8: int8 weights as int8's, and every activation row rounded, in blocks of 32 along K, to
``d * a`` (``d = max|x| / 127``, ``a`` in -127..127: llama.cpp's Q8_0) so that the matmul runs on
integer dot products (AVX-512 VNNI, or AVX2's vpmaddubsw; :func:`recyclegpt.core.quant_kernels.dynamic_isa`): the
weight is read once for all rows and a row costs a quarter of the fused multiply-adds, so a k-token
step costs much less than int8's. Its price is that rounding of the activations (perplexity: see
the README). Each row's result is its own, as with the packed int8 kernel. Where that kernel does
not run, the same rounding comes before int8's matmul (correct, not fast). w4a8 does the same with
int4 weights (Q4_1 groups of 32, one group per activation block, as llama.cpp runs a Q4_1 file).

torchao's ``Int8WeightOnlyConfig`` was measured first (torchao 0.18.0 with torch 2.13 on CPU):
a 768x3072 linear for one row took ~36 ms against ~0.3 ms for fp32, so it is not used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from recyclegpt.core import quant_kernels

QUANTIZE_CHOICES = ("none", "int8", "int4", "fp16", "w8a8", "w4a8")
QUANTIZE_HELP = (
    "int8: weight-only int8 linears; int4: the base's decoder linears int4, the rest int8 (fastest single "
    "requests); fp16: fp16 weights, fp32 compute (cheap multi-token steps on AVX-512 CPUs; row by row on AVX2 ones); "
    "w8a8: int8 weights and int8 activations in blocks of 32 (integer kernels on AVX-512 VNNI and AVX2 CPUs: "
    "cheap multi-token steps, the best for speculative decoding there); w4a8: w8a8 with the base's decoder "
    "linears int4 (the fastest single requests on those CPUs)"
)
INT8_MAX = 127
ACTIVATION_BLOCK = quant_kernels.ACTIVATION_BLOCK  # w8a8: activation values one scale covers
INT4_GROUP_SIZE = 32
INT4_MAX = 15
INT4_OUTPUT_TILE = 16  # the CPU int4 kernel packs output rows (N) in tiles of 16
# torch's CPU int8 and int4 kernels compute activation rows in blocks of 4, and 5 to 7 rows cost
# what 8 do (~2x 4 rows); as 4 + the rest they cost 10-25% less (measured, AVX-512 and AVX2).
KERNEL_ROW_BLOCK = 4


@functools.cache
def fp16_kernel_available() -> bool:
    """Does this torch build carry FBGEMM's fp16-weight GEMM (x86 CPUs)?"""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


@functools.cache
def fp16_rows_independent() -> bool:
    """Does FBGEMM's fp16 GEMM give each row what a 1-row call gives, whatever the row count? True
    with its AVX-512 kernels; its AVX2 kernels round some row counts differently (2 and 7 rows of a
    call differed in the last bit, measured on a Zen 3 EPYC), which would break the exact match of
    speculative and standard decoding, so there :class:`Fp16Linear` runs rows one at a time."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    x = torch.randn(16, 64, generator=generator)
    packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
    alone = torch.cat([torch.ops.quantized.linear_dynamic_fp16(row, packed) for row in x.split(1)])
    return all(
        torch.equal(torch.ops.quantized.linear_dynamic_fp16(x[:rows], packed), alone[:rows]) for rows in range(2, 17)
    )


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] and fp32 scales [N] with ``weight ~= int8 * scales[:, None]``."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    quantized = torch.round(weight / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scales


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded as w8a8's kernel rounds it: each block of 32 along K to ``d * a`` with
    ``d = max|x| / 127`` and ``a = round(x * 127 / max|x|)`` (half to even), in x's dtype."""
    blocks = x.float().unflatten(-1, (-1, ACTIVATION_BLOCK))
    peak = blocks.abs().amax(dim=-1, keepdim=True)
    levels = torch.round(blocks * torch.where(peak > 0, INT8_MAX / peak, 0.0)).clamp(-INT8_MAX, INT8_MAX)
    return (levels * (peak / INT8_MAX)).flatten(-2).to(x.dtype)


def quantize_weight_int4(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] (0..15, uint8), scales and mins [N, K / group_size] (fp32): ``w ~= q * scale + min``."""
    weight = weight.detach().float()
    rows, cols = weight.shape
    groups = weight.view(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low).clamp(min=1e-12) / INT4_MAX
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, INT4_MAX).to(torch.uint8)
    return q.view(rows, cols), scales, low


def int4_fits(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
    """Can the int4 kernel take this weight (whole groups along a row, output rows in tiles of 16)?"""
    return linear.in_features % group_size == 0 and linear.out_features % INT4_OUTPUT_TILE == 0


class QuantizedLinear(nn.Module):
    """What the int8, int4 and fp16 linears share: buffers ``weight`` (compact; it keeps its name so
    that ``layer.weight.device`` still answers where the layer lives) and ``bias``, a CPU kernel
    over a kernel-format copy of the weight made at the first call, and elsewhere (CUDA, or a CPU
    build without the kernel) ``F.linear`` over the dequantized weight."""

    kernel_dtype = torch.bfloat16  # the activation dtype torch's CPU kernel takes
    row_block: int | None = KERNEL_ROW_BLOCK  # run 5-7 rows as block + rest (None: never split)
    # How many times any quantized linear has dropped its kernel copy: a one-call step built over
    # kernel copies (recyclegpt.core.step_kernels.WholeLayers) is current while this is unchanged.
    kernel_drops = 0

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel: tuple | None = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self.drop_kernel()  # .to(...) moved or cast the buffers the kernel copy came from
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.drop_kernel()
        super()._load_from_state_dict(*args, **kwargs)

    def drop_kernel(self) -> None:
        """Forget the kernel copy (the next call makes it anew)."""
        self._kernel = None
        QuantizedLinear.kernel_drops += 1

    def copy_bias_from(self, linear: nn.Linear) -> None:
        """Take ``linear``'s bias unchanged (the weight is what a subclass converts)."""
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()

    def make_kernel(self) -> tuple[Callable[..., torch.Tensor], ...]:
        """``(matmul, *operands)``: the CPU matmul, called as ``matmul(x, *operands)`` on x [..., K],
        and its weight operands in the kernel's layout (built at the first call, then cached).
        This project's packed kernel where it runs here, else torch's (:meth:`torch_kernel`)."""
        packed = self.packed_kernel()
        return packed if packed is not None else (self.torch_kernel, *self.torch_kernel_inputs())

    def packed_kernel(self) -> tuple[Callable[..., torch.Tensor], ...] | None:
        """``(matmul, *operands)`` of :mod:`recyclegpt.core.quant_kernels`, or None."""
        return None

    def torch_kernel_inputs(self) -> tuple[torch.Tensor, ...]:
        """torch's CPU kernel's weight operands."""
        raise NotImplementedError

    def cpu_matmul(self, flat: torch.Tensor, *kernel_inputs: torch.Tensor) -> torch.Tensor:
        """[M, K] @ weight.T -> [M, N] in ``kernel_dtype`` with torch's CPU kernel."""
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] this layer computes with (torch's int8 and int4 CPU kernels also round
        activations to bf16)."""
        raise NotImplementedError

    def has_cpu_kernel(self) -> bool:
        return True

    def select_rows(self, ids: torch.Tensor) -> QuantizedLinear:
        """The same kind of layer over output rows ``ids`` only (a reduced draft vocabulary's head):
        every buffer of these layers is indexed by output row first."""
        rows = self.empty_like(ids.numel())
        for name, buffer in self.named_buffers(recurse=False):
            setattr(rows, name, buffer[ids].contiguous())
        return rows

    def empty_like(self, out_features: int) -> QuantizedLinear:
        """A layer of this kind and input size with ``out_features`` outputs (weights to be set)."""
        return type(self)(self.in_features, out_features, bias=self.bias is not None)

    def torch_kernel(self, x: torch.Tensor, *kernel_inputs: torch.Tensor) -> torch.Tensor:
        """torch's CPU kernel on x [..., K] in ``kernel_dtype``, 5-7 rows as two calls where
        ``row_block`` says so; the result in x's dtype."""
        flat = x.reshape(-1, self.in_features)
        if x.dtype != self.kernel_dtype:
            flat = flat.to(self.kernel_dtype)
        rows, block = flat.shape[0], self.row_block
        if block is not None and block < rows < 2 * block:
            out = torch.cat(
                (self.cpu_matmul(flat[:block], *kernel_inputs), self.cpu_matmul(flat[block:], *kernel_inputs))
            )
        else:
            out = self.cpu_matmul(flat, *kernel_inputs)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def cpu_kernel(self) -> tuple[Callable[..., torch.Tensor], ...]:
        """:meth:`make_kernel`'s ``(matmul, *operands)``, made at the first call and kept (in ``_kernel``)
        until the buffers move or reload."""
        if self._kernel is None:
            self._kernel = self.make_kernel()
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.has_cpu_kernel():
            matmul, *operands = self.cpu_kernel()
            out = matmul(x, *operands)
        else:
            out = F.linear(x, self.dequantized(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)


class Int8Linear(QuantizedLinear):
    """``nn.Linear`` with an int8 weight [N, K] and per-output-channel ``scales`` [N]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        quantized, scales = quantize_weight(linear.weight)
        device, dtype = linear.weight.device, linear.weight.dtype
        layer.weight = quantized.to(device)
        layer.scales = scales.to(device=device, dtype=dtype)
        layer.copy_bias_from(linear)
        return layer

    def packed_kernel(self) -> tuple[Callable[..., torch.Tensor], ...] | None:
        if not (quant_kernels.available() and quant_kernels.int8_fits(self.in_features)):
            return None
        packed, scales = quant_kernels.pack_int8(self.weight, self.scales)
        return quant_kernels.build().int8_matmul, packed, scales, self.out_features

    def torch_kernel_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.scales.to(torch.bfloat16),)

    def cpu_matmul(self, flat: torch.Tensor, *kernel_inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.weight, kernel_inputs[0])

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int8Activations:
    """What w8a8 and w4a8 layers add to their weight-only base class: activations rounded to int8
    in blocks of 32 (:func:`quantize_activations`), multiplied by :meth:`dynamic_kernel` on AVX-512
    VNNI and AVX2 CPUs, elsewhere rounded before the base class's own matmul (correct, not fast)."""

    def dynamic_kernel(self) -> tuple[Callable[..., torch.Tensor], ...] | None:
        """``(matmul, *operands)`` of the int8-activation kernel for this layer, or None where it cannot take it."""
        raise NotImplementedError

    def make_kernel(self) -> tuple[Callable[..., torch.Tensor], ...]:
        kernel = self.dynamic_kernel() if quant_kernels.dynamic_available() else None
        if kernel is not None:
            return kernel
        matmul, *operands = super().make_kernel()
        return functools.partial(with_quantized_activations, matmul), *operands

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            x = quantize_activations(x)
        return super().forward(x)


class W8A8Linear(Int8Activations, Int8Linear):
    """:class:`Int8Linear` (same buffers) whose activations are quantized to int8 too, in blocks of 32
    along K: an integer matmul on AVX-512 VNNI and AVX2 CPUs."""

    def dynamic_kernel(self) -> tuple[Callable[..., torch.Tensor], ...]:
        packed, scales = quant_kernels.pack_int8(self.weight, self.scales, offset=True)
        vnni = quant_kernels.dynamic_uses_vnni()
        return quant_kernels.build().int8_dynamic_matmul, packed, scales, self.out_features, vnni

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int8 weights, int8 activations in blocks of {ACTIVATION_BLOCK}"
        )


def with_quantized_activations(matmul: Callable[..., torch.Tensor], x: torch.Tensor, *operands) -> torch.Tensor:  # noqa: ANN002
    """``matmul`` (a weight-only int8 or int4 kernel) on x rounded as w8a8 and w4a8 round it."""
    return matmul(quantize_activations(x), *operands)


class Int4Linear(QuantizedLinear):
    """``nn.Linear`` with a 4-bit weight in groups: ``weight`` [N, K/2] uint8, two values a byte,
    high nibble first; ``scales`` and ``mins`` [N, K / group_size]. On CPU the kernel's packed copy
    lives beside the plain one (about 1.5 bytes a weight in all, against 1 for int8)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, group_size: int = INT4_GROUP_SIZE
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size))
        self.register_buffer("mins", torch.zeros(out_features, in_features // group_size))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        q, scales, mins = quantize_weight_int4(linear.weight, group_size)
        device, dtype = linear.weight.device, linear.weight.dtype
        layer.weight = (q[:, 0::2] << 4 | q[:, 1::2]).to(device)
        layer.scales, layer.mins = scales.to(device=device, dtype=dtype), mins.to(device=device, dtype=dtype)
        layer.copy_bias_from(linear)
        return layer

    def empty_like(self, out_features: int) -> Int4Linear:
        if out_features % INT4_OUTPUT_TILE:
            raise ValueError(f"an int4 layer needs a multiple of {INT4_OUTPUT_TILE} output rows, got {out_features}")
        return type(self)(self.in_features, out_features, self.bias is not None, self.group_size)

    def unpacked(self) -> torch.Tensor:
        """q [N, K] as int32, 0..15."""
        q = torch.stack((self.weight >> 4, self.weight & 0xF), dim=-1)
        return q.view(self.out_features, self.in_features).to(torch.int32)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = self.unpacked().view(self.out_features, -1, self.group_size).to(torch.float32)
        weight = groups * self.scales.float()[..., None] + self.mins.float()[..., None]
        return weight.view(self.out_features, self.in_features).to(dtype)

    def torch_kernel_inputs(self) -> tuple[torch.Tensor, ...]:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked(), 1)
        zeros = self.mins.float() + (INT4_MAX + 1) // 2 * self.scales.float()  # the kernel: (q - 8) * s + z
        scales_zeros = torch.stack((self.scales.float(), zeros), dim=-1).transpose(0, 1).contiguous()
        return packed, scales_zeros.to(torch.bfloat16)

    def cpu_matmul(self, flat: torch.Tensor, *kernel_inputs: torch.Tensor) -> torch.Tensor:
        packed, scales_zeros = kernel_inputs
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_zeros)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 weight-only, groups of {self.group_size}"
        )


class W4A8Linear(Int8Activations, Int4Linear):
    """:class:`Int4Linear` (same buffers) whose activations are quantized to int8 in blocks of 32, as
    llama.cpp runs Q4_1 weights: integer dot products on AVX-512 VNNI and AVX2 CPUs (groups of 32 only; the
    kernel reads scales and minimums rounded to fp16, as GGUF stores them)."""

    def dynamic_kernel(self) -> tuple[Callable[..., torch.Tensor], ...] | None:
        if self.group_size != ACTIVATION_BLOCK:
            return None
        packed = quant_kernels.pack_int4(self.unpacked(), self.scales, self.mins)
        if packed is None:
            return None
        return quant_kernels.build().int4_dynamic_matmul, *packed, self.out_features, quant_kernels.dynamic_uses_vnni()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int8 activations in blocks of {ACTIVATION_BLOCK}"


class Fp16Linear(QuantizedLinear):
    """``nn.Linear`` with an fp16 weight [N, K]; on x86 CPUs FBGEMM's packed fp16 GEMM over fp32
    activations (its packed copy lives beside the plain one, so memory is about fp32's), one row
    per call where its rows depend on their neighbours (:func:`fp16_rows_independent`)."""

    kernel_dtype = torch.float32
    row_block = None  # FBGEMM's AVX-512 cost grows slowly with rows (AVX2: row by row anyway, cpu_matmul)

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp16Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight = linear.weight.detach().to(torch.float16)
        if not bool(torch.isfinite(layer.weight).all()):
            raise ValueError(f"a weight of this {linear.out_features}x{linear.in_features} linear exceeds fp16's range")
        layer.copy_bias_from(linear)
        return layer

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        weight = self.weight
        module = super()._apply(fn, recurse)
        if self.weight.dtype != torch.float16:  # .to(dtype) casts floating buffers; only the device may change
            self.weight = weight.to(self.weight.device)
        return module

    def has_cpu_kernel(self) -> bool:
        return fp16_kernel_available()

    def torch_kernel_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.ops.quantized.linear_prepack_fp16(self.weight.float(), None),)

    def cpu_matmul(self, flat: torch.Tensor, *kernel_inputs: torch.Tensor) -> torch.Tensor:
        if flat.shape[0] > 1 and not fp16_rows_independent():
            return torch.cat([torch.ops.quantized.linear_dynamic_fp16(row, kernel_inputs[0]) for row in flat.split(1)])
        return torch.ops.quantized.linear_dynamic_fp16(flat, kernel_inputs[0])

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weight-only"


WEIGHT_LAYERS: dict[str, type[QuantizedLinear]] = {
    "int8": Int8Linear,
    "int4": Int4Linear,
    "fp16": Fp16Linear,
    "w8a8": W8A8Linear,
    "w4a8": W4A8Linear,
}


def quantized_linear(linear: nn.Linear, weights: str) -> QuantizedLinear:
    """``linear`` with ``weights`` = ``int8``, ``int4`` (int8 where the int4 kernel cannot take the
    shape), ``fp16``, ``w8a8`` or ``w4a8`` (w8a8 where int4 cannot take the shape; int8 where K is
    not a multiple of 32) weights."""
    if weights == "w4a8" and not int4_fits(linear):
        weights = "w8a8"
    if weights == "int4" and not int4_fits(linear):
        weights = "int8"
    if weights in ("w8a8", "w4a8") and not quant_kernels.dynamic_fits(linear.in_features):
        weights = "int8"
    if weights not in WEIGHT_LAYERS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_LAYERS)}, got {weights!r}")
    return WEIGHT_LAYERS[weights].from_linear(linear)


def rounds_to_bf16(quantize: str | None) -> bool:
    """Do the CPU kernels of a model quantized as ``quantize`` take and give bf16 whatever the
    model's dtype? torch's int8 and int4 kernels do; the packed int8 kernels (AVX-512) and fp16's
    compute in fp32."""
    if quantize in ("w8a8", "w4a8") and quant_kernels.dynamic_available():
        return False
    if quantize in ("int8", "w8a8"):
        return not quant_kernels.available()
    return quantize in ("int4", "w4a8")


def quantize_linears(root: nn.Module, weights: str = "int8") -> int:
    """Replace every ``nn.Linear`` under ``root`` by :func:`quantized_linear`, in place; how many."""
    count = 0
    for name, child in list(root.named_children()):
        if isinstance(child, nn.Linear):
            setattr(root, name, quantized_linear(child, weights))
            count += 1
        else:
            count += quantize_linears(child, weights)
    return count
