"""Byte-level BPE tokenizers: trained on a corpus with `tokenizers`, used as transformers fast tokenizers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from recyclegpt.core.assets import resolve_model_path
from recyclegpt.core.checkpoint import load_tokenizer

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE of ``vocab_size`` tokens (one of them the end-of-text token)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap(tokenizer)


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def load_any_tokenizer(source: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a model directory, of a ``.gguf`` file (or ``smollm2``), or a ``tokenizer.json`` file."""
    source = resolve_model_path(source)
    if not source.exists():
        raise FileNotFoundError(f"no tokenizer at {source}")
    if source.is_file() and source.suffix == ".gguf":
        tokenizer = load_tokenizer(source.parent, gguf_file=source.name)
    elif source.is_file():
        tokenizer = wrap(Tokenizer.from_file(str(source)))
    else:
        tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise FileNotFoundError(f"{source} holds no tokenizer (tokenizer.json)")
    return tokenizer
