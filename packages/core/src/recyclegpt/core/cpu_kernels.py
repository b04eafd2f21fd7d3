"""The project's C++ CPU kernels, built once per machine at first use.

One extension holds the decode-step kernels (``step_kernels.cpp``), the int8 matmuls
(``quant_kernels.cpp``), the fp32 matmul (``float_kernels.cpp``) and whole decoder layers over
them (``layer_kernels.cpp``). torch's ``cpp_extension``
compiles it (~30-40 s on 2 cores; a C++ compiler and ``ninja``) and caches it (``TORCH_EXTENSIONS_DIR``). Where it cannot be built, the
callers fall back to eager PyTorch and torch's own kernels, after one logged warning.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
# The most tokens a row of a decode step has, for every kernel that serves steps: longer inputs are
# prompts (compute, not overhead), where eager PyTorch and torch's matmul are faster.
MAX_STEP_TOKENS = 16
# A prompt up to this long runs as steps of MAX_STEP_TOKENS where a stack's layers are one call: eager
# PyTorch pays its ~20 small operators a layer more than the kernels' slower products lose (measured
# on a Zen 3 EPYC, 2 threads, 32 / 48 / 64 tokens: the demo model 5.5 -> 2.3 / 6.6 -> 4.0 / 6.9 ->
# 5.0 ms; SmolLM2 fp32 119 -> 81 / 118 -> 108 / 136 -> 143 ms).
PROMPT_STEP_TOKENS = 48
SOURCES = [HERE / name for name in ("step_kernels.cpp", "quant_kernels.cpp", "float_kernels.cpp", "layer_kernels.cpp")]
FUNCTIONS = [
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "rope_attend",
    "set_step_kernels_avx2",
    "int8_matmul",
    "int8_dynamic_matmul",
    "int8_dynamic_supported",
    "int8_dynamic_avx2_supported",
    "int4_dynamic_matmul",
    "float_matmul",
    "float_matmul_supported",
    "decode_layers_step",
    "decode_stack_step",
    "head_argmax",
]


def switched_on(variable: str) -> bool:
    """Is the environment switch ``variable`` unset or on (anything but 0/false/no/off)?"""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def build() -> ModuleType | None:
    """The compiled extension, or None (with one logged line saying why) where it cannot be built."""
    try:
        import ninja  # noqa: PLC0415 - only the build needs it
        from torch.utils import cpp_extension  # noqa: PLC0415

        # torch looks for the ninja executable on PATH; a venv's bin directory may not be on it.
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return cpp_extension.load_inline(
            name="recyclegpt_cpu_kernels",
            cpp_sources=[source.read_text() for source in SOURCES],
            functions=FUNCTIONS,
            # The step kernels round exactly where eager PyTorch rounds: no fused multiply-adds
            # (the int8 matmul turns them back on for its own functions).
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"],
            # at::parallel_for is inline OpenMP: without -fopenmp it runs every loop on one thread.
            # The extension then shares the OpenMP runtime torch has loaded (libgomp.so.1).
            extra_ldflags=["-fopenmp"],
        )
    except Exception as err:  # noqa: BLE001 - any build failure means: run without them
        log.warning(
            "CPU kernels unavailable (%s: %s); running eager PyTorch and torch's kernels", type(err).__name__, err
        )
        return None
