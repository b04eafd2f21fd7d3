"""Checkpoints written atomically: a temporary file in the same directory, fsync, then os.replace.

Lightning's TorchCheckpointIO writes through an fsspec transaction whose temporary file lives in the
system temp directory, so the final move can cross filesystems and is then a copy, not a rename: a
kill during that copy leaves a truncated ``last.ckpt``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # A save killed mid-write (SIGKILL runs no cleanup) leaves its temporary file behind; saves
        # are sequential (rank 0 only), so any other one here is such a leftover: remove it.
        for stale in target.parent.glob(".*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)
