"""Developer entry points: `nox -s tests`, `nox -s lint`, `nox -s demo`, `nox -s bench-core`, `nox -s bench`,
`nox -s compat` (lm-evaluation-harness against the server), `nox -s bench-smollm2`.

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
DEMO_CONFIG = "configs/demo.yaml"
DEMO_MODEL = "runs/demo/model"  # export.dirpath in configs/demo.yaml
DEMO_CORPUS_BYTES = "4000000"  # data.max_corpus_bytes in configs/demo.yaml: held-out text starts after it
RESULTS = "artifacts/demo"
LATEST_RUN = """
import mlflow, os
client = mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
exp = client.get_experiment_by_name("recyclegpt")
run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
print(f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}")
"""


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
def compat(session: nox.Session) -> None:
    """lm-evaluation-harness 0.4.13 (local-completions, its defaults) against the server, offline:
    a local generate task and a local loglikelihood_rolling task must finish with scores."""
    install_project(session, *TEST_DEPS, "lm-eval[api]==0.4.13")
    session.run(
        "pytest",
        "-s",
        *(session.posargs or ["tests/serve/test_lm_eval_compat.py"]),
        env={"TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the packages, the tests, tools/ and this file."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "tests", "tools", "noxfile.py")
    session.run("ruff", "format", "--check", "packages", "tests", "tools", "noxfile.py")


@nox.session(name="bench-core")
def bench_core(session: nox.Session) -> None:
    """Step costs and tokens/s of each decoder vs transformers generate (random 12-layer model, fp32/bf16 by
    the hardware, unquantized and int8)."""
    install_project(session)
    session.run("recyclegpt-bench-core", *session.posargs)


LLAMA_CPP = "llama-cpp-python==0.3.36"
WHEEL_DIR = Path(os.environ.get("RECYCLEGPT_CACHE", Path.home() / ".cache" / "recyclegpt")) / "wheels"


@nox.session(name="bench-smollm2")
def bench_smollm2(session: nox.Session) -> None:
    """SmolLM2-135M from its GGUF: step costs and tokens/s of transformers, llama.cpp (same file), standard,
    alternating and speculative, unquantized and int8, one interleaved run on 2 threads.

    llama-cpp-python is installed here only (never a package dependency). It builds from source (~8 minutes on
    2 cores) the first time; the wheel is kept in ~/.cache/recyclegpt/wheels and reused afterwards.
    """
    install_project(session)
    wheels = sorted(WHEEL_DIR.glob("llama_cpp_python-0.3.36-*.whl"))
    if not wheels:
        session.run("pip", "wheel", "--no-deps", "-w", str(WHEEL_DIR), LLAMA_CPP)
        wheels = sorted(WHEEL_DIR.glob("llama_cpp_python-0.3.36-*.whl"))
    session.install(str(wheels[-1]))
    session.run("recyclegpt-fetch-smollm2")
    session.run("recyclegpt-bench-core", "--model", "smollm2", "--threads", "2", *session.posargs)


def evaluate_demo(session: nox.Session, speed_repeats: str) -> None:
    """Quality and speed of the demo model on standard-library code it never saw, tables printed."""
    heldout = f"{RESULTS}/heldout.txt"
    session.run("python", "-m", "recyclegpt.train.heldout", "--skip-bytes", DEMO_CORPUS_BYTES, "--out", heldout)
    common = ["--model", DEMO_MODEL, "--dtype", "auto", "--mlflow-experiment", "recyclegpt-eval"]
    session.run("recyclegpt-eval", "quality", *common, "--data", heldout, "--json", f"{RESULTS}/quality.json")
    session.run(
        "recyclegpt-eval",
        "speed",
        *common,
        "--data",
        heldout,
        "--repeats",
        speed_repeats,
        "--json",
        f"{RESULTS}/speed.json",
    )


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: train the demo model (MLflow-tracked), evaluate it, show samples, say how to serve it."""
    install_project(session)
    session.run("recyclegpt-train", "fit", "--config", DEMO_CONFIG, *session.posargs)
    evaluate_demo(session, speed_repeats="3")
    session.run("recyclegpt-eval", "samples", "--model", DEMO_MODEL, "--dtype", "auto")
    run_url = session.run("python", "-c", LATEST_RUN, silent=True).strip()
    session.log("Next steps (from this directory):")
    print(
        f"""
  serve it:     .nox/demo/bin/recyclegpt-serve --model {DEMO_MODEL} --decoding alternating --port 8000
  query it:     curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
                  -d '{{"prompt": "def parse_args(", "max_tokens": 48, "temperature": 0}}'
  see the run:  .nox/demo/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000
                then open {run_url}
  results:      {RESULTS}/quality.md, {RESULTS}/speed.md, {RESULTS}/speed.png
"""
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Quality and speed tables of the demo model (trained first if missing)."""
    install_project(session)
    if not (ROOT / DEMO_MODEL / "model.safetensors").exists():
        session.run("recyclegpt-train", "fit", "--config", DEMO_CONFIG)
    evaluate_demo(session, speed_repeats="5")
