"""Self-generated training text: the base's own continuations, batched, equal to lone greedy decoding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.train.selfgen import corpus_prompts, self_generate, write_samples

from .test_frozen_base import pretrained_model


def test_batched_continuations_equal_lone_greedy_decoding(tmp_path: Path) -> None:
    model = RecycleGPT.from_pretrained(str(pretrained_model(tmp_path / "base"))).eval()
    model.tokenizer.eos_token_id = None  # no early stop: every row writes all its tokens
    ids = torch.arange(3, 203) % model.config.vocab_size
    prompts = corpus_prompts(ids, 5, 12, seed=1)
    assert prompts.shape == (5, 12)
    assert all(any(torch.equal(p, ids[s : s + 12]) for s in range(ids.numel() - 11)) for p in prompts)

    samples, report = self_generate(model, prompts, new_tokens=10, batch_size=2)
    assert report.samples == 5 and report.new_tokens == 50
    for prompt, sample in zip(prompts, samples, strict=True):
        alone = model.generate(prompt[None], 10).sequences[0].tolist()
        assert sample == alone

    out = tmp_path / "selfgen.txt"
    characters = write_samples(model.tokenizer, samples, out)
    assert characters == len(out.read_text(encoding="utf-8")) > 0


def test_generation_stops_at_eos_and_at_the_time_limit(tmp_path: Path) -> None:
    model = RecycleGPT.from_pretrained(str(pretrained_model(tmp_path / "base"))).eval()
    prompts = corpus_prompts(torch.arange(3, 203) % model.config.vocab_size, 8, 12)
    free = self_generate(model, prompts, new_tokens=10, batch_size=4)[0]
    eos = free[0][12 + 3]  # pretend the 4th new token of the first row is EOS
    model.tokenizer.eos_token_id = eos
    samples, _ = self_generate(model, prompts, new_tokens=10, batch_size=4)
    assert samples[0] == free[0][: free[0].index(eos, 12)]
    assert all(eos not in s[12:] for s in samples)
    samples, report = self_generate(model, prompts, new_tokens=10, batch_size=4, seconds=0.0)
    assert report.samples == len(samples) == 4  # one whole batch, then the time is up


def test_cli_writes_text_and_rejects_bad_arguments(tmp_path: Path) -> None:
    base = pretrained_model(tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main():\n    return parse(arguments)\n" * 40, encoding="utf-8")
    command = [sys.executable, "-m", "recyclegpt.train.selfgen", "--model", str(base), "--prompts-from", str(corpus)]
    out = tmp_path / "out.txt"
    result = subprocess.run(
        [*command, "--out", str(out), "--samples", "3", "--new-tokens", "8", "--prompt-tokens", "6"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 samples" in result.stdout and out.read_text(encoding="utf-8").strip()
    bad = subprocess.run([*command, "--out", str(out), "--new-tokens", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--new-tokens must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(
        [*command[:-1], str(tmp_path / "nope.txt"), "--out", str(out)], capture_output=True, text=True
    )
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
