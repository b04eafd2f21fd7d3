"""`recyclegpt-bench-core`: step costs and decoding speed, side by side, in one interleaved run.

Default: a random 12-layer model. ``--model smollm2`` (or any path ``from_pretrained`` takes)
benchmarks a real model; when it is a GGUF file and ``llama_cpp`` is importable, llama.cpp runs on
the same file in the same loop (``nox -s bench-smollm2`` installs it; it is no dependency). Every
variant (``--quantize none int8 int4 fp16``; ``--torch-matmul`` adds fp32 on torch's matmul,
``--layer-by-layer`` each variant with a kernel call a layer; ``--batched`` adds the server's
continuous-batching decoder) reports ms per 1, 2 and 5-token full-model steps and per module
step, and tokens/s of ``standard``, ``alternating`` and ``speculative``; transformers ``generate``
runs on the unquantized weights. Every row names the dtype and the CPU it was measured on.
``--linears`` times the model's fp32 linears instead, torch's matmul against this project's kernel.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from recyclegpt.core import float_kernels
from recyclegpt.core.batching import BatchedDecoder
from recyclegpt.core.config import RecycleConfig
from recyclegpt.core.cpu_kernels import build
from recyclegpt.core.fastpath import prepare_for_decoding, use_step_kernels
from recyclegpt.core.model import RecycleGPT
from recyclegpt.core.peer import peer_generate, transformers_peer
from recyclegpt.core.precision import (
    DTYPE_CHOICES,
    decode_dtype,
    dtype_name,
    hardware_summary,
    resolve_decode_dtype,
)
from recyclegpt.core.profiling import interleaved, measure_step_costs, median_seconds
from recyclegpt.core.quantize import QUANTIZE_CHOICES

STEP_TOKENS = (1, 2, 5)
BATCH_ROWS = 8  # --batched: the continuous-batching decoder over this many copies of the prompt
LINEAR_ROWS = (1, 2, 5, 8, 64)
SMOLLM2_PROMPT = (
    "<|im_start|>user\nExplain in a few sentences why the sky is blue, and what changes at sunset.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
Run = Callable[[], int]  # decodes once; returns the number of new tokens


def decoder_runs(
    model: RecycleGPT, prompt: torch.Tensor, new_tokens: int, draft_length: int, label: str, batched: bool = False
) -> dict[str, Run]:
    """``standard``, ``alternating``, ``speculative`` (adaptive chains; a fixed ``draft_length``, which
    reads no draft back before the verification; a tree) on ``model``, named ``<mode> [label]``; with
    ``batched``, also the server's continuous-batching decoder
    (:class:`~recyclegpt.core.batching.BatchedDecoder`, standard) over 1 and over :data:`BATCH_ROWS`
    copies of the prompt (tokens/s of all rows together)."""

    def ours(decoding: str, draft_policy: str = "adaptive") -> Run:
        return lambda: model.generate(
            prompt, new_tokens, decoding=decoding, draft_length=draft_length, draft_policy=draft_policy
        ).new_tokens.shape[1]

    def batch(rows: int) -> Run:
        def run() -> int:
            # Sized like generate's caches (the model's whole context would be a GB-scale cache to zero).
            capacity = prompt.shape[1] + new_tokens + 2
            decoder = BatchedDecoder(model, "standard", max_batch_size=rows, capacity=capacity)
            produced = sum(len(decoder.add(row, prompt[0].tolist(), new_tokens).new_tokens) for row in range(rows))
            while len(decoder):
                produced += sum(len(out.new_tokens) for out in decoder.step())
            return produced

        return run

    runs = {
        f"standard [{label}]": ours("standard"),
        f"alternating [{label}]": ours("alternating"),
        f"speculative<={draft_length} [{label}]": ours("speculative"),
        f"speculative g={draft_length} [{label}]": ours("speculative", "fixed"),
        f"speculative tree<={draft_length} [{label}]": ours("speculative", "tree"),
    }
    if batched:
        runs[f"batched standard x1 [{label}]"] = batch(1)
        runs[f"batched standard x{BATCH_ROWS} [{label}]"] = batch(BATCH_ROWS)
    return runs


def transformers_run(model: RecycleGPT, prompt: torch.Tensor, new_tokens: int) -> Run:
    peer = transformers_peer(model)
    return lambda: peer_generate(peer, prompt, new_tokens).shape[1] - prompt.shape[1]


def llama_cpp_run(gguf: Path, prompt: torch.Tensor, new_tokens: int, threads: int) -> Run | str:
    """Greedy llama.cpp on the same GGUF file and prompt tokens, or why it cannot run."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "llama.cpp skipped: llama_cpp is not importable (nox -s bench-smollm2 installs llama-cpp-python)"
    llm = Llama(str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = prompt[0].tolist()

    def run() -> int:
        produced = 0
        llm.reset()  # else llama-cpp-python reuses the cached prompt and skips the prefill ours pays for
        for _ in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True):
            produced += 1
            if produced >= new_tokens:
                break
        return produced

    return run


