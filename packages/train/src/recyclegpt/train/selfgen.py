"""Text a base model wrote itself, to train its recyclable module on (EAGLE's and Medusa's regenerated data).

A draft module is judged on the text the base writes at decode time, not on human text. A module
trained on TinyStories agreed with SmolLM2 at 44.6% of held-out TinyStories positions but at only
25% of the positions of SmolLM2's own greedy continuations, and speculative decoding accepted 22%
of its drafts. So the recipe first lets the base continue prompts drawn from the training corpus
(batched decoding, greedy by default: the decoding the evaluation and alternating use), and trains
the module on those texts.

With ``--chat-share`` part of the prompts are chat requests instead of bare text: the tokenizer's
chat template around a user turn of an instruction and a slice of the corpus
(:func:`chat_prompts`), so an instruction-tuned base writes what it writes for its users, its
assistant turns, and its module learns that text too.

With ``--blocks-out`` it writes token blocks for ``data.train_blocks`` instead, and with
``--feature-cache`` also the base's final states of them, kept while it decoded, as a feature cache the
trainer uses as is: the base reads its own text once, not twice.

    python -m recyclegpt.train.selfgen --model smollm2 --prompts-from corpus.txt --minutes 5 --out selfgen.txt
    python -m recyclegpt.train.selfgen --model smollm2 --prompts-from corpus.txt --minutes 5 \
        --blocks-out blocks.safetensors --feature-cache runs/smollm2/features/train
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.fastpath import prepare_for_decoding
from recyclegpt.core.precision import dtype_name, hardware_summary, resolve_dtype
from recyclegpt.core.quantize import QUANTIZE_CHOICES, QUANTIZE_HELP
from recyclegpt.train.corpus import CorpusError, check_readable, read_texts, resolve
from recyclegpt.train.data import write_blocks
from recyclegpt.train.features import FeatureCache, base_digest, cache_key


@dataclass
class SelfGenReport:
    """What :func:`self_generate` wrote and how fast."""

    samples: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def corpus_ids(tokenizer: Any, files: list[str], max_bytes: int) -> torch.Tensor:
    """Token ids of the first ``max_bytes`` characters of ``files`` (files, directories, globs or ``stdlib``)."""
    text = "".join(read_texts(resolve(files), max_bytes))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def corpus_prompts(ids: torch.Tensor, count: int, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """``count`` prompts [count, prompt_tokens]: slices of the token stream ``ids`` at seeded random starts."""
    if ids.numel() <= prompt_tokens:
        raise ValueError(f"the prompt corpus has {ids.numel()} tokens; more than {prompt_tokens} are needed")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - prompt_tokens, (count,), generator=generator)
    return torch.stack([ids[s : s + prompt_tokens] for s in starts.tolist()])


# Instructions of the chat prompts (:func:`chat_prompts`), each followed by a slice of the corpus.
CHAT_INSTRUCTIONS = (
    "Explain the main idea of this text in simple words:",
    "What lesson can we learn from this?",
    "Summarize this in two sentences:",
    "Continue this story:",
    "Write a short poem about this:",
    "What happens next? Answer in a few sentences:",
    "Rewrite this in a more formal style:",
    "List three facts from this text:",
    "Why do you think this happened?",
    "Describe the characters in this text:",
    "Give some advice to the people in this story:",
    "Ask three questions about this text and answer them:",
)
_CONTENT = "\x00content\x00"  # stands in for the user turn while the chat template is split around it


def chat_prompts(tokenizer: Any, ids: torch.Tensor, count: int, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """``count`` chat requests of exactly ``prompt_tokens`` tokens [count, prompt_tokens]: the
    tokenizer's chat template (its default system turn included) around a user turn of one of
    :data:`CHAT_INSTRUCTIONS` and a slice of the token stream ``ids`` at a seeded random start, cut
    to fit, ending where the assistant's answer begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompts need a tokenizer with a chat template; this one has none")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _CONTENT}], tokenize=False, add_generation_prompt=True
    )
    before, after = rendered.split(_CONTENT)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    suffix = encode(after)
    prefixes = [encode(f"{before}{instruction}\n\n") for instruction in CHAT_INSTRUCTIONS]
    room = prompt_tokens - len(suffix) - max(len(prefix) for prefix in prefixes)
    if room < 8:
        raise ValueError(f"chat prompts of {prompt_tokens} tokens leave {room} for the text (need 8): raise it")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(prefixes), (count,), generator=generator).tolist()
    starts = corpus_prompts(ids, count, prompt_tokens, seed).tolist()  # slices long enough for any prefix
    rows = []
    for pick, start in zip(picks, starts, strict=True):
        prefix = prefixes[pick]
        rows.append(prefix + start[: prompt_tokens - len(prefix) - len(suffix)] + suffix)
    return torch.tensor(rows, dtype=torch.long)


