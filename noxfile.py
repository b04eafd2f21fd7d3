"""Developer entry points: `nox -s tests`, `nox -s lint`, `nox -s demo`, `nox -s bench-core`, `nox -s bench`.

Every session builds its environment from nothing. torch is pinned and installed first so that
no package pulls a different (multi-GB CUDA) build: on a machine without a GPU set
RECYCLEGPT_TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the small CPU build from
PyTorch's index (this project's CI machines carry that CPU build locally).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
PACKAGES = ["./packages/core", "./packages/train", "./packages/eval", "./packages/serve"]
TEST_DEPS = ["pytest>=8", "openai>=1.40", "requests>=2.31"]


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def install_project(session: nox.Session, *extra: str) -> None:
    """torch first (CPU build where no GPU), then the four packages and ``extra``."""
    index = os.environ.get("RECYCLEGPT_TORCH_INDEX")
    if index and not has_gpu():
        session.install(TORCH, "--index-url", index)
    else:
        session.install(TORCH)
    session.install(*PACKAGES, *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (tiny models; seconds per test)."""
    install_project(session, *TEST_DEPS)
    session.run("pytest", *(session.posargs or ["tests"]), env={"TOKENIZERS_PARALLELISM": "false"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the packages, the tests and this file."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "--diff", "packages", "tests", "noxfile.py", success_codes=[0, 1])


@nox.session(name="bench-core")
def bench_core(session: nox.Session) -> None:
    """Step costs and tokens/s of each decoder vs transformers generate (random 12-layer model)."""
    install_project(session)
    session.run("recyclegpt-bench-core", *session.posargs)
