"""A tiny config fits a few steps, logs its metrics and exports a loadable, generating model."""

from __future__ import annotations

import csv

import torch

from recyclegpt.core import RecycleGPT


def test_fit_logs_metrics_and_exports_a_loadable_model(workdir, run_train, exported):
    result = run_train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    export = exported(result.stdout)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}

    model = RecycleGPT.from_pretrained(str(export))
    assert model.tokenizer is not None and model.config.vocab_size == len(model.tokenizer)
    prompt = torch.tensor([model.tokenizer.encode("def main(")])
    out = model.generate(prompt, max_new_tokens=5, decoding="alternating")
    assert out.sequences.shape == (1, prompt.shape[1] + 5)
    assert out.module_calls > 0

    (metrics_file,) = workdir.glob("runs/logs/lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    logged = {key for row in rows for key, value in row.items() if value}
    for stage in ("train", "val"):
        for name in ("lm_loss", "rec_loss", "perplexity", "module_accuracy", "agreement"):
            assert f"{stage}/{name}" in logged
    assert {"train/tokens_per_sec", "lr-AdamW/pg1"} <= logged
    last_step = max(int(row["step"]) for row in rows if row["train/lm_loss"])
    assert last_step == 11  # 12 optimizer steps, logged every step
    tokens_per_sec = [float(row["train/tokens_per_sec"]) for row in rows if row["train/tokens_per_sec"]]
    assert all(value > 0 for value in tokens_per_sec)
    val_ppl = [float(row["val/perplexity"]) for row in rows if row["val/perplexity"]]
    assert all(1 < value < 1000 for value in val_ppl)