def prompt_batches(prompts: torch.Tensor | list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Batches of ``batch_size`` rows of ``prompts``: one tensor [N, P], or several groups of other
    prompt lengths, whose batches are interleaved in proportion to their sizes (a time budget that
    ends early keeps the mix)."""
    groups = [prompts] if isinstance(prompts, torch.Tensor) else [group for group in prompts if group.shape[0]]
    keyed = []
    for group in groups:
        batches = list(group.split(batch_size))
        keyed += [((index + 0.5) / len(batches), batch) for index, batch in enumerate(batches)]
    return [batch for _, batch in sorted(keyed, key=lambda item: item[0])]


def mixed_prompts(
    tokenizer: Any,
    ids: torch.Tensor,
    count: int,
    prompt_tokens: int,
    chat_share: float = 0.0,
    chat_prompt_tokens: int = 64,
    seed: int = 0,
    chat_ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``count`` prompts from the token stream ``ids``: a ``chat_share`` of them chat requests of
    ``chat_prompt_tokens`` (:func:`chat_prompts`, their text from ``chat_ids`` when given), the rest
    bare slices of ``prompt_tokens`` (:func:`corpus_prompts`); two groups for :func:`prompt_batches`."""
    chats = round(chat_share * count)
    source = ids if chat_ids is None else chat_ids
    groups = [chat_prompts(tokenizer, source, chats, chat_prompt_tokens, seed)] if chats else []
    if count - chats:
        groups.append(corpus_prompts(ids, count - chats, prompt_tokens, seed + 1 if chats else seed))
    return groups


def _timed_batches(batches: list[torch.Tensor], seconds: float | None) -> Iterator[torch.Tensor]:
    """``batches`` in turn; with ``seconds``, none after the batch that ends nearest that time (a
    batch of 64 can take a minute on a CPU)."""
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        yield batch
        elapsed = time.perf_counter() - start
        if seconds is not None and elapsed + elapsed / (index + 1) / 2 >= seconds:
            return  # one more batch would end further past ``seconds`` than stopping now ends before it


def self_generate(
    model: RecycleGPT,
    prompts: torch.Tensor | list[torch.Tensor],
    new_tokens: int,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    seconds: float | None = None,
) -> tuple[list[list[int]], SelfGenReport]:
    """The base's continuations of ``prompts`` [N, P] (or groups of them: :func:`prompt_batches`),
    ``batch_size`` rows at a time.

    Each sample is its prompt followed by what the base wrote, cut at its EOS; ``seconds`` bounds the
    time (see :func:`_timed_batches`). Batched rows are computed exactly as lone ones in fp32; in bf16
    a batched matmul may round differently, which changes nothing for training data.
    """
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    samples: list[list[int]] = []
    written = 0
    start = time.perf_counter()
    for batch in _timed_batches(prompt_batches(prompts, batch_size), seconds):
        batch = batch.to(model.lm_head.weight.device)
        out = model.generate(
            batch, new_tokens, temperature=temperature, seed=seed + len(samples), eos_token_id=eos, pad_token_id=eos
        )
        for row in out.sequences.tolist():
            new = row[batch.shape[1] :]
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            samples.append(row[: batch.shape[1]] + new)
            written += len(new)
    return samples, SelfGenReport(len(samples), written, time.perf_counter() - start)


def self_generate_blocks(
    model: RecycleGPT,
    prompts: torch.Tensor | list[torch.Tensor],
    block_size: int,
    batch_size: int = 64,
    seconds: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SelfGenReport]:
    """Greedy continuations of ``prompts`` [N, P] (or groups of them: :func:`prompt_batches`) to
    blocks of exactly ``block_size`` tokens [N, T], with the base's final states at every slot
    [N, T, d], kept while it decoded them (so a feature cache of them costs no second pass of the
    base). An EOS does not stop a row: what the base writes after it is its own text too."""
    batches = prompt_batches(prompts, batch_size)
    longest = max(batch.shape[1] for batch in batches)
    if longest >= block_size:
        raise ValueError(f"prompts of {longest} tokens leave nothing to write in blocks of {block_size}")
    blocks, states = [], []
    written = 0
    start = time.perf_counter()
    for batch in _timed_batches(batches, seconds):
        new_tokens = block_size - batch.shape[1] + 1  # the states of all block_size slots
        out = model.generate(batch.to(model.lm_head.weight.device), new_tokens, output_hidden_states=True)
        blocks.append(out.sequences[:, :block_size].cpu())
        states.append(out.hidden_states[:, :block_size].cpu())
        written += batch.shape[0] * (block_size - batch.shape[1])
    tokens = torch.cat(blocks)
    return tokens, torch.cat(states), SelfGenReport(tokens.shape[0], written, time.perf_counter() - start)


def self_generate_training_data(
    model: RecycleGPT,
    prompts: torch.Tensor | list[torch.Tensor],
    block_size: int,
    dtype: torch.dtype,
    blocks_path: str | Path,
    feature_cache: str | Path | None = None,
    storage: str = "bf16",
    batch_size: int = 64,
    seconds: float | None = None,
    quantize: str = "none",
) -> tuple[torch.Tensor, SelfGenReport]:
    """Blocks the base wrote (:func:`self_generate_blocks`) to ``blocks_path`` (``data.train_blocks``)
    and, with ``feature_cache``, its states there as a feature cache the trainer uses as is.

    ``model`` comes as the trainer loads it (its weights key the cache) and decodes in ``dtype``
    with ``quantize`` weights (both applied in place), as the cache is labelled: the trainer reads
    it with ``data.feature_precision`` and ``data.feature_quantize`` set to the same. w8a8 writes
    ~1.9x the tokens/s of unquantized bf16 at batch 64 on an AVX-512 VNNI CPU (SmolLM2: 591 against 307).
    """
    digest = base_digest(model)
    if quantize != "none":
        with torch.no_grad():
            prepare_for_decoding(model, quantize=quantize)
    model.to(dtype).eval()
    blocks, hidden, report = self_generate_blocks(model, prompts, block_size, batch_size, seconds)
    write_blocks(blocks, blocks_path)
    if feature_cache is not None:
        key = cache_key(model, blocks, storage, dtype_name(dtype), base_sha256=digest, quantize=quantize)
        FeatureCache(feature_cache, storage).store(blocks, hidden, key, report.seconds)
    return blocks, report


def write_samples(tokenizer: Any, samples: list[list[int]], path: str | Path) -> int:
    """Decode the samples into one UTF-8 text file, separated by the tokenizer's EOS text; characters written."""
    separator = f"\n{tokenizer.eos_token}\n" if getattr(tokenizer, "eos_token", None) else "\n\n"
    text = separator.join(tokenizer.decode(sample, skip_special_tokens=True) for sample in samples) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return len(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="recyclegpt-selfgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base: a model directory, a .gguf file or 'smollm2'")
    parser.add_argument("--prompts-from", required=True, help="text file(s) the prompts are sliced from")
    parser.add_argument("--out", default=None, help="output text file")
    parser.add_argument(
        "--blocks-out",
        default=None,
        help="also write token blocks of --prompt-tokens + --new-tokens (greedy, not cut at EOS) to this "
        ".safetensors file, for data.train_blocks",
    )
    parser.add_argument(
        "--feature-cache",
        default=None,
        help="with --blocks-out: store the base's states of the blocks, kept while decoding, in this "
        "directory as a ready feature cache (data.feature_cache/train; with --quantize, train with "
        "data.feature_quantize set to the same)",
    )
    parser.add_argument("--feature-dtype", default="bf16", choices=("bf16", "fp32"), help="storage of the states")
    parser.add_argument(
        "--feature-layers",
        type=int,
        nargs="*",
        default=None,
        help="with --feature-cache: base layers whose outputs the states also hold (model.feature_layers)",
    )
    parser.add_argument("--samples", type=int, default=512, help="prompts to continue (at most)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this much generation time")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=224, help="tokens the base writes per prompt")
    parser.add_argument(
        "--chat-share",
        type=float,
        default=0.0,
        help="fraction of the prompts made chat requests (the tokenizer's chat template around an "
        "instruction and a corpus slice), so an instruction-tuned base writes its assistant turns",
    )
    parser.add_argument("--chat-prompt-tokens", type=int, default=64, help="tokens per chat prompt")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts decoded together")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the evaluation decodes")
    parser.add_argument("--dtype", default="auto", help="auto, fp32 or bf16 (auto: bf16 only where native)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="characters of the prompt corpus read")
    parser.add_argument("--seed", type=int, default=0, help="prompt choice and sampling seed")
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        sys.exit(f"recyclegpt-selfgen: error: {message}")

    counts = {
        "--samples": args.samples,
        "--prompt-tokens": args.prompt_tokens,
        "--new-tokens": args.new_tokens,
        "--batch-size": args.batch_size,
        "--chat-prompt-tokens": args.chat_prompt_tokens,
    }
    for flag, value in counts.items():
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if args.temperature < 0:
        fail(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 <= args.chat_share <= 1:
        fail(f"--chat-share must be between 0 and 1, got {args.chat_share}")
    if args.out is None and args.blocks_out is None:
        fail("give --out (text), --blocks-out (token blocks) or both")
    if args.blocks_out is not None and args.temperature > 0:
        fail("--blocks-out writes the base's greedy blocks; drop --temperature")
    if args.feature_cache is not None and args.blocks_out is None:
        fail("--feature-cache stores the states of the blocks --blocks-out writes: give --blocks-out too")
    try:
        check_readable([args.prompts_from])  # before the model loads
    except CorpusError as error:
        fail(str(error))
    try:
        dtype = resolve_dtype(args.dtype, "cpu")
        if args.blocks_out is not None:  # as the trainer loads it: those weights key the feature cache
            model = RecycleGPT.from_pretrained(args.model, feature_layers=args.feature_layers)
        else:
            model = RecycleGPT.from_pretrained(args.model, dtype=dtype, quantize=args.quantize)
    except (OSError, ValueError) as error:
        fail(f"cannot load {args.model}: {error}")
    if model.tokenizer is None:
        fail(f"{args.model} has no tokenizer")
    context = model.config.max_seq_len
    if args.prompt_tokens + args.new_tokens + 1 > context:
        fail(f"--prompt-tokens + --new-tokens must stay below the context of {context}")
    block_size = args.prompt_tokens + args.new_tokens
    if args.chat_share > 0 and args.blocks_out is not None and args.chat_prompt_tokens >= block_size:
        fail(f"--chat-prompt-tokens {args.chat_prompt_tokens} leaves nothing to write in blocks of {block_size}")
    if args.chat_share > 0 and args.blocks_out is None and args.chat_prompt_tokens + args.new_tokens + 1 > context:
        fail(f"--chat-prompt-tokens + --new-tokens must stay below the context of {context}")
    try:
        ids = corpus_ids(model.tokenizer, [args.prompts_from], args.max_bytes)
        prompts = mixed_prompts(
            model.tokenizer, ids, args.samples, args.prompt_tokens, args.chat_share, args.chat_prompt_tokens, args.seed
        )
    except ValueError as error:  # CorpusError included
        fail(str(error))
    seconds = args.minutes * 60 if args.minutes else None
    if args.blocks_out is not None:
        blocks, report = self_generate_training_data(
            model,
            prompts,
            block_size,
            dtype,
            args.blocks_out,
            args.feature_cache,
            args.feature_dtype,
            args.batch_size,
            seconds,
            args.quantize,
        )
        samples = blocks.tolist()
        wrote = f"{args.blocks_out} ({blocks.shape[0]} blocks of {blocks.shape[1]} tokens)"
        if args.feature_cache is not None:
            wrote += f" and their states in {args.feature_cache}"
    else:
        samples, report = self_generate(
            model, prompts, args.new_tokens, args.batch_size, args.temperature, args.seed, seconds
        )
        wrote = ""
    if args.out is not None:
        chars = write_samples(model.tokenizer, samples, args.out)
        wrote = f"{args.out} ({chars} characters)" + (f", {wrote}" if wrote else "")
    weights = dtype_name(dtype) + (f" + {args.quantize}" if args.quantize != "none" else "")
    print(
        f"self-generated {report.samples} samples, {report.new_tokens} new tokens in {report.seconds:.0f} s, "
        f"{report.tokens_per_second:.0f} tokens/s ({weights}): {wrote}; {hardware_summary()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
