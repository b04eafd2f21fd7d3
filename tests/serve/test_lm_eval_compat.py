"""lm-evaluation-harness 0.4.13 against the real server, offline, with its defaults.

``--model local-completions`` auto-detects the server's tokenizer endpoints (remote tokenizer) and
sends token-id prompts; a local generate task and a local loglikelihood_rolling task must both
finish with scores. Runs in ``nox -s compat`` (which installs lm-eval==0.4.13); elsewhere it is
skipped for want of the harness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ServerProcess

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is installed by `nox -s compat`")

DOCS = [
    {"question": "The little robot walked to the", "answer": " market"},
    {"question": "Her mother smiled and hung the painting on the", "answer": " wall"},
    {"question": "To be, or not to be, that is the", "answer": " question"},
]
TEXTS = [
    {"text": "The little robot walked to the market and bought three red apples. It counted them twice."},
    {"text": "Once upon a time there was a girl named Lily who loved to paint the sky, the sea and her cat."},
]
GENERATE_TASK = """
task: recycle_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
ROLLING_TASK = """
task: recycle_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(directory: Path) -> None:
    for name, docs in (("generate", DOCS), ("rolling", TEXTS)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        template = GENERATE_TASK if name == "generate" else ROLLING_TASK
        (directory / f"recycle_{name}.yaml").write_text(template.format(data=data))


def test_local_completions_generate_and_rolling_tasks_finish_with_scores(tiny_model_dir, tmp_path):
    write_tasks(tmp_path)
    with ServerProcess(["--model", str(tiny_model_dir), "--dtype", "fp32", "--cpu-threads", "1"]) as server:
        model_args = (
            f"model={tiny_model_dir.name},base_url={server.url}/v1/completions,max_length=128,"
            "num_concurrent=2,max_retries=1"
        )
        results = tmp_path / "results"
        command = [
            sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
            "--tasks", "recycle_generate,recycle_rolling", "--include_path", str(tmp_path),
            "--output_path", str(results), "--batch_size", "2",
        ]  # fmt: skip
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (report,) = results.rglob("results_*.json")
    scores = json.loads(report.read_text())["results"]
    assert 0.0 <= scores["recycle_generate"]["exact_match,none"] <= 1.0
    rolling = scores["recycle_rolling"]
    assert rolling["word_perplexity,none"] > 1.0 and rolling["bits_per_byte,none"] > 0.0
    print(json.dumps(scores, indent=1))
