"""The frozen base's feature cache, and frozen-base training over it (unrolled, distilled, draft vocabulary)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from recyclegpt.core import RecycleConfig, RecycleGPT
from recyclegpt.core.quantize import QuantizedLinear
from recyclegpt.train.features import FeatureCache, base_digest, quantized_base

from .test_frozen_base import pretrained_model


def _tiny_model(seed: int = 0) -> RecycleGPT:
    torch.manual_seed(seed)
    return RecycleGPT(RecycleConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=32)).eval()


def _blocks(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (10, 12), generator=torch.Generator().manual_seed(seed))


def test_cache_stores_the_base_states_and_is_reused(tmp_path: Path) -> None:
    model, blocks = _tiny_model(), _blocks()
    cache = FeatureCache(tmp_path / "cache", storage="fp32", shard_blocks=4)
    hidden, report = cache.build_or_load(model, blocks, log=lambda _: None)
    assert report.built and report.tokens == blocks.numel()
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 3
    with torch.no_grad():
        torch.testing.assert_close(hidden, model.base_hidden(blocks))
    again, report = FeatureCache(tmp_path / "cache", storage="fp32").build_or_load(model, blocks, log=lambda _: None)
    assert not report.built and report.reason == "reused"
    assert torch.equal(again, hidden)


def test_cache_that_does_not_match_is_rebuilt(tmp_path: Path) -> None:
    model, blocks = _tiny_model(), _blocks()
    cache = FeatureCache(tmp_path / "cache", storage="bf16")
    cache.build_or_load(model, blocks, log=lambda _: None)

    other_base = _tiny_model(seed=1)  # other base weights
    hidden, report = cache.build_or_load(other_base, blocks, log=lambda _: None)
    assert report.built and "base_sha256" in report.reason
    with torch.no_grad():
        torch.testing.assert_close(hidden.float(), other_base.base_hidden(blocks).bfloat16().float())

    hidden, report = cache.build_or_load(other_base, _blocks(seed=3), log=lambda _: None)  # other corpus
    assert report.built and "blocks_sha256" in report.reason

    _, report = FeatureCache(tmp_path / "cache", storage="fp32").build_or_load(other_base, _blocks(3), log=print)
    assert report.built and "storage_dtype" in report.reason

    (tmp_path / "cache" / "manifest.json").unlink()  # an interrupted build leaves no manifest
    _, report = FeatureCache(tmp_path / "cache", storage="fp32").build_or_load(other_base, _blocks(3), log=print)
    assert report.built and report.reason == "no complete cache"

    # A module change does not touch the base's states: the cache stays valid.
    with torch.no_grad():
        other_base.recycle.fc.weight.add_(1.0)
    _, report = FeatureCache(tmp_path / "cache", storage="fp32").build_or_load(other_base, _blocks(3), log=print)
    assert not report.built


def test_cache_of_a_quantized_base_holds_its_states_and_leaves_the_base_as_it_was(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RecycleGPT(RecycleConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=32))
    blocks, digest = _blocks(), base_digest(model)
    cache = FeatureCache(tmp_path / "cache", storage="fp32")
    hidden, report = cache.build_or_load(model, blocks, "fp32", quantize="w8a8", log=lambda _: None)
    assert report.built
    with torch.no_grad():
        torch.testing.assert_close(hidden, quantized_base(model, "w8a8", "fp32").base_hidden(blocks))
        assert not torch.allclose(hidden, model.eval().base_hidden(blocks))  # the weights' rounding shows
    assert base_digest(model) == digest and not any(isinstance(m, QuantizedLinear) for m in model.modules())
    _, report = cache.build_or_load(model, blocks, "fp32", quantize="w8a8", log=lambda _: None)
    assert not report.built
    _, report = cache.build_or_load(model, blocks, "fp32", log=lambda _: None)  # unquantized states: rebuilt
    assert report.built and "quantize" in report.reason


def _metrics(workdir: Path) -> list[dict[str, str]]:
    files = sorted(workdir.glob("runs/logs/**/metrics.csv"))
    assert files, "no metrics.csv"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def frozen_base_args(source: Path) -> list[str]:
    """`recyclegpt-train` arguments: 6 steps of a frozen ``source`` base's module over cached features,
    unrolled 3 deep, distilled, with a 64-token draft vocabulary."""
    return [
        "--model.regime=frozen_base",
        f"--model.pretrained={source}",
        "--model.unroll_depth=3",
        "--model.distill=true",
        "--model.draft_vocab_size=64",
        "--model.module_init=base",
        "--data.feature_cache=runs/features",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
    ]


def assert_only_the_module_changed(source: Path, export: Path) -> None:
    before, after = load_file(source / "model.safetensors"), load_file(export / "model.safetensors")
    for key in before:
        if not key.startswith("recycle."):
            assert torch.equal(before[key], after[key]), f"base weight {key} changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("recycle."))


def test_frozen_base_trains_over_cached_features_unrolled_distilled_with_a_draft_vocab(workdir, run_train, exported):
    source = pretrained_model(workdir / "pretrained")
    args = frozen_base_args(source)
    result = run_train(workdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature cache" in result.stdout and "building" in result.stdout
    assert_only_the_module_changed(source, exported(result.stdout))
    model = RecycleGPT.from_pretrained(str(exported(result.stdout)))
    assert model.config.draft_vocab_size == 64 and int(model.recycle.t2d.sum()) == 64
    rows = _metrics(workdir)
    columns = set(rows[0])
    for k in (1, 2, 3):
        assert {f"train/loss_d{k}", f"val/loss_d{k}", f"val/agreement_d{k}"} <= columns
    assert any(row.get("val/agreement_d3") for row in rows)

    # A second run with the same base and corpus reuses the cache (the base does not run again).
    again = run_train(workdir, *args, "--trainer.max_steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "building" not in again.stdout


def test_resume_over_cached_features_continues_the_step_count(workdir, run_train):
    source = pretrained_model(workdir / "pretrained")
    args = [
        "--model.regime=frozen_base",
        f"--model.pretrained={source}",
        "--model.unroll_depth=2",
        "--model.draft_vocab_size=40",
        "--data.feature_cache=runs/features",
    ]
    first = run_train(workdir, *args, "--trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = torch.load(workdir / "runs/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 4
    resumed = run_train(workdir, *args, "--trainer.max_steps=8", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = torch.load(workdir / "runs/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 8
    assert checkpoint["state_dict"]["model.recycle.d2t"].numel() == 40
    # The frozen base is reloaded from `pretrained`: checkpoints carry the module only.
    assert all(key.startswith("model.recycle.") for key in checkpoint["state_dict"])


def test_cache_of_a_module_with_feature_layers_holds_them_and_is_keyed_by_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = RecycleConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, max_seq_len=32)
    plain, blocks = RecycleGPT(config).eval(), _blocks()
    fused = RecycleGPT(dataclasses.replace(config, feature_layers=[1])).eval()
    fused.load_state_dict(plain.state_dict(), strict=False)  # the same base
    cache = FeatureCache(tmp_path / "cache", storage="fp32")
    cache.build_or_load(plain, blocks, log=lambda _: None)
    hidden, report = cache.build_or_load(fused, blocks, log=lambda _: None)
    assert report.built and "feature_layers" in report.reason
    assert hidden.shape == (*blocks.shape, 32)
    with torch.no_grad():
        torch.testing.assert_close(hidden, fused.base_hidden(blocks))
    _, report = cache.build_or_load(fused, blocks, log=lambda _: None)
    assert not report.built


def test_frozen_base_trains_a_module_that_reads_feature_layers(workdir, run_train, exported):
    source = pretrained_model(workdir / "pretrained")
    args = [
        "--model.regime=frozen_base",
        f"--model.pretrained={source}",
        "--model.unroll_depth=2",
        "--model.distill=true",
        "--model.feature_layers=[0]",
        "--data.feature_cache=runs/features",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
    ]
    result = run_train(workdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    model = RecycleGPT.from_pretrained(str(exported(result.stdout)))
    assert model.config.feature_layers == [0]
    assert model.recycle.fuse.weight.shape == (32, 64)
    out = model.generate(torch.tensor([[5, 6, 7]]), 8, decoding="speculative", draft_length=2)
    assert torch.equal(out.sequences, model.generate(torch.tensor([[5, 6, 7]]), 8).sequences)
