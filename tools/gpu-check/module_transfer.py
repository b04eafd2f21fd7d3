"""Move a saved RecycleGPT whose base came from a GGUF file to a machine that has that file, without
its 0.5 GB of fp32 base weights: ``split`` keeps the module's tensors and the small files, ``join``
puts the model directory together again from them and the GGUF.

    python tools/gpu-check/module_transfer.py split runs/smollm2/model parts/
    python tools/gpu-check/module_transfer.py join parts/ SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2/model
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recyclegpt.core.checkpoint import load_pretrained

MODULE_FILE = "module.safetensors"
WEIGHTS_FILE = "model.safetensors"
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def split(model_dir: Path, parts: Path) -> None:
    tensors = load_file(model_dir / WEIGHTS_FILE)
    parts.mkdir(parents=True, exist_ok=True)
    module = {name: t.contiguous() for name, t in tensors.items() if name.startswith("recycle.")}
    save_file(module, parts / MODULE_FILE, metadata={"format": "pt"})
    for name in SMALL_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, parts / name)
    print(f"{parts}: {sum(t.numel() for t in module.values()) / 1e6:.2f}M module parameters and the small files")


def join(parts: Path, gguf: Path, model_dir: Path, reference: Path | None) -> None:
    base = load_pretrained(gguf).state_dict()
    tied = json.loads((parts / "config.json").read_text())["tie_embeddings"]
    leave_out = ("recycle.",) + (("model.embed_tokens.",) if tied else ())  # a tied embedding is saved as the head
    tensors = {name: t.clone().contiguous() for name, t in base.items() if not name.startswith(leave_out)}
    tensors.update(load_file(parts / MODULE_FILE))
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, model_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    for name in SMALL_FILES:
        if (parts / name).exists():
            shutil.copy(parts / name, model_dir / name)
    print(f"{model_dir}: {len(tensors)} tensors")
    if reference is not None:
        expected = load_file(reference / WEIGHTS_FILE)
        differ = sorted(set(expected) ^ set(tensors)) or [
            n for n in expected if not torch.equal(expected[n], tensors[n])
        ]
        if differ:
            sys.exit(f"error: {model_dir} differs from {reference}: {differ[:5]}")
        print(f"identical to {reference}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    split_parser = commands.add_parser("split", help="module tensors and small files of MODEL_DIR into PARTS")
    split_parser.add_argument("model_dir", type=Path)
    split_parser.add_argument("parts", type=Path)
    join_parser = commands.add_parser("join", help="PARTS and the GGUF base into MODEL_DIR")
    join_parser.add_argument("parts", type=Path)
    join_parser.add_argument("gguf", type=Path)
    join_parser.add_argument("model_dir", type=Path)
    join_parser.add_argument("--check", type=Path, default=None, help="a model directory the result must equal")
    args = parser.parse_args()
    if args.command == "split":
        split(args.model_dir, args.parts)
    else:
        join(args.parts, args.gguf, args.model_dir, args.check)


if __name__ == "__main__":
    main()
