"""Typed configuration of a RecycleGPT model: a Llama-family base plus a recyclable module."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "recyclegpt"  # config.json of a saved RecycleGPT (base and trained module)


@dataclass
class RecycleConfig:
    """Shape of the base decoder and of its recyclable module.

    The base is a Llama-style decoder (RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query
    attention). The module reads ``concat(h[t-1], embed(x[t]))``, projects it to ``hidden_size``,
    runs ``module_layers`` decoder layers and predicts ``x[t+1]`` through the shared LM head,
    restricted to the ``draft_vocab_size`` most frequent tokens when that is set (None: all).
    With ``feature_layers`` (EAGLE-3's fused features) h[t-1] is replaced by a projection of the
    final state and the RMS-normalised outputs of those base layers (0-based).
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    module_layers: int = 1
    module_intermediate_size: int | None = None
    draft_vocab_size: int | None = None
    feature_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = _swiglu_width(self.hidden_size)
        if self.module_intermediate_size is None:
            self.module_intermediate_size = self.intermediate_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.module_layers < 1:
            raise ValueError(f"module_layers must be >= 1, got {self.module_layers}")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], got {self.draft_vocab_size}"
            )
        self.feature_layers = sorted(int(index) for index in self.feature_layers)
        if any(not 0 <= index < self.num_layers - 1 for index in self.feature_layers):
            raise ValueError(
                f"feature_layers must be base layers 0..{self.num_layers - 2} (the last one's output is the "
                f"final state, always read), got {self.feature_layers}"
            )
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature_layers has repeats: {self.feature_layers}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def feature_width(self) -> int:
        """Width of the base states the module reads: the final state, then each feature layer's output."""
        return (len(self.feature_layers) + 1) * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecycleConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type", "architectures"})
        if unknown:
            raise ValueError(f"unknown RecycleConfig keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RecycleConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf(cls, hf_config: Any, module_layers: int = 1, feature_layers: list[int] | None = None) -> RecycleConfig:
        """Build from a transformers ``LlamaConfig`` (or any Llama-family config)."""
        rope_scaling = getattr(hf_config, "rope_scaling", None)
        rope_theta = getattr(hf_config, "rope_theta", None)
        if isinstance(rope_scaling, dict):
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only 'default')")
            rope_theta = rope_scaling.get("rope_theta", rope_theta)
        rope_params = getattr(hf_config, "rope_parameters", None)
        if isinstance(rope_params, dict):
            rope_type = rope_params.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"rope type {rope_type!r} is not supported (only 'default')")
            rope_theta = rope_params.get("rope_theta", rope_theta)
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None),
            intermediate_size=hf_config.intermediate_size,
            max_seq_len=hf_config.max_position_embeddings,
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=hf_config.rms_norm_eps,
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            module_layers=module_layers,
            feature_layers=list(feature_layers or []),
            bos_token_id=_first(getattr(hf_config, "bos_token_id", None)),
            eos_token_id=_first(getattr(hf_config, "eos_token_id", None)),
            pad_token_id=_first(getattr(hf_config, "pad_token_id", None)),
        )

    def to_hf(self) -> Any:
        """The equivalent transformers ``LlamaConfig`` of the base (the module has no HF twin)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            attention_bias=self.attention_bias,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )


def _swiglu_width(hidden_size: int, multiple_of: int = 64) -> int:
    width = int(8 * hidden_size / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def _first(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)
