"""Weight-only int8 and int4 matmuls for decoding on AVX-512 CPUs (``quant_kernels.cpp``).

They read each weight tile once for up to eight activation rows and compute every output as one
fixed-order fp32 sum, so a k-token step gives exactly what k one-token steps give, and fp32
activations stay fp32 (torch's kernels, ``_weight_int8pack_mm`` and
``_weight_int4pack_mm_for_cpu``, round them to bf16). Measured on a 2-core AVX-512 BF16 CPU with
SmolLM2-135M (bf16 activations): an int8 1-token step ~1.3x faster than torch's kernel gives, int4
level with it, module steps ~1.25x faster. On AVX2 the same code (8-wide) was slower than torch's
for one row, so AVX2 CPUs, or any run with ``RECYCLEGPT_QUANT_KERNELS=0``, use torch's kernels.

Packed layouts (a copy a layer keeps beside its plain weight): tiles of 64 output channels, each
one contiguous run of 32-bit lanes, one lane per channel for every 4 (int8) or 8 (int4) values
along K: int8 ``[N/64, K/4, 64]`` (byte j = q[k + j]) with fp32 scales ``[N/64 * 64]``; int4
``[N/64, K/8, 64]`` (bits 4j..4j+3 = q[k + j]) with fp32 ``scale_min`` ``[N/64, K/32, 2, 64]``.
"""

from __future__ import annotations

import functools

import torch

from recyclegpt.core.cpu_kernels import build, switched_on

ENV_SWITCH = "RECYCLEGPT_QUANT_KERNELS"
TILE = 64  # output channels a packed tile holds
GROUP = 32


@functools.cache
def available() -> bool:
    """Do these kernels run here: an AVX-512 CPU as torch's own dispatch sees it (so
    ``ATEN_CPU_CAPABILITY=avx2`` turns them off too), built, and not switched off?"""
    if not switched_on(ENV_SWITCH) or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return build() is not None


def tiles(tensor: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [ceil(N / 64), 64, ...], zero rows appended where N is not a multiple of 64."""
    extra = -tensor.shape[0] % TILE
    if extra:
        tensor = torch.cat((tensor, tensor.new_zeros(extra, *tensor.shape[1:])))
    return tensor.view(-1, TILE, *tensor.shape[1:])


def int8_fits(in_features: int) -> bool:
    """Can the packed int8 kernel take weights with ``in_features`` columns (whole lanes of four)?
    (An int4 weight is whole groups of 32 already.)"""
    return in_features % 4 == 0


def pack_int8(weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``weight`` [N, K] and ``scales`` [N] -> the kernel's ``[N/64, K/4, 64]`` lanes and fp32 scales."""
    rows, cols = weight.shape
    lanes = weight.cpu().contiguous().view(torch.int32)  # four consecutive k of a row in each lane
    packed = tiles(lanes.view(rows, cols // 4)).transpose(1, 2).contiguous()
    return packed, tiles(scales.detach().cpu().float()).reshape(-1).contiguous()


def pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] (0..15), ``scales`` and ``mins`` [N, K/32] -> ``[N/64, K/8, 64]`` lanes and
    ``scale_min`` ``[N/64, K/32, 2, 64]`` fp32."""
    rows, cols = q.shape
    eights = q.cpu().to(torch.int64).view(rows, cols // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    lanes = (eights << shifts).sum(-1)  # < 2**32: the nibbles do not overlap
    lanes = torch.where(lanes >= 2**31, lanes - 2**32, lanes).to(torch.int32)
    packed = tiles(lanes).transpose(1, 2).contiguous()
    scale_min = torch.stack((scales.detach().cpu().float(), mins.detach().cpu().float()), dim=-1)
    return packed, tiles(scale_min).permute(0, 2, 3, 1).contiguous()
