"""Held-out text -> token blocks (teacher forcing) and prompts (generation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.eval.errors import EvalError


def load_model(path: str, dtype: str = "auto", quantize: str = "none", fuse: bool = False) -> RecycleGPT:
    """A saved RecycleGPT with its tokenizer, on CUDA when available, else CPU; ``quantize`` ``int8``
    or ``int4`` (or ``fuse``): the fast decode path, with quantized weights where asked
    (:func:`recyclegpt.core.fastpath.prepare_for_decoding`)."""
    if not Path(path).exists():
        raise EvalError(f"model directory {path} does not exist")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = RecycleGPT.from_pretrained(path, dtype=dtype, device=device, quantize=quantize, fuse=fuse)
    except (OSError, ValueError) as error:
        raise EvalError(f"cannot load model from {path}: {error}") from error
    if model.tokenizer is None:
        raise EvalError(f"model at {path} has no tokenizer; save it with save_pretrained(dir, tokenizer=...)")
    return model


def read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise EvalError(f"data file {path} does not exist")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EvalError(f"data file {path} is empty")
    return text


def tokenize(tokenizer: Any, text: str, vocab_size: int) -> torch.Tensor:
    """1-D token ids of ``text`` (no special tokens), checked against the model's vocabulary."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if ids and max(ids) >= vocab_size:
        raise EvalError(f"the tokenizer produces id {max(ids)}, outside the model's vocabulary of {vocab_size}")
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(ids: torch.Tensor, block_length: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping blocks [N, block_length] of the first ``max_tokens`` ids.

    Text shorter than one block gives a single shorter block; a partial last block is dropped.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 3:
        raise EvalError(f"the data has {ids.numel()} tokens; at least 3 are needed")
    block_length = min(block_length, ids.numel())
    count = ids.numel() // block_length
    return ids[: count * block_length].view(count, block_length)


def prompts_from_ids(ids: torch.Tensor, num_prompts: int, prompt_tokens: int) -> list[torch.Tensor]:
    """``num_prompts`` slices of ``prompt_tokens`` ids, evenly spread over the text, each [1, M]."""
    if ids.numel() < prompt_tokens:
        raise EvalError(f"the data has {ids.numel()} tokens, fewer than --prompt-tokens {prompt_tokens}")
    last_start = ids.numel() - prompt_tokens
    starts = torch.linspace(0, last_start, num_prompts).long().unique().tolist()
    return [ids[s : s + prompt_tokens].unsqueeze(0) for s in starts]


def prompts_from_file(path: str, tokenizer: Any, vocab_size: int, chat: bool = False) -> list[torch.Tensor]:
    """One prompt per non-blank line of a UTF-8 text file, each tokenised to [1, M]; with ``chat``,
    each line is a user message in the tokenizer's chat template, up to where the answer begins."""
    lines = [line.strip() for line in read_text(path).splitlines()]
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise EvalError("--chat needs a tokenizer with a chat template; this model's has none")
        lines = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": line}], tokenize=False, add_generation_prompt=True
            )
            for line in lines
            if line
        ]
    prompts = [tokenize(tokenizer, line, vocab_size) for line in lines if line]
    prompts = [p.unsqueeze(0) for p in prompts if p.numel() > 0]
    if not prompts:
        raise EvalError(f"prompts file {path} has no prompt that tokenises to at least one token")
    return prompts


def check_fits(prompts: list[torch.Tensor], max_new_tokens: int, context: int) -> None:
    """Every prompt plus ``max_new_tokens`` must fit the model's context."""
    for index, prompt in enumerate(prompts):
        if prompt.shape[1] + max_new_tokens > context:
            raise EvalError(
                f"prompt {index + 1} has {prompt.shape[1]} tokens; with --max-new-tokens {max_new_tokens} it "
                f"exceeds the model's context of {context}"
            )