def linear_table(model: RecycleGPT, rounds: int, inner: int = 20) -> list[str]:
    """Markdown rows: microseconds per fp32 call of each kind of ``model``'s linears (a base layer's
    fused projections and the LM head) over 1-64 rows, torch's matmul and the fp32 kernel
    (:mod:`recyclegpt.core.float_kernels`) interleaved."""
    fused = prepare_for_decoding(copy.deepcopy(model)).float()
    layer = fused.model.layers[0]
    weights = {
        "q/k/v": layer.self_attn.qkv_proj.weight,
        "o": layer.self_attn.o_proj.weight,
        "gate/up": layer.mlp.gate_up_proj.weight,
        "down": layer.mlp.down_proj.weight,
        "LM head": fused.lm_head.weight,
    }
    kernel = build().float_matmul
    generator = torch.Generator().manual_seed(0)
    runs: dict[str, Callable[[], None]] = {}
    for name, weight in weights.items():
        weight = weight.detach().contiguous()
        for rows in LINEAR_ROWS:
            x = torch.randn(rows, weight.shape[1], generator=generator)
            for impl, matmul in (("torch", F.linear), ("kernel", kernel)):
                runs[f"{name}|{rows}|{impl}"] = lambda m=matmul, x=x, w=weight: [m(x, w) for _ in range(inner)]
    with torch.inference_mode():
        samples = interleaved(runs, rounds)
    us = {key: 1e6 * median_seconds(values) / inner for key, values in samples.items()}
    lines = [
        "| linear (K -> N) | " + " | ".join(f"{r} row{'s' * (r > 1)}: torch / kernel (us)" for r in LINEAR_ROWS) + " |"
    ]
    lines.append("|---" * (len(LINEAR_ROWS) + 1) + "|")
    for name, weight in weights.items():
        cells = [f"{us[f'{name}|{r}|torch']:.1f} / {us[f'{name}|{r}|kernel']:.1f}" for r in LINEAR_ROWS]
        lines.append(f"| {name} ({weight.shape[1]} -> {weight.shape[0]}) | " + " | ".join(cells) + " |")
    return lines


