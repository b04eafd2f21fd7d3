"""`recyclegpt-bench-core`: step costs and decoding speed of a random model, side by side.

Prints, per dtype, ms per full-model step (1 and 2 tokens), ms per module step, and tokens/s of
transformers ``generate`` on the same weights, ``standard``, ``alternating`` and ``speculative``.
Runs are interleaved and reported as medians, since shared machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from recyclegpt.core.config import RecycleConfig
from recyclegpt.core.model import RecycleGPT
from recyclegpt.core.peer import peer_generate, transformers_peer
from recyclegpt.core.profiling import measure_step_cost, timed


def decoder_runs(model: RecycleGPT, draft_length: int) -> dict[str, Callable[[torch.Tensor, int], int]]:
    """Name -> run(prompt, n) returning the number of new tokens, for each decoder and the peer."""
    peer = transformers_peer(model)

    def hf(prompt: torch.Tensor, n: int) -> int:
        return peer_generate(peer, prompt, n).shape[1] - prompt.shape[1]

    def ours(decoding: str) -> Callable[[torch.Tensor, int], int]:
        return lambda prompt, n: model.generate(
            prompt, n, decoding=decoding, draft_length=draft_length
        ).new_tokens.shape[1]

    return {
        "transformers": hf,
        "standard": ours("standard"),
        "alternating": ours("alternating"),
        f"speculative(g={draft_length})": ours("speculative"),
    }


def tokens_per_second(
    runs: dict[str, Callable[[torch.Tensor, int], int]], prompt: torch.Tensor, new_tokens: int, repeats: int
) -> dict[str, float]:
    """Median tokens/s of each run, interleaved round-robin so that noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(prompt, 4)  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            produced, seconds = timed(lambda run=run: run(prompt, new_tokens))
            samples[name].append(produced / seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--module-layers", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    args = parser.parse_args(argv)
    if min(args.layers, args.hidden, args.vocab, args.module_layers, args.new_tokens, args.repeats) < 1:
        sys.exit("error: sizes, --new-tokens and --repeats must be >= 1")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = RecycleConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        module_layers=args.module_layers,
        max_seq_len=args.prompt_length + args.new_tokens + args.draft_length + 8,
    )
    torch.manual_seed(0)
    model = RecycleGPT(config).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt_length), device=device)
    print(
        f"random model: {args.layers} layers, d={args.hidden}, vocab {args.vocab}, {args.module_layers}-layer module "
        f"({model.num_parameters('base') / 1e6:.1f}M base + {model.num_parameters('module') / 1e6:.1f}M module), "
        f"batch 1, prompt {args.prompt_length}, {args.new_tokens} new tokens, device {device}, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats}"
    )
    print("(random weights: the module agrees with the base by chance only, so speculative drafts are mostly rejected)")
    rows = []
    for dtype_name in args.dtypes:
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        model = model.to(device=device, dtype=dtype)
        costs = measure_step_cost(model, prompt)
        speeds = tokens_per_second(decoder_runs(model, args.draft_length), prompt, args.new_tokens, args.repeats)
        rows.append((dtype_name, costs, speeds))

    print()
    print(
        "| dtype | full step, 1 token (ms) | full step, 2 tokens (ms) | 2-token / 1-token | module step (ms) | c = module / full | bound 2/(1+c) |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype_name, costs, _ in rows:
        one, two, c = costs["base_step_ms"], costs["base_2_tokens_ms"], costs["c"]
        print(
            f"| {dtype_name} | {one:.2f} | {two:.2f} | {two / one:.2f}x | {costs['module_step_ms']:.2f} | "
            f"{c:.3f} | {costs['alternating_bound']:.2f}x |"
        )
    print()
    names = list(rows[0][2])
    print(
        "| dtype | "
        + " | ".join(f"{n} (tok/s)" for n in names)
        + " | alternating / standard | standard / transformers |"
    )
    print("|---|" + "---|" * (len(names) + 2))
    for dtype_name, _, speeds in rows:
        cells = " | ".join(f"{speeds[n]:.1f}" for n in names)
        print(
            f"| {dtype_name} | {cells} | {speeds['alternating'] / speeds['standard']:.2f}x | "
            f"{speeds['standard'] / speeds['transformers']:.2f}x |"
        )


if __name__ == "__main__":
    main()
