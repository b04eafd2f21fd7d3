"""A disk cache of a frozen base's final hidden states, so module training never runs the base.

The base reads every training token once; its states h [N, T, d] go to safetensors shards beside
the token blocks they came from. The cache is keyed by everything that determines them: the base's
weights, the token blocks (hence tokenizer, corpus and block size), the storage dtype, the
compute precision and the quantization the base computed them with (``quantize``: the states of the
base as decoding runs it, e.g. ``w8a8``, the states the module reads at decode time; the trainer's base
itself is never quantized). A cache whose key differs, or whose build did not finish, is rebuilt,
never used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from recyclegpt.core import RecycleGPT
from recyclegpt.core.fastpath import prepare_for_decoding
from recyclegpt.core.precision import dtype_name, resolve_dtype

MANIFEST = "manifest.json"
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 over the bytes, shapes and dtypes of tensors (in order)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(flat.shape)}:{flat.dtype};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def base_digest(model: RecycleGPT) -> str:
    """sha256 of the base's weights (the module's are irrelevant to its states)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("recycle.")}
    return tensor_digest([state[k] for k in sorted(state)])


def cache_key(
    model: RecycleGPT,
    blocks: torch.Tensor,
    storage: str,
    precision: str,
    base_sha256: str | None = None,
    quantize: str = "none",
) -> dict[str, Any]:
    """What determines the states of ``blocks``; ``base_sha256``: the base's digest taken earlier
    (before it was converted or quantized to compute them), else taken now. An unquantized key has
    no ``quantize`` entry (nor one of ``feature_layers`` without them), so caches written before they
    existed stay valid."""
    key = {
        "base_sha256": base_sha256 or base_digest(model),
        "blocks_sha256": tensor_digest([blocks]),
        "blocks_shape": list(blocks.shape),
        "hidden_size": model.config.hidden_size,
        "storage_dtype": storage,
        "compute_precision": precision,
    }
    if quantize != "none":
        key["quantize"] = quantize
    if model.config.feature_layers:  # the states hold those layers' outputs too
        key["feature_layers"] = list(model.config.feature_layers)
    return key


def quantized_base(model: RecycleGPT, quantize: str, precision: str) -> RecycleGPT:
    """A copy of ``model`` quantized as ``quantize`` (from its own, unquantized weights) in the
    ``precision`` dtype, to compute states as decoding will; ``model`` is left as it is."""
    with torch.no_grad():
        twin = prepare_for_decoding(copy.deepcopy(model), quantize=quantize)
    return twin.to(resolve_dtype(precision, warn=False)).eval()


@dataclass
class CacheReport:
    """What ``build_or_load`` did: whether it (re)built, why, and how long the base ran."""

    built: bool
    reason: str
    seconds: float
    tokens: int


