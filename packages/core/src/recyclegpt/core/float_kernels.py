"""fp32 linears for decode steps on x86 CPUs (``float_kernels.cpp``).

torch's fp32 matmul (MKL) on an AVX2 EPYC costs about twice as much for 2 rows as for 1, so there a
k-token step cost nearly k one-token steps and recycling gained nothing in fp32. The kernel reads
each weight once for up to six rows, straight from ``nn.Linear``'s own weight (no packed copy),
and computes every output as one fixed-order sum, so a row's result never depends on the rows
beside it: a k-token step gives exactly what k one-token steps give, and a batched row what a lone
one gives. It is not bit-equal to MKL (another summation order), so a prepared model's fp32 outputs
differ from the unprepared one's in the last bits.

:class:`KernelLinear` is ``nn.Linear`` (same parameters, same state dict) whose fp32 inference calls
on CPU run the kernel; prompts, training, CUDA, other dtypes and ``RECYCLEGPT_FLOAT_KERNELS=0`` run
``F.linear``. :func:`recyclegpt.core.fastpath.use_step_kernels` puts it in place with the step
kernels: a runtime choice, not recorded in a saved model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from recyclegpt.core.cpu_kernels import MAX_STEP_TOKENS, build, switched_on

ENV_SWITCH = "RECYCLEGPT_FLOAT_KERNELS"


def available() -> bool:
    """Does the kernel run here: built, on a CPU with AVX2 and FMA, and not switched off?"""
    kernels = build()
    return kernels is not None and usable(kernels)


@functools.cache
def usable(kernels: ModuleType) -> bool:
    """Does the built extension ``kernels`` run the fp32 kernel here (read once: the CPU and the switch)?"""
    return switched_on(ENV_SWITCH) and kernels.float_matmul_supported()


def runs_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Is ``x @ weight.T`` an fp32 CPU inference product the kernel takes here? Not a prompt: rows of
    more than :data:`MAX_STEP_TOKENS` tokens ([B, T, K], T > 16) are compute, where torch's matmul is
    faster (64 rows: ~1.2x). Decode steps of any batch stay on the kernel, and the server prefills
    each prompt alone, so its batched rows still equal lone requests."""
    return (
        not (x.dim() == 3 and x.shape[1] > MAX_STEP_TOKENS)
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.is_cpu
        and weight.is_cpu
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )


def linear_over(cls: type[nn.Linear], weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """A linear of class ``cls`` over these parameters (shared, not copied: tied weights stay tied)."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.out_features, layer.in_features = weight.shape
    layer.weight, layer.bias = weight, bias
    return layer


class KernelLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU inference calls run the kernel (``F.linear`` elsewhere)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> KernelLinear:
        return linear_over(cls, linear.weight, linear.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` over the same parameters."""
        return linear_over(nn.Linear, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not runs_kernel(x, weight):
            return F.linear(x, weight, self.bias)
        out = build().float_matmul(x, weight)
        return out if self.bias is None else out + self.bias

    def select_rows(self, ids: torch.Tensor) -> KernelLinear:
        """A kernel linear over output rows ``ids`` only (a reduced draft vocabulary's head), for inference."""
        weight = nn.Parameter(self.weight.detach()[ids].contiguous(), requires_grad=False)
        bias = None if self.bias is None else nn.Parameter(self.bias.detach()[ids].contiguous(), requires_grad=False)
        return linear_over(KernelLinear, weight, bias)


def swap_linears(root: nn.Module, kernel: bool) -> None:
    """Every plain ``nn.Linear`` under ``root`` becomes a :class:`KernelLinear` (``kernel``) or back."""
    for name, child in list(root.named_children()):
        if kernel and type(child) is nn.Linear:
            setattr(root, name, KernelLinear.from_linear(child))
        elif not kernel and type(child) is KernelLinear:
            setattr(root, name, child.to_linear())
        else:
            swap_linears(child, kernel)


class KernelStep:
    """A bias-free :class:`KernelLinear`'s forward for decode steps: the kernel on fp32 inputs, without
    the module's checks (they cost a few microseconds a call, a sizeable share of a small model's
    step). An object, not a closure, so that a deep copy of a model reads the copy's weight."""

    __slots__ = ("kernel", "weight")

    def __init__(self, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weight: nn.Parameter) -> None:
        self.kernel, self.weight = kernel, weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype is torch.float32 and weight.dtype is torch.float32:
            return self.kernel(x, weight)
        return F.linear(x, weight)


def step_forward(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a decode step calls for ``linear`` on CPU: a :class:`KernelStep` where the kernel runs,
    else ``linear.forward``."""
    if type(linear) is not KernelLinear or linear.bias is not None or not available():
        return linear.forward
    return KernelStep(build().float_matmul, linear.weight)
