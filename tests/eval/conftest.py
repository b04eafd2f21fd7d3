"""A tiny random RecycleGPT with a tiny byte-level BPE tokenizer, saved like a real model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from recyclegpt.core import RecycleGPT, recycle_losses

from ..conftest import tiny_config

SUBJECTS = ["the old fisherman", "a small robot", "the queen", "my neighbour", "the tired student", "a grey cat"]
VERBS = ["repaired", "painted", "carried", "forgot", "discovered", "sold", "watched"]
OBJECTS = ["the wooden boat", "a red umbrella", "the broken clock", "seven letters", "the garden gate", "a map"]
ENDINGS = ["before dawn.", "in the rain.", "without a word.", "near the harbour.", "after the storm.", "again."]


def make_text(sentences: int, seed: int) -> str:
    """A few KB of simple English from a fixed grammar (deterministic for a seed)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)]
        lines.append(" ".join(words).capitalize())
    return "\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)) + "\n"


def train_tokenizer(text: str, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def heldout_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.txt"
    path.write_text(make_text(60, seed=1))
    return path


def fit_briefly(model: RecycleGPT, ids: torch.Tensor, steps: int = 30) -> None:
    """A few optimizer steps on the losses of core, so that the module sometimes agrees with the
    base and speculative drafts get accepted (a purely random module never agrees)."""
    blocks = ids[: 6 * 64].view(6, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        recycle_losses(model, blocks).loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny RecycleGPT (context 128), briefly fitted, with a BPE tokenizer trained on a few KB of text."""
    text = make_text(120, seed=0)
    tokenizer = train_tokenizer(text)
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config(tokenizer))
    fit_briefly(model, torch.tensor(tokenizer(text)["input_ids"]))
    path = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(str(path), tokenizer=tokenizer)
    return path
