import json
import subprocess
import sys

import pytest

from recyclegpt.eval.cli import main

METHOD_KEYS = {"tokens_per_s", "speedup"}
FAST_SPEED = ["--num-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "4", "--repeats", "1"]


@pytest.fixture(scope="module")
def speed_run(tiny_model_dir, heldout_text, tmp_path_factory):
    """One `speed` run on the tiny model, logged to a temporary SQLite MLflow store."""
    out = tmp_path_factory.mktemp("speed")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        argv = ["speed", "--model", str(tiny_model_dir), "--data", str(heldout_text), "--json", str(out / "speed.json")]
        code = main([*argv, *FAST_SPEED, "--mlflow-experiment", "eval-test"])
    return code, out, uri, argv


@pytest.mark.slow
def test_speed_writes_every_key(speed_run, capsys):
    code, out, _, _ = speed_run
    assert code == 0
    result = json.loads((out / "speed.json").read_text())
    for method in ("transformers", "standard", "alternating", "speculative"):
        assert METHOD_KEYS <= set(result[method]), method
        assert result[method]["tokens_per_s"] > 0
    assert result["standard"]["speedup"] == 1.0
    spec = result["speculative"]
    assert spec["best_draft_length"] in range(1, 7)
    assert spec["identical_to_standard"] is True
    assert set(spec["by_draft_length"]) == {str(g) for g in range(1, 7)}
    for entry in spec["by_draft_length"].values():
        assert {"full_calls_per_token", "accepted_per_verify", "acceptance_rate"} <= set(entry)
    # The fitted module gets drafts accepted, so speculative needs fewer full calls per token.
    assert max(e["accepted_per_verify"] for e in spec["by_draft_length"].values()) > 0
    assert min(e["full_calls_per_token"] for e in spec["by_draft_length"].values()) < 1
    assert result["alternating"]["full_calls_per_token"] == pytest.approx(0.5)
    assert 0 < result["step_cost"]["c"]
    assert "| speculative g=6 |" in (out / "speed.md").read_text()
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_speed_logs_to_mlflow(speed_run):
    from mlflow.tracking import MlflowClient

    _, _, uri, _ = speed_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("eval-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["speculative.tokens_per_s"] > 0
    assert run.data.params["max_new_tokens"] == "4"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"speed.json", "speed.md", "speed.png"}


@pytest.mark.slow
def test_speed_exits_nonzero_on_a_planted_reference_mismatch(speed_run, tmp_path, capsys):
    _, out, _, argv = speed_run
    reference = json.loads((out / "speed.json").read_text())
    reference["outputs"]["standard"][1][2] += 1  # plant one wrong token in prompt 2
    (tmp_path / "wrong.json").write_text(json.dumps(reference))
    argv = [*argv[:-1], str(tmp_path / "rerun.json"), *FAST_SPEED, "--reference", str(tmp_path / "wrong.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "standard output differs from --reference" in err and "prompt(s) 2" in err


@pytest.mark.slow
def test_quality_writes_every_key(tiny_model_dir, heldout_text, tmp_path):
    argv = ["quality", "--model", str(tiny_model_dir), "--data", str(heldout_text), "--json", str(tmp_path / "q.json")]
    assert main([*argv, "--max-tokens", "512", "--num-prompts", "2", "--max-new-tokens", "4"]) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    for key in ("base_perplexity", "module_perplexity", "alternating_perplexity"):
        assert 1 < result[key] < result["vocab_size"], key  # briefly fitted: below uniform guessing
    for key in ("base_accuracy", "module_accuracy", "agreement"):
        assert 0 <= result[key] <= 1, key
    assert set(result["agreement_by_depth"]) == {"1", "2", "3", "4"}
    assert result["agreement_by_depth"]["1"] == pytest.approx(result["agreement"], abs=1e-6) and result["agreement"] > 0
    assert result["tokens"] == 512 and result["block_length"] == 128
    assert 0 <= result["generation"]["identical_fraction"] <= 1
    assert "| module perplexity |" in (tmp_path / "q.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["speed", "--model", "{tmp}/nope", "--data", "{data}"], "does not exist"),
        (["speed", "--model", "{model}", "--data", "{empty}"], "is empty"),
        (["speed", "--model", "{model}", "--data", "{data}", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["speed", "--model", "{model}"], "exactly one of --prompts FILE or --data FILE"),
        (["speed", "--model", "{model}", "--data", "{data}", "--chat"], "--chat reads user messages from --prompts"),
        (["speed", "--model", "{model}", "--prompts", "{data}", "--chat"], "needs a tokenizer with a chat template"),
        (["speed", "--model", "{model}", "--data", "{data}", "--dtype", "fp8"], "invalid choice"),
        (["speed", "--model", "{model}", "--data", "{data}", "--repeats", "two"], "repeats"),
        (["speed", "--model", "{model}", "--data", "{data}", "--max-new-tokens", "500"], "exceeds the model's context"),
        (["quality", "--data", "{data}"], "model"),
        (["quality", "--model", "{model}", "--data", "{empty}"], "is empty"),
        (["quality", "--model", "{tmp}", "--data", "{data}"], "cannot load model"),
        (["samples", "--model", "{model}", "--prompt", "  "], "--prompt is empty"),
        (["samples", "--model", "{model}", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["bench"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_errors(args, message, tiny_model_dir, heldout_text, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    paths = {
        "model": str(tiny_model_dir),
        "data": str(heldout_text),
        "empty": str(tmp_path / "empty.txt"),
        "tmp": str(tmp_path),
    }
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recyclegpt-eval: error:") and "\n" not in err
    assert message in err


@pytest.mark.slow
def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "recyclegpt.eval.cli", "quality", "--model", str(tmp_path / "nope"), "--data", "x.txt"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_samples_prints_each_decoding_mode(tiny_model_dir, capsys):
    assert main(["samples", "--model", str(tiny_model_dir), "--prompt", "Once upon", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    for decoding in ("standard", "alternating", "speculative"):
        assert f"### {decoding}:" in out
    assert out.count("Once upon") >= 3
