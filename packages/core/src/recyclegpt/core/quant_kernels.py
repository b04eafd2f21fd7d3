"""Int8 matmuls for decoding on x86 CPUs (``quant_kernels.cpp``).

``int8_matmul`` (weight-only int8) reads each weight tile once for up to eight activation rows and
computes every output as one fixed-order fp32 sum, so a k-token step gives exactly what k one-token
steps give, and fp32 activations stay fp32 (torch's ``_weight_int8pack_mm`` rounds them to bf16).
Measured on a 2-core AMD EPYC with AVX-512 BF16, SmolLM2-135M in bf16, in one process, two runs: a
1-token step 10.2-12.4 ms against 13.4-16.9 with torch's kernel, standard decoding 1.19-1.23x
faster (then still on one thread: see ``cpu_kernels``). An int4 kernel of the same design was level
with torch's ``_weight_int4pack_mm_for_cpu`` at best, and an 8-wide AVX2 build of this one slower
than torch's for one row, so weight-only int4, AVX2 CPUs, and any run with
``RECYCLEGPT_QUANT_KERNELS=0`` use torch's kernels.

``int8_dynamic_matmul`` (w8a8) and ``int4_dynamic_matmul`` (w4a8) quantize the activations to int8
in blocks of 32 and sum with AVX-512 VNNI integer dot products: a row costs a quarter of the fp32
multiply-adds, so k-token steps cost much less (SmolLM2's decoder linears, 5 rows against 1: 1.4x
for w8a8, 1.9x for packed int8, same machine). On CPUs without VNNI (the AVX2 class) their AVX2
twins compute the same exact block sums with ``vpmaddubsw`` and give the same results bit for bit
(:func:`dynamic_isa` picks, as torch's own dispatch sees the CPU).

Packed layouts (a copy a layer keeps beside its plain weight): int8, tiles of 64 output channels,
each one contiguous run of 32-bit lanes, one lane per channel for every 4 values along K,
``[N/64, K/4, 64]`` (byte j = q[k + j]; q + 128 for w8a8), with fp32 scales ``[N/64 * 64]``; int4,
tiles of 32 channels, one lane per channel for every 8 values (byte j: q[k + j] in its low nibble,
q[k + 4 + j] in its high one), ``[N/32, K/8, 32]``, with fp16 scales and minimums ``[N/32, K/32, 32]``.
"""

from __future__ import annotations

import functools

import torch

from recyclegpt.core.cpu_kernels import build, switched_on

ENV_SWITCH = "RECYCLEGPT_QUANT_KERNELS"
TILE = 64  # output channels a packed tile holds
INT4_TILE = 32  # the same for int4_dynamic_matmul
ACTIVATION_BLOCK = 32  # activation values one int8 scale covers (int8_dynamic_matmul)


@functools.cache
def available() -> bool:
    """Do these kernels run here: an AVX-512 CPU as torch's own dispatch sees it (so
    ``ATEN_CPU_CAPABILITY=avx2`` turns them off too), built, and not switched off?"""
    if not switched_on(ENV_SWITCH) or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return build() is not None


def tiles(tensor: torch.Tensor, width: int = TILE) -> torch.Tensor:
    """[N, ...] -> [ceil(N / width), width, ...], zero rows appended where N is not a multiple of it."""
    extra = -tensor.shape[0] % width
    if extra:
        tensor = torch.cat((tensor, tensor.new_zeros(extra, *tensor.shape[1:])))
    return tensor.view(-1, width, *tensor.shape[1:])


@functools.cache
def dynamic_isa() -> str | None:
    """Which int8-activation kernels (w8a8, w4a8) run here: ``"avx512_vnni"`` where torch dispatches
    AVX-512 and the CPU has VNNI, ``"avx2"`` on other CPUs with AVX2, FMA and F16C (so
    ``ATEN_CPU_CAPABILITY=avx2`` picks the AVX2 kernels, as on the AVX2 class), None where they are
    not built or are switched off (``RECYCLEGPT_QUANT_KERNELS=0``)."""
    if not switched_on(ENV_SWITCH) or build() is None:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") and build().int8_dynamic_supported():
        return "avx512_vnni"
    if capability.startswith(("AVX2", "AVX512")) and build().int8_dynamic_avx2_supported():
        return "avx2"
    return None


def dynamic_available() -> bool:
    """Do the int8-activation kernels (w8a8, w4a8) run here (:func:`dynamic_isa`)?"""
    return dynamic_isa() is not None


def dynamic_uses_vnni() -> bool:
    """The ``vnni`` argument of the int8-activation kernels here: the VNNI kernels, else the AVX2 ones."""
    return dynamic_isa() == "avx512_vnni"


def dynamic_fits(in_features: int) -> bool:
    """Can the int8-activation kernels take ``in_features`` columns (whole blocks of 32)?"""
    return in_features % ACTIVATION_BLOCK == 0


def int8_fits(in_features: int) -> bool:
    """Can the packed int8 kernel take weights with ``in_features`` columns (whole lanes of four)?"""
    return in_features % 4 == 0


def pack_int8(weight: torch.Tensor, scales: torch.Tensor, offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``weight`` [N, K] and ``scales`` [N] -> the kernel's ``[N/64, K/4, 64]`` lanes and fp32
    scales; ``offset``: bytes of q + 128 (:func:`int8_dynamic_matmul`'s unsigned operand)."""
    rows, cols = weight.shape
    weight = weight.cpu().contiguous()
    if offset:
        weight = weight.view(torch.uint8) ^ 0x80  # two's complement q, top bit flipped: q + 128
    lanes = weight.view(torch.int32)  # four consecutive k of a row in each lane
    packed = tiles(lanes.view(rows, cols // 4)).transpose(1, 2).contiguous()
    return packed, tiles(scales.detach().cpu().float()).reshape(-1).contiguous()


def pack_int4(
    q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Q4_1 groups of 32 (``q`` [N, K] in 0..15, ``scales`` and ``mins`` [N, K/32]) -> the lanes
    ``[N/32, K/8, 32]`` of :func:`int4_dynamic_matmul` (byte j: q[k + j] low, q[k + 4 + j] high) and
    fp16 scales and minimums ``[N/32, K/32, 32]``; None where one of those exceeds fp16's range."""
    rows, cols = q.shape
    octets = q.cpu().to(torch.uint8).view(rows, cols // 8, 2, 4)
    lanes = (octets[:, :, 0] | octets[:, :, 1] << 4).contiguous().view(torch.int32).view(rows, cols // 8)
    halves = [values.detach().cpu().to(torch.float16) for values in (scales, mins)]
    if not all(bool(torch.isfinite(h).all()) for h in halves):
        return None
    packed_scales, packed_mins = (tiles(h, INT4_TILE).transpose(1, 2).contiguous() for h in halves)
    return tiles(lanes, INT4_TILE).transpose(1, 2).contiguous(), packed_scales, packed_mins
