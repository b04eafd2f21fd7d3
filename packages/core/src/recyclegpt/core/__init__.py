"""recyclegpt.core: the RecycleGPT model, its recyclable module, losses, decoders and weights I/O."""

from recyclegpt.core.config import RecycleConfig
from recyclegpt.core.decoding import DECODING_MODES, GenerationOutput, generate
from recyclegpt.core.losses import RecycleLosses, recycle_losses
from recyclegpt.core.model import KVCache, RecycleGPT, module_parameter_ratio

__all__ = [
    "DECODING_MODES",
    "GenerationOutput",
    "KVCache",
    "RecycleConfig",
    "RecycleGPT",
    "RecycleLosses",
    "generate",
    "module_parameter_ratio",
    "recycle_losses",
]
