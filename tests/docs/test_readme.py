"""The README cannot rot: every shell block marked `<!-- checked -->` runs, against a tiny config."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARK = "<!-- checked -->"

# Shrinks the documented commands to test size; each key must occur in some checked block.
TINY_RUN = {
    "configs/demo.yaml": str(ROOT / "tests" / "train" / "tiny.yaml"),
    "--trainer.max_steps 300": "--trainer.max_steps 4",
    "--bytes 100000": "--bytes 20000",
    "--max-tokens 8192": "--max-tokens 512",
}


def checked_blocks() -> list[str]:
    text = README.read_text()
    blocks = re.findall(re.escape(MARK) + r"\s*\n```bash\n(.*?)\n```", text, flags=re.S)
    marks = sum(line.strip() == MARK for line in text.splitlines())
    assert len(blocks) == marks, "every checked mark must be followed by a ```bash block"
    return blocks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_readme_has_checked_blocks_and_every_shrink_applies() -> None:
    blocks = checked_blocks()
    assert len(blocks) >= 2
    joined = "\n".join(blocks)
    for key in TINY_RUN:
        assert key in joined, f"{key!r} no longer appears in a checked README block"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for all blocks, run in README order, as a reader would."""
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("index", range(len(checked_blocks())))
def test_checked_readme_block_runs(index: int, workdir: Path) -> None:
    script = checked_blocks()[index]
    for documented, tiny in TINY_RUN.items():
        script = script.replace(documented, tiny)
    script = script.replace("8000", str(free_port()))
    env = {
        **os.environ,
        # The commands of this interpreter's environment (python, recyclegpt-*) come first, as in an activated venv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=480
    )
    assert result.returncode == 0, (
        f"README block {index} failed:\n{script}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
