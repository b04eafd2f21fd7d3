"""recyclegpt-serve: an OpenAI-compatible server for a RecycleGPT model."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Literal

from jsonargparse import ArgumentParser

from recyclegpt.core import DECODING_MODES
from recyclegpt.core.quantize import QUANTIZE_CHOICES, QUANTIZE_HELP
from recyclegpt.serve.protocol import MAX_DRAFT_LENGTH

API_KEY_ENV = "RECYCLEGPT_API_KEY"
HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::": "::"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="recyclegpt-serve", description=__doc__)
    parser.add_argument("--model", type=str, required=True, help="a saved RecycleGPT directory (with its tokenizer)")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="127.0.0.1 (default), localhost, 0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--decoding", type=Literal[DECODING_MODES], default="alternating", help="default decoder")
    parser.add_argument("--draft-length", type=int, default=4, help="default speculative draft length")
    parser.add_argument(
        "--dtype",
        type=Literal["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 on a GPU; on a CPU fp32 where this project's decode kernels run (unquantized, w8a8, w4a8), else bf16 with AVX512-BF16/AMX, else fp32",
    )
    parser.add_argument(
        "--quantize",
        type=Literal[QUANTIZE_CHOICES],
        default="none",
        help=QUANTIZE_HELP,
    )
    parser.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    parser.add_argument("--max-queue", type=int, default=128, help="requests in flight before new ones get 503")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait in the queue")
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="choices decoded together (continuous batching); more wait"
    )
    parser.add_argument(
        "--max-kv-mb", type=float, default=4096.0, help="KV cache the batch may take (MiB); fewer rows if needed"
    )
    parser.add_argument(
        "--cpu-threads",
        type=int | None,
        default=None,
        help="torch CPU threads in the worker (default on a CPU: all cores but one, left to the API process; on a GPU: torch's)",
    )
    parser.add_argument(
        "--api-key", type=str | None, default=None, help=f"require this bearer token (or set {API_KEY_ENV})"
    )
    parser.add_argument(
        "--served-model-name", type=str | None, default=None, help="model id (default: the directory name)"
    )
    parser.add_argument("--log-level", type=Literal["debug", "info", "warning", "error"], default="warning")
    return parser


def check(args) -> str | None:  # noqa: ANN001 - a jsonargparse Namespace
    """The first problem with the arguments, as a one-line message."""
    model = Path(args.model)
    if not model.exists():
        return f"--model {model}: no such file or directory"
    if model.is_dir() and not (model / "config.json").exists():
        return f"--model {model}: no config.json, not a model directory"
    if model.is_dir() and not (model / "tokenizer.json").exists():
        return f"--model {model}: no tokenizer.json; save the model with its tokenizer"
    if args.host not in HOSTS:
        return f"--host {args.host}: LitServe listens on one of {', '.join(HOSTS)}"
    if not 1024 <= args.port <= 65535:
        return f"--port {args.port}: must be in 1024..65535"
    if not 1 <= args.draft_length <= MAX_DRAFT_LENGTH:
        return f"--draft-length {args.draft_length}: must be in 1..{MAX_DRAFT_LENGTH}"
    for name in ("max_tokens_limit", "max_queue", "cpu_threads", "max_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
    if args.max_kv_mb <= 0:
        return f"--max-kv-mb {args.max_kv_mb}: must be > 0"
    if args.timeout <= 0:
        return f"--timeout {args.timeout}: must be > 0"
    return None


def kv_problem(model: Path, dtype: str, quantize: str, max_batch_size: int, max_kv_mb: float) -> str | None:
    """Why not even one batch row fits in --max-kv-mb (checked from config.json, before any worker starts)."""
    if not (model / "config.json").is_file():
        return None  # a .gguf file: the worker checks it once the model is loaded
    import torch

    from recyclegpt.core import RecycleConfig, RecycleGPT
    from recyclegpt.core.fastpath import decoding_setup
    from recyclegpt.core.precision import resolve_decode_dtype
    from recyclegpt.serve.api import batch_rows

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        meta = RecycleGPT(RecycleConfig.load(model / "config.json"))
        if quantize == "none":  # a directory saved quantized loads in its own format
            quantize = decoding_setup(meta).get("quantize") or "none"
        meta = meta.to(resolve_decode_dtype(dtype, device, quantize))
    try:
        batch_rows(meta, max_batch_size, max_kv_mb)
    except ValueError as err:
        return str(err)
    return None


def resolve_api_key(flag: str | None, environ: dict[str, str]) -> str | None:
    """--api-key wins over RECYCLEGPT_API_KEY; an empty value means no key."""
    return flag or environ.get(API_KEY_ENV) or None


def _sigterm_handler(server_pid: int) -> Callable[[int, FrameType | None], None]:
    """`kill PID` shuts the server down like Ctrl-C, so LitServer stops its API and inference
    workers instead of leaving them orphaned; forked workers that inherit it just exit."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if os.getpid() == server_pid:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handle


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (problem := check(args)) is not None:
        print(f"recyclegpt-serve: error: {problem}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # LitServe forks its API process
    from recyclegpt.serve.server import ServeOptions, serve  # after the checks: imports torch

    model = Path(args.model).resolve()
    if (problem := kv_problem(model, args.dtype, args.quantize, args.max_batch_size, args.max_kv_mb)) is not None:
        print(f"recyclegpt-serve: error: {problem}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _sigterm_handler(os.getpid()))
    serve(
        ServeOptions(
            model=str(model),
            model_name=args.served_model_name or (model.stem if model.is_file() else model.name),
            host=HOSTS[args.host],
            port=args.port,
            decoding=args.decoding,
            draft_length=args.draft_length,
            dtype=args.dtype,
            quantize=args.quantize,
            max_tokens_limit=args.max_tokens_limit,
            max_queue=args.max_queue,
            timeout=args.timeout,
            api_key=resolve_api_key(args.api_key, dict(os.environ)),
            cpu_threads=args.cpu_threads,
            max_batch_size=args.max_batch_size,
            max_kv_mb=args.max_kv_mb,
            log_level=args.log_level,
        )
    )


if __name__ == "__main__":
    main()