class FeatureCache:
    """Hidden states of a frozen base over token blocks, in ``directory`` (one cache per directory)."""

    def __init__(self, directory: str | Path, storage: str = "bf16", shard_blocks: int = 64) -> None:
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"feature storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
        self.directory = Path(directory)
        self.storage = storage
        self.shard_blocks = shard_blocks

    def _manifest(self) -> dict[str, Any] | None:
        path = self.directory / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def mismatch(self, key: dict[str, Any]) -> str | None:
        """Why the stored cache cannot be used for ``key`` (None: it can)."""
        manifest = self._manifest()
        if manifest is None:
            return "no complete cache"
        stored = manifest.get("key", {})
        changed = sorted(name for name in set(key) | set(stored) if key.get(name) != stored.get(name))
        if changed:
            return "changed: " + ", ".join(changed)
        missing = [s for s in manifest.get("shards", []) if not (self.directory / s).exists()]
        return f"missing shards: {', '.join(missing)}" if missing else None

    def build_or_load(
        self,
        model: RecycleGPT,
        blocks: torch.Tensor,
        precision: str = "fp32",
        forward_context: Callable[[], AbstractContextManager] = nullcontext,
        batch_size: int = 8,
        log: Callable[[str], None] = print,
        quantize: str = "none",
    ) -> tuple[torch.Tensor, CacheReport]:
        """The base's final states for ``blocks`` [N, T] -> [N, T, d] in the storage dtype; with
        ``quantize``, those of a copy of the base quantized so, in the ``precision`` dtype (then
        ``forward_context`` is not used)."""
        key = cache_key(model, blocks, self.storage, precision, quantize=quantize)
        reason = self.mismatch(key)
        if reason is None:
            return self.load(blocks), CacheReport(False, "reused", 0.0, 0)
        log(f"feature cache {self.directory}: building ({reason}); {blocks.numel()} tokens through the base")
        if quantize != "none":
            model, forward_context = quantized_base(model, quantize, precision), nullcontext
        hidden, seconds = self._build(model, blocks, key, forward_context, batch_size, log)
        log(f"feature cache {self.directory}: {blocks.numel()} tokens in {seconds:.0f} s")
        return hidden, CacheReport(True, reason, seconds, blocks.numel())

    @torch.no_grad()
    def _build(
        self,
        model: RecycleGPT,
        blocks: torch.Tensor,
        key: dict[str, Any],
        forward_context: Callable[[], AbstractContextManager],
        batch_size: int,
        log: Callable[[str], None],
    ) -> tuple[torch.Tensor, float]:
        """Run the base over every block and store the states; the states (in the storage dtype, as
        :meth:`load` would read them back) and the seconds the base ran."""
        start = time.perf_counter()
        device = model.lm_head.weight.device
        dtype = STORAGE_DTYPES[self.storage]
        states = []
        was_training = model.training
        model.eval()
        try:
            for first in range(0, blocks.shape[0], batch_size):
                with forward_context():
                    states.append(model.base_hidden(blocks[first : first + batch_size].to(device)).to(dtype).cpu())
                if (first // batch_size + 1) % 32 == 0:
                    log(f"feature cache: {min(first + batch_size, blocks.shape[0])}/{blocks.shape[0]} blocks")
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        hidden = torch.cat(states)
        self.store(blocks, hidden, key, seconds)
        return hidden, seconds

    def store(self, blocks: torch.Tensor, hidden: torch.Tensor, key: dict[str, Any], seconds: float = 0.0) -> None:
        """Write the states ``hidden`` [N, T, d] of ``blocks`` [N, T] as the cache for ``key`` (from
        :func:`cache_key`), replacing what was there; the manifest (written last) marks it complete."""
        if blocks.shape != hidden.shape[:2]:
            raise ValueError(f"blocks {tuple(blocks.shape)} and hidden {tuple(hidden.shape)} differ")
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        dtype = STORAGE_DTYPES[self.storage]
        shards = []
        for index, first in enumerate(range(0, blocks.shape[0], self.shard_blocks)):
            name = f"features-{index:05d}.safetensors"
            part = {
                "input_ids": blocks[first : first + self.shard_blocks].contiguous(),
                "hidden": hidden[first : first + self.shard_blocks].to(dtype).contiguous(),
            }
            save_file(part, str(self.directory / name))
            shards.append(name)
        manifest = {
            "key": key,
            "shards": shards,
            "dtype": dtype_name(dtype),
            "tokens": blocks.numel(),
            "build_seconds": round(seconds, 1),
        }
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(self.directory / MANIFEST)

    def load(self, blocks: torch.Tensor) -> torch.Tensor:
        manifest = self._manifest()
        parts = [load_file(str(self.directory / name)) for name in manifest["shards"]]
        ids = torch.cat([p["input_ids"] for p in parts])
        if not torch.equal(ids, blocks):
            raise RuntimeError(f"feature cache {self.directory} holds other token blocks than its key says")
        return torch.cat([p["hidden"] for p in parts])


class FeatureDataset(Dataset):
    """Rows of (token block, the base's hidden states for it)."""

    def __init__(self, blocks: torch.Tensor, hidden: torch.Tensor) -> None:
        if blocks.shape != hidden.shape[:2]:
            raise ValueError(f"blocks {tuple(blocks.shape)} and hidden {tuple(hidden.shape)} differ")
        self.blocks = blocks
        self.hidden = hidden

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "hidden": self.hidden[index]}
