"""Weights I/O: own directories, Hugging Face Llama directories, the real SmolLM2 GGUF file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from recyclegpt.core import RecycleGPT

from .conftest import tiny_config


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=97, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")


def test_save_and_load_roundtrip(tmp_path: Path, tiny_model: RecycleGPT) -> None:
    tokenizer = tiny_tokenizer()
    tiny_model.save_pretrained(tmp_path / "export", tokenizer=tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "recyclegpt"
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_path / "export", *(tmp_path / "export").iterdir()]:  # not private like a temp dir
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask
    loaded = RecycleGPT.from_pretrained(str(tmp_path / "export"))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), tiny_model(ids))
        assert torch.equal(loaded.recycle.fc.weight, tiny_model.recycle.fc.weight)
    assert loaded.tokenizer("the lazy fox").input_ids == tokenizer("the lazy fox").input_ids
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tying survives the round trip


def test_overwriting_an_export_is_atomic_and_leaves_no_staging(tmp_path: Path, tiny_model: RecycleGPT) -> None:
    target = tmp_path / "export"
    tiny_model.save_pretrained(target)
    (target / "stale.txt").write_text("from an older export")
    tiny_model.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_bf16_load(tmp_path: Path, tiny_model: RecycleGPT) -> None:
    tiny_model.save_pretrained(tmp_path)
    loaded = RecycleGPT.from_pretrained(tmp_path, dtype="bf16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    out = loaded.generate(torch.tensor([[1, 2, 3]]), 6, decoding="speculative")
    assert out.new_tokens.shape == (1, 6)


def hf_llama_dir(tmp_path: Path, **overrides) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(tiny_config(**overrides).to_hf()).eval()
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf_model


@pytest.mark.parametrize("tie", [True, False])
def test_hf_llama_directory_gets_a_fresh_module(tmp_path: Path, tie: bool) -> None:
    path, hf_model = hf_llama_dir(tmp_path, tie_embeddings=tie)
    model = RecycleGPT.from_pretrained(path, module_layers=2)
    assert model.config.module_layers == 2 and len(model.recycle.layers) == 2
    assert model.tokenizer is not None
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() <= 1e-4


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    path, hf_model = hf_llama_dir(tmp_path)
    (path / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled"):
        RecycleGPT.from_pretrained(path)


def test_bad_paths_and_types_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model at"):
        RecycleGPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        RecycleGPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        RecycleGPT.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    from recyclegpt.core.assets import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2 GGUF unavailable (needs PyPI access once): {error}")


@pytest.mark.slow
def test_real_smollm2_gguf_loads_and_matches_transformers(smollm2_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = RecycleGPT.from_pretrained(smollm2_file)
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert config.rope_theta == 100000.0 and config.tie_embeddings
    tokenizer = model.tokenizer
    assert tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(
        str(smollm2_file.parent), gguf_file=smollm2_file.name, dtype=torch.float32
    )
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-4
    out = model.generate(ids, 8)
    expected = reference.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(out.sequences, expected)
    assert "Paris" in tokenizer.decode(out.new_tokens[0])