def random_model(args: argparse.Namespace) -> RecycleGPT:
    config = RecycleConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        module_layers=args.module_layers,
        max_seq_len=args.prompt_length + args.new_tokens + args.draft_length + 8,
    )
    torch.manual_seed(0)
    return RecycleGPT(config).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model path, .gguf file or 'smollm2' (default: random)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--module-layers", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64, help="random model: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-length", type=int, default=4, help="speculative: the most tokens drafted per cycle")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto: what decodes fastest here (core.precision.decode_dtype)",
    )
    parser.add_argument("--quantize", nargs="+", default=list(QUANTIZE_CHOICES), choices=QUANTIZE_CHOICES)
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers generate")
    parser.add_argument(
        "--linears",
        action="store_true",
        help="instead of decoding: time the model's fp32 linears over 1-64 rows, torch's matmul against the fp32 kernel",
    )
    parser.add_argument(
        "--torch-matmul",
        action="store_true",
        help="fp32 on CPU: also run the unquantized variant on torch's matmul instead of this project's fp32 kernel",
    )
    parser.add_argument(
        "--layer-by-layer",
        action="store_true",
        help="also run every variant with its layers calling their step kernels one by one (not one C++ call)",
    )
    parser.add_argument(
        "--batched",
        action="store_true",
        help=f"also time the server's continuous-batching decoder (standard) over 1 and {BATCH_ROWS} copies of the prompt",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads")
    parser.add_argument("--prompt", default=SMOLLM2_PROMPT, help="prompt text for a model with a tokenizer")
    parser.add_argument(
        "--gguf",
        default=None,
        help="GGUF file llama.cpp runs beside ours (default: --model when it is one; 'smollm2' names SmolLM2's), "
        "e.g. the base of a module trained on it",
    )
    args = parser.parse_args(argv)
    if min(args.layers, args.hidden, args.vocab, args.module_layers, args.new_tokens, args.repeats) < 1:
        parser.error("sizes, --new-tokens and --repeats must be >= 1")
    if args.draft_length < 1 or args.prompt_length < 2:
        parser.error("--draft-length must be >= 1 and --prompt-length >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_decode_dtype(args.dtype, device)  # the unquantized weights' (transformers generate's too)

    def variant_dtype(quantize: str) -> torch.dtype:
        """auto: what each variant's weights decode fastest in here (core.precision.decode_dtype)."""
        return decode_dtype(device, quantize) if args.dtype == "auto" else dtype

    gguf: Path | None = None
    if args.model is None:
        model = random_model(args)
        prompt = torch.randint(0, args.vocab, (1, args.prompt_length))
        what = (
            f"random model: {args.layers} layers, d={args.hidden}, vocab {args.vocab}, {args.module_layers}-layer "
            "module (random weights: speculative drafts are rejected)"
        )
    else:
        from recyclegpt.core.assets import resolve_model_path
        from recyclegpt.core.checkpoint import is_recyclegpt_dir

        try:
            path = resolve_model_path(args.model)
            model = RecycleGPT.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            sys.exit(f"error: cannot load {args.model}: {error}")
        gguf = path if path.suffix == ".gguf" else None
        if args.gguf is not None:
            gguf = resolve_model_path(args.gguf)
            if gguf.suffix != ".gguf" or not gguf.is_file():
                sys.exit(f"error: --gguf {args.gguf} is not a .gguf file")
        if model.tokenizer is not None:
            prompt = torch.tensor([model.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]])
        else:
            prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_length))
        trained = "" if is_recyclegpt_dir(path) else "untrained "  # a GGUF or Hugging Face base gets a fresh module
        what = f"{args.model} ({model.num_parameters('base') / 1e6:.0f}M base + {model.num_parameters('module') / 1e6:.1f}M {trained}module)"
    if args.linears:
        if not float_kernels.available():
            sys.exit("error: --linears needs the fp32 kernel, which does not run here (a C++ compiler and an AVX2 CPU)")
        print(
            f"{what}: fp32 linears, medians of {args.repeats} interleaved rounds; measured on: {hardware_summary('cpu')}"
        )
        print("\n".join(linear_table(model, args.repeats)))
        return
    # Quantize the stored (fp32) weights, then cast: scales from bf16-rounded weights lose a little more.
    # Every variant decodes on the fast path (fused projections, step kernels); "none" keeps the weights.
    quantized = {q: prepare_for_decoding(copy.deepcopy(model), quantize=q) for q in args.quantize}
    model = model.to(device=device, dtype=dtype)
    prompt = prompt.to(device)
    hardware = hardware_summary(device)
    print(
        f"{what}; batch 1, prompt {prompt.shape[1]} tokens, {args.new_tokens} new tokens, greedy, medians of {args.repeats}"
    )
    print(f"measured on: {hardware}")

    variants: dict[str, RecycleGPT] = {}
    for quantize in args.quantize:
        weights = variant_dtype(quantize)
        label = f"{dtype_name(weights)}" + ("" if quantize == "none" else f"+{quantize}")
        variants[label] = quantized[quantize].to(device=device, dtype=weights)
        if quantize == "none" and args.torch_matmul and weights == torch.float32 and device == "cpu":
            plain = prepare_for_decoding(copy.deepcopy(model)).to(device=device, dtype=dtype)
            use_step_kernels(plain, float_matmul=False)
            variants[f"{label}, torch matmul"] = plain
        if args.layer_by_layer and device == "cpu":
            split = copy.deepcopy(variants[label])
            use_step_kernels(split, whole_layers=False)
            variants[f"{label}, layer by layer"] = split

    runs: dict[str, Run] = {}
    skipped: list[str] = []
    if not args.no_transformers:
        runs[f"transformers generate [{dtype_name(dtype)}]"] = transformers_run(model, prompt, args.new_tokens)
    if gguf is not None:
        llama = llama_cpp_run(gguf, prompt, args.new_tokens, torch.get_num_threads())
        if isinstance(llama, str):
            skipped.append(llama)
        else:
            runs[f"llama.cpp [{gguf.name}]"] = llama
    for label, variant in variants.items():
        runs.update(decoder_runs(variant, prompt, args.new_tokens, args.draft_length, label, args.batched))

    print("step costs (ms, KV cache filled by the prompt, LM head included) ...", file=sys.stderr, flush=True)
    steps = {label: measure_step_costs(v, prompt, STEP_TOKENS, iterations=15, inner=2) for label, v in variants.items()}
    print("decoding (interleaved) ...", file=sys.stderr, flush=True)
    samples = interleaved(runs, args.repeats)
    rates = {name: statistics.median(n / s for n, s in values) for name, values in samples.items()}

    cpu = hardware.split(";")[0]
    print()
    print("| variant | 1-token step (ms) | 2 tokens | 5 tokens | module step (ms) | c | measured on |")
    print("|---|---|---|---|---|---|---|")
    for label, ms in steps.items():
        one = ms["base_1"]
        print(
            f"| {label} | {one:.1f} | {ms['base_2']:.1f} ({ms['base_2'] / one:.2f}x) | {ms['base_5']:.1f} "
            f"({ms['base_5'] / one:.2f}x) | {ms['module']:.1f} | {ms['module'] / one:.2f} | {cpu} |"
        )
    print()
    reference = next((rates[n] for n in rates if n.startswith("standard [")), None)
    print("| method | tokens/s | vs first standard | measured on |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        ratio = f"{rate / reference:.2f}x" if reference else ""
        print(f"| {name} | {rate:.1f} | {ratio} | {cpu} |")
    for line in skipped:
        print(f"\n{line}")


if __name__ == "__main__":
    main()
