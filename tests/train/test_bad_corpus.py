"""Empty, missing and unreadable corpora end with a one-line error naming the path, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def unreadable_file(tmp_path: Path) -> str:
    path = tmp_path / "secret.txt"
    path.write_text("some text\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: use a file whose read fails with EIO instead
        return "/proc/self/mem"
    return str(path)


@pytest.mark.parametrize("case", ["empty", "missing", "unreadable", "blank"])
def test_bad_corpus_is_a_one_line_error(case, workdir, run_train):
    if case == "empty":
        corpus = workdir / "empty.txt"
        corpus.write_text("")
    elif case == "blank":
        corpus = workdir / "blank.txt"
        corpus.write_text("   \n\n  \n")
    elif case == "missing":
        corpus = workdir / "no" / "such.txt"
    else:
        corpus = unreadable_file(workdir)
    result = run_train(workdir, "--data.train_files", f"[{corpus}]", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("recyclegpt-train: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert str(corpus) in errors[0]


def test_stdlib_heldout_text_starts_after_the_training_files() -> None:
    from recyclegpt.train.corpus import read_texts, stdlib_files, stdlib_heldout_text

    training = "".join(read_texts(stdlib_files(), max_bytes=200_000))
    heldout = stdlib_heldout_text(skip_bytes=200_000, max_bytes=50_000)
    assert len(heldout) == 50_000
    assert heldout[:2000] not in training


@pytest.mark.parametrize("case", ["text", "block_size", "no_tokenizer"])
def test_bad_train_blocks_is_a_one_line_error(case, workdir, run_train):
    import torch

    from recyclegpt.train.data import write_blocks

    from .test_frozen_base import pretrained_model

    path = workdir / "blocks.safetensors"
    args = ["--data.train_blocks", str(path), "--data.block_size", "16"]
    if case != "no_tokenizer":
        args += ["--model.regime", "frozen_base", "--model.pretrained", str(pretrained_model(workdir / "base"))]
    if case == "text":
        path.write_text("not a safetensors file\n")
    else:
        write_blocks(torch.zeros(4, 8 if case == "block_size" else 16, dtype=torch.long), path)
    result = run_train(workdir, *args, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("recyclegpt-train: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    expected = {
        "text": "cannot read token blocks",
        "block_size": "blocks of 8 tokens",
        "no_tokenizer": "model.pretrained",
    }
    assert expected[case] in errors[0]
