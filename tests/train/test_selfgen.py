"""Self-generated training text: the base's own continuations, batched, equal to lone greedy decoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_blocks_and_their_states_become_a_feature_cache_the_trainer_reuses(tmp_path: Path) -> None:
    """Greedy blocks of exactly block_size tokens, not cut at EOS, with the states the base computed
    while writing them; stored under the key the data module computes, so training reads them as is."""
    from recyclegpt.train.data import TextDataModule, read_blocks
    from recyclegpt.train.features import FeatureCache, cache_key
    from recyclegpt.train.selfgen import self_generate_blocks, self_generate_training_data

    source = pretrained_model(tmp_path / "base")
    model = RecycleGPT.from_pretrained(str(source)).eval()
    ids = torch.arange(3, 203) % model.config.vocab_size
    prompts = corpus_prompts(ids, 5, 8, seed=2)
    blocks, hidden, report = self_generate_blocks(model, prompts, block_size=20, batch_size=2)
    assert blocks.shape == (5, 20) and hidden.shape == (5, 20, model.config.hidden_size) and report.new_tokens == 60
    with torch.no_grad():
        torch.testing.assert_close(hidden, model.base_hidden(blocks))
    model.tokenizer.eos_token_id = int(blocks[0, 10])  # an EOS mid-block stops nothing
    assert torch.equal(self_generate_blocks(model, prompts, block_size=20, batch_size=2)[0], blocks)

    trainer_view = RecycleGPT.from_pretrained(str(source))  # fp32, as the trainer loads it
    written, _ = self_generate_training_data(
        model, prompts, 20, torch.bfloat16, tmp_path / "blocks.safetensors", tmp_path / "features" / "train"
    )
    assert torch.equal(read_blocks(tmp_path / "blocks.safetensors", 20), written)
    key = cache_key(trainer_view, written, "bf16", "bf16")
    assert FeatureCache(tmp_path / "features" / "train").mismatch(key) is None

    data = TextDataModule(
        tokenizer=str(source), train_blocks=str(tmp_path / "blocks.safetensors"), block_size=20, val_fraction=0.2
    )
    data.setup()
    assert torch.equal(data.train_blocks, written[:4]) and torch.equal(data.val_blocks, written[4:])


def test_cli_writes_blocks_and_features_and_rejects_bad_combinations(tmp_path: Path) -> None:
    base = pretrained_model(tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main():\n    return parse(arguments)\n" * 40, encoding="utf-8")
    command = [sys.executable, "-m", "recyclegpt.train.selfgen", "--model", str(base), "--prompts-from", str(corpus)]
    command += ["--samples", "3", "--new-tokens", "8", "--prompt-tokens", "6"]
    blocks = tmp_path / "blocks.safetensors"
    cache = ["--feature-cache", str(tmp_path / "cache"), "--dtype", "fp32", "--quantize", "w8a8"]
    result = subprocess.run([*command, "--blocks-out", str(blocks), *cache], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 blocks of 14 tokens" in result.stdout and "(fp32 + w8a8)" in result.stdout
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["key"]["quantize"] == "w8a8"
    for extra, message in [
        (["--feature-cache", str(tmp_path / "c2"), "--out", "x.txt"], "give --blocks-out too"),
        (["--blocks-out", str(blocks), "--temperature", "0.7"], "drop --temperature"),
        ([], "give --out (text), --blocks-out (token blocks) or both"),
    ]:
        bad = subprocess.run([*command, *extra], capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr


def test_a_quantized_base_writes_the_blocks_and_states_it_decodes_and_keys_them_so(tmp_path: Path) -> None:
    """With ``quantize``, the blocks are what the quantized base writes and the states are its own,
    stored under a key the trainer matches only with ``data.feature_quantize`` set to the same."""
    from recyclegpt.train.data import TextDataModule
    from recyclegpt.train.features import FeatureCache, cache_key
    from recyclegpt.train.selfgen import self_generate_training_data

    source = pretrained_model(tmp_path / "base")
    model = RecycleGPT.from_pretrained(str(source))
    prompts = corpus_prompts(torch.arange(3, 203) % model.config.vocab_size, 4, 8, seed=2)
    cache_dir = tmp_path / "features" / "train"
    written, _ = self_generate_training_data(
        model, prompts, 20, torch.float32, tmp_path / "b.safetensors", cache_dir, "fp32", batch_size=2, quantize="w8a8"
    )
    reference = RecycleGPT.from_pretrained(str(source), quantize="w8a8").eval()
    unquantized = RecycleGPT.from_pretrained(str(source)).eval()
    for prompt, block in zip(prompts, written, strict=True):
        assert torch.equal(reference.generate(prompt[None], 12).sequences[0], block)
    with torch.no_grad():
        torch.testing.assert_close(FeatureCache(cache_dir, "fp32").load(written), reference.base_hidden(written))
        assert not torch.allclose(reference.base_hidden(written), unquantized.base_hidden(written))

    cache = FeatureCache(cache_dir, "fp32")
    assert cache.mismatch(cache_key(unquantized, written, "fp32", "fp32", quantize="w8a8")) is None
    assert "quantize" in cache.mismatch(cache_key(unquantized, written, "fp32", "fp32"))
    with pytest.raises(ValueError, match="feature_quantize must be one of"):
        TextDataModule(tokenizer=str(source), train_blocks=str(tmp_path / "b.safetensors"), feature_quantize="int3")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_chat_prompts_put_corpus_slices_in_the_chat_template(tmp_path: Path) -> None:
    from recyclegpt.train.selfgen import CHAT_INSTRUCTIONS, chat_prompts

    model = RecycleGPT.from_pretrained(str(pretrained_model(tmp_path / "base")))
    tokenizer = model.tokenizer
    ids = torch.tensor(
        tokenizer("def main():\n    return parse(arguments)\n" * 60, add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(ValueError, match="chat template"):
        chat_prompts(tokenizer, ids, 4, 72)
    tokenizer.chat_template = CHAT_TEMPLATE
    prompts = chat_prompts(tokenizer, ids, 6, 72, seed=3)
    assert prompts.shape == (6, 72)
    suffix = tokenizer("\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    stream = ids.tolist()
    for row in prompts.tolist():
        text = tokenizer.decode(row)
        assert text.startswith("<|user|>\n") and text.endswith("<|assistant|>\n")
        assert any(instruction in text for instruction in CHAT_INSTRUCTIONS)
        prefix = next(
            tokenizer(f"<|user|>\n{instruction}\n\n", add_special_tokens=False)["input_ids"]
            for instruction in CHAT_INSTRUCTIONS
            if instruction in text
        )
        middle = row[len(prefix) : len(row) - len(suffix)]
        assert row[: len(prefix)] == prefix and row[len(row) - len(suffix) :] == suffix
        assert any(stream[s : s + len(middle)] == middle for s in range(len(stream)))  # a slice of the corpus
    assert torch.equal(chat_prompts(tokenizer, ids, 6, 72, seed=3), prompts)  # seeded
    with pytest.raises(ValueError, match="raise it"):
        chat_prompts(tokenizer, ids, 2, 40)


def test_blocks_from_chat_and_corpus_prompts_of_two_lengths(tmp_path: Path) -> None:
    """Groups of prompts of different lengths give blocks of one size, each row what the base writes
    alone, their batches interleaved in proportion (a time budget keeps the mix)."""
    from recyclegpt.train.selfgen import chat_prompts, mixed_prompts, prompt_batches, self_generate_blocks

    model = RecycleGPT.from_pretrained(str(pretrained_model(tmp_path / "base"))).eval()
    model.tokenizer.chat_template = CHAT_TEMPLATE
    text = "def main():\n    return parse(arguments)\n" * 60
    ids = torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    groups = mixed_prompts(model.tokenizer, ids, 8, 8, chat_share=0.5, chat_prompt_tokens=72)
    assert [tuple(g.shape) for g in groups] == [(4, 72), (4, 8)]
    assert [b.shape[1] for b in prompt_batches(groups, 2)] == [72, 8, 72, 8]
    assert [b.shape[1] for b in prompt_batches([groups[0], groups[1][:2]], 1)] == [72, 8, 72, 72, 8, 72]
    assert len(mixed_prompts(model.tokenizer, ids, 8, 8)) == 1  # no chat share: the corpus prompts alone
    quoted = torch.tensor(model.tokenizer("class Parser:\n    pass\n" * 60, add_special_tokens=False)["input_ids"])
    only_chat = mixed_prompts(model.tokenizer, ids, 4, 8, chat_share=1.0, chat_prompt_tokens=72, chat_ids=quoted)
    assert len(only_chat) == 1 and torch.equal(only_chat[0], chat_prompts(model.tokenizer, quoted, 4, 72))
    blocks, hidden, report = self_generate_blocks(model, groups, block_size=88, batch_size=2)
    assert blocks.shape == (8, 88) and hidden.shape[:2] == (8, 88)
    assert report.new_tokens == 4 * (88 - 72) + 4 * (88 - 8)
    rows = [row for batch in prompt_batches(groups, 2) for row in batch]
    for prompt, block in zip(rows, blocks, strict=True):
        alone = model.generate(prompt[None], 88 - prompt.numel()).sequences[0]
        assert torch.equal(block, alone)


def test_cli_rejects_a_bad_chat_share_and_a_tokenizer_without_a_chat_template(tmp_path: Path) -> None:
    base = pretrained_model(tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main():\n    return parse(arguments)\n" * 40, encoding="utf-8")
    command = [sys.executable, "-m", "recyclegpt.train.selfgen", "--model", str(base), "--prompts-from", str(corpus)]
    command += ["--out", str(tmp_path / "out.txt"), "--samples", "3", "--new-tokens", "8"]
    for extra, message in [
        (["--chat-share", "1.5"], "--chat-share must be between 0 and 1"),
        (["--chat-share", "0.5"], "chat template"),
    ]:
        bad = subprocess.run([*command, *extra], capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr
