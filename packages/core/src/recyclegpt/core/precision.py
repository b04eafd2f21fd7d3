"""The one place that decides the compute precision for a device, from the hardware.

bf16 is chosen on CUDA devices that support it and on CPUs that compute it natively (AVX512-BF16
or AMX). Elsewhere, notably AVX2-only CPUs (AMD Zen 2/3, many laptops), bf16 matmuls are emulated
and run ~200x slower than fp32, so ``auto`` means fp32 there. Decoding on a CPU is the exception
(:func:`decode_dtype`): where this project's decode kernels run, its steps are fastest on fp32
activations, native bf16 or not. An explicit choice always wins; a bf16 choice on a CPU without
native bf16 prints a one-line warning with the measured cost.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
_BY_NAME = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SLOW_BF16_WARNING = (
    "warning: bf16 on a CPU without native bf16 ({capability}): bf16 matmuls run at ~0.3 GFLOPS against "
    "~67 in fp32 on such CPUs (training ~70x slower); use --dtype auto or fp32"
)


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels use (``AVX2``, ``AVX512``, ...), as torch reports it."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch, or a platform without the query
        return "unknown"


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")  # Linux only; elsewhere torch's own query decides
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text(errors="ignore").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX) *and* torch's kernels use it.

    torch's kernel dispatch is part of the test: with ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512
    machine torch runs AVX2 kernels, where bf16 is emulated and slow.
    """
    capability = cpu_capability().upper()
    if not capability.startswith("AVX512"):
        return False
    flags = _cpu_flags()
    if flags:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def auto_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where the device computes it natively, else fp32 (None: CUDA when present, else CPU)."""
    kind = _device_type(device)
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


# Weight formats (``quantize``) whose CPU decode steps run this project's kernels on fp32 activations:
# the fp32 matmul (unquantized) and the int8-activation matmuls, which take fp32 or bf16 input.
FP32_DECODE_FORMATS = ("none", "w8a8", "w4a8")


def cpu_decode_kernels_run(quantize: str | None = None) -> bool:
    """Do this project's CPU decode kernels for ``quantize`` weights run here (built, AVX2 and FMA, not
    switched off): the step kernels with the fp32 matmul (unquantized) or the int8-activation matmuls
    (w8a8, w4a8)?"""
    from recyclegpt.core import float_kernels, quant_kernels, step_kernels  # noqa: PLC0415 - builds them once

    if not step_kernels.enabled_by_environment():
        return False
    if quantize in ("w8a8", "w4a8"):
        return quant_kernels.dynamic_available()
    return float_kernels.available()


def decode_dtype(device: torch.device | str | None = None, quantize: str | None = None) -> torch.dtype:
    """What ``auto`` means for a model loaded to decode (``from_pretrained``, eval, serve, bench):
    :func:`auto_dtype`, except on a CPU with native bf16 where this project's decode kernels run and
    the weights are unquantized, w8a8 or w4a8: fp32 there. A decode step there is bound by its
    kernels' fixed costs and weight reads, which the fp32-activation kernels serve best: measured on
    an AMD EPYC Zen 4 (AVX-512 BF16, 2 threads), the demo model decoded 2,884 tokens/s in fp32
    against 568 in bf16 (its bf16 layers run torch's matmul a layer at a time), SmolLM2-135M 49.7
    against 35.8, and with w8a8 weights fp32 was as fast or faster (SmolLM2 188 against 183,
    alternating 301 against 283; w4a8 standard 240 against 225, alternating 293 against 334). fp32
    also keeps greedy speculative decoding equal to standard, and a batched row equal to a lone
    request, where bf16 rounding can flip near-ties (bf16 ran 8 unquantized SmolLM2 rows ~14%
    faster, but not row for row as alone)."""
    dtype = auto_dtype(device)
    if (
        dtype == torch.bfloat16
        and _device_type(device) == "cpu"
        and (quantize or "none") in FP32_DECODE_FORMATS
        and cpu_decode_kernels_run(quantize)
    ):
        return torch.float32
    return dtype


def resolve_decode_dtype(
    choice: torch.dtype | str | None = "auto", device: torch.device | str | None = None, quantize: str | None = None
) -> torch.dtype:
    """:func:`resolve_dtype` for a model loaded to decode: ``auto`` (or None) -> :func:`decode_dtype`."""
    if choice is None or choice == "auto":
        return decode_dtype(device, quantize)
    return resolve_dtype(choice, device)


def resolve_dtype(
    choice: torch.dtype | str | None = "auto", device: torch.device | str | None = None, warn: bool = True
) -> torch.dtype:
    """``auto`` (or None) -> :func:`auto_dtype`; a name or torch dtype -> itself, with a warning when
    it is bf16 on a CPU that emulates bf16."""
    if choice is None or choice == "auto":
        return auto_dtype(device)
    if isinstance(choice, torch.dtype):
        dtype = choice
    elif choice in _BY_NAME:
        dtype = _BY_NAME[choice]
    else:
        raise ValueError(f"unknown dtype {choice!r}: use one of {', '.join(DTYPE_CHOICES)}")
    if warn and dtype == torch.bfloat16 and _device_type(device) == "cpu" and not cpu_has_native_bf16():
        print(SLOW_BF16_WARNING.format(capability=cpu_capability()), file=sys.stderr, flush=True)
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16`` or ``fp16``."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def auto_precision(device: torch.device | str | None = None) -> str:
    """The Lightning ``precision`` that ``auto`` means: ``bf16-mixed`` where bf16 is native, else ``32-true``."""
    return "bf16-mixed" if auto_dtype(device) == torch.bfloat16 else "32-true"


def hardware_summary(device: torch.device | str | None = None) -> str:
    """One line naming the hardware a figure was measured on: device, CPU capability, bf16, threads."""
    kind = _device_type(device)
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    cpu = f"CPU {cpu_capability()} ({native}), {torch.get_num_threads()} threads"
    if kind == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA); {cpu}; torch {torch.__version__}"
    return f"{cpu}; torch {torch.__version__}"
