"""``recyclegpt-eval quality|speed|samples``: see packages/eval/README.md."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jsonargparse import ArgumentParser

from recyclegpt.core.precision import DTYPE_CHOICES
from recyclegpt.eval.errors import EvalError

PROG = "recyclegpt-eval"
DTYPES = DTYPE_CHOICES
DTYPE_HELP = (
    "weights and compute dtype; auto: bf16 on CUDA GPUs, fp32 on CPUs where this project's decode kernels run "
    "(unquantized, w8a8, w4a8), else bf16 where the CPU computes it natively (AVX512-BF16/AMX), else fp32"
)
# Copies of recyclegpt.core.quantize's QUANTIZE_CHOICES and QUANTIZE_HELP (not imported: keep --help
# fast; a test compares them).
QUANTIZE_CHOICES = ("none", "int8", "int4", "fp16", "w8a8", "w4a8")
QUANTIZE_HELP = (
    "int8: weight-only int8 linears; int4: the base's decoder linears int4, the rest int8 (fastest single "
    "requests); fp16: fp16 weights, fp32 compute (cheap multi-token steps on AVX-512 CPUs; row by row on AVX2 ones); "
    "w8a8: int8 weights and int8 activations in blocks of 32 (integer kernels on AVX-512 VNNI and AVX2 CPUs: "
    "cheap multi-token steps, the best for speculative decoding there); w4a8: w8a8 with the base's decoder "
    "linears int4 (the fastest single requests on those CPUs)"
)


def _common(parser: ArgumentParser, command: str) -> None:
    parser.add_argument("--model", required=True, help="a RecycleGPT directory written by save_pretrained")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_CHOICES,
        help=QUANTIZE_HELP,
    )
    parser.add_argument(
        "--json", default=f"artifacts/eval/{command}.json", help="result JSON; .md (and .png) beside it"
    )
    parser.add_argument(
        "--mlflow-experiment", default=None, help="log to this MLflow experiment ($MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts taken from --data (evenly spaced)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt taken from --data")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Quality and speed of a RecycleGPT model.", exit_on_error=False)
    commands = parser.add_subcommands(dest="command")

    quality = ArgumentParser(description="Teacher-forced perplexity, accuracy and module/base agreement.")
    _common(quality, "quality")
    quality.add_argument("--data", required=True, help="held-out UTF-8 text")
    quality.add_argument("--max-tokens", type=int, default=16384, help="evaluate the first N tokens of --data")
    quality.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    quality.add_argument("--max-depth", type=int, default=4, help="deepest chained draft depth to score")
    quality.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (agreement)")
    commands.add_subcommand("quality", quality)

    speed = ArgumentParser(description="Tokens/s of transformers, standard, alternating and speculative decoding.")
    _common(speed, "speed")
    speed.add_argument("--prompts", default=None, help="UTF-8 file, one prompt per line (blank lines skipped)")
    speed.add_argument(
        "--chat",
        action="store_true",
        help="with --prompts: each line is a user message, sent through the tokenizer's chat template "
        "as a chat client's request would be",
    )
    speed.add_argument("--data", default=None, help="UTF-8 text to cut --num-prompts prompts from")
    speed.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    speed.add_argument("--repeats", type=int, default=3, help="timed repeats (median); one warm-up runs first")
    speed.add_argument("--reference", default=None, help="an earlier speed JSON whose standard outputs must match")
    commands.add_subcommand("speed", speed)

    samples = ArgumentParser(description="A greedy continuation of a prompt by each decoding mode.")
    samples.add_argument("--model", required=True, help="a RecycleGPT directory written by save_pretrained")
    samples.add_argument("--prompt", default="def main(", help="text to continue")
    samples.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per mode")
    samples.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    samples.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    commands.add_subcommand("samples", samples)
    return parser


def _common_options(a: Any) -> dict[str, Any]:
    """The options ``_common`` adds (but --model), as ``run_quality`` and ``run_speed`` name them."""
    return {
        "dtype": a.dtype,
        "quantize": a.quantize,
        "json_path": a.json,
        "mlflow_experiment": a.mlflow_experiment,
        "num_prompts": a.num_prompts,
        "prompt_tokens": a.prompt_tokens,
    }


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Run a command; 0 on success, 1 when a correctness check fails, 2 on bad input."""
    try:
        args = build_parser().parse_args(argv)
    except argparse.ArgumentError as error:
        print(f"{PROG}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    from recyclegpt.eval.commands import run_quality, run_samples, run_speed  # heavy imports after parsing

    try:
        if args.command == "samples":
            a = args.samples
            run_samples(a.model, a.prompt, max_new_tokens=a.max_new_tokens, dtype=a.dtype, quantize=a.quantize)
            return 0
        if args.command == "quality":
            a = args.quality
            run_quality(
                a.model,
                a.data,
                max_tokens=a.max_tokens,
                batch_size=a.batch_size,
                max_depth=a.max_depth,
                max_new_tokens=a.max_new_tokens,
                **_common_options(a),
            )
            return 0
        a = args.speed
        _, failures = run_speed(
            a.model,
            prompts_file=a.prompts,
            chat=a.chat,
            data_file=a.data,
            max_new_tokens=a.max_new_tokens,
            repeats=a.repeats,
            reference=a.reference,
            **_common_options(a),
        )
    except EvalError as error:
        print(f"{PROG}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
