import json

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.profiling import measure_step_cost
from recyclegpt.eval import speed


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return RecycleGPT.from_pretrained(str(tiny_model_dir))


def test_compare_outputs_finds_a_planted_mismatch():
    reference = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]]), torch.tensor([[7, 8, 9]])]
    assert speed.compare_outputs(reference, [t.clone() for t in reference]) == []
    planted = [t.clone() for t in reference]
    planted[1][0, 2] = 0
    assert speed.compare_outputs(reference, planted) == [1]
    shorter = [reference[0], reference[1][:, :2], reference[2]]
    assert speed.compare_outputs(reference, shorter) == [1]
    with pytest.raises(ValueError, match="2 candidates"):
        speed.compare_outputs(reference, reference[:2])


def test_speculative_mismatches_report_draft_length_and_prompt():
    good = [speed.Decoded(torch.tensor([[1, 2]]), 2), speed.Decoded(torch.tensor([[3, 4]]), 2)]
    bad = [good[0], speed.Decoded(torch.tensor([[3, 5]]), 1)]
    outputs = {"standard": good, "speculative@1": good, "speculative@2": bad}
    assert speed.speculative_mismatches(outputs) == {"speculative@2": [1]}


def test_every_decoder_matches_standard_where_it_should(model):
    decoders = speed.Decoders(model, max_new_tokens=12)
    text = "The old fisherman repaired the wooden boat before dawn. A grey cat"
    prompt = torch.tensor([model.tokenizer(text)["input_ids"]])
    standard = decoders("standard", prompt)
    assert standard.new_tokens.shape == (1, 12) and standard.full_model_calls == 12
    peer = decoders("transformers", prompt)  # LlamaForCausalLM on the same weights
    assert torch.equal(peer.new_tokens, standard.new_tokens) and peer.full_model_calls == 12
    accepted = 0
    for g in (1, 3):
        spec = decoders(f"speculative@{g}", prompt)
        assert torch.equal(spec.new_tokens, standard.new_tokens)
        assert spec.drafted_tokens > 0
        accepted += spec.accepted_tokens
    assert accepted > 0  # equality is checked with accepted drafts, not only rejected ones
    assert decoders("alternating", prompt).full_model_calls == 6  # one full call per two tokens


def test_step_cost(model):
    prompt = torch.randint(0, model.config.vocab_size, (1, 12))
    cost = measure_step_cost(model, prompt, iterations=3, inner=2)
    assert cost["base_step_ms"] > 0 and cost["module_step_ms"] > 0 and cost["base_2_tokens_ms"] > 0
    assert cost["c"] == pytest.approx(cost["module_step_ms"] / cost["base_step_ms"])
    assert cost["alternating_bound"] == pytest.approx(2 / (1 + cost["c"]))


def test_divergence_locates_the_first_difference_and_its_logit_gap(model):
    prompt = torch.tensor([model.tokenizer("A grey cat watched")["input_ids"]])
    expected = model.generate(prompt, 5).new_tokens
    with torch.inference_mode():
        logits = model(torch.cat((prompt, expected[:, :2]), dim=1))[0, -1]
    runner_up = int(logits.topk(2).indices[1])
    planted = expected.clone()
    planted[0, 2] = runner_up
    where = speed.divergence(model, prompt, expected, planted)
    assert where["new_token_index"] == 2 and where["tokens"] == [int(expected[0, 2]), runner_up]
    assert where["logit_gap"] == pytest.approx(float(logits.max() - logits[runner_up]), abs=1e-5)
    assert where["logit_gap"] > 1e-3 and not where["numerical_tie"]


def test_exact_equality_check_passes_in_fp32_and_names_failures(model):
    prompts = [torch.tensor([model.tokenizer("A grey cat watched")["input_ids"]])]
    assert speed.exact_equality_failures(model, prompts, 6) == []


def test_bf16_speed_gate_checks_losslessness_in_fp32(tiny_model_dir, heldout_text, tmp_path):
    from recyclegpt.eval.cli import main

    argv = ["speed", "--model", str(tiny_model_dir), "--data", str(heldout_text), "--dtype", "bf16"]
    fast = ["--num-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "6", "--repeats", "1"]
    code = main([*argv, *fast, "--json", str(tmp_path / "s.json")])
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["speculative"]["identical_to_standard_fp32"] is True
    assert code == (0 if result["speculative"]["identical_up_to_ties"] else 1)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_speed_reports_adaptive_and_tree_speculative_and_checks_losslessness(
    tiny_model_dir, heldout_text, tmp_path, quantize
):
    from recyclegpt.core.quantize import rounds_to_bf16
    from recyclegpt.eval.cli import main

    argv = ["speed", "--model", str(tiny_model_dir), "--data", str(heldout_text), "--quantize", quantize]
    fast = ["--num-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "6", "--repeats", "1"]
    code = main([*argv, *fast, "--dtype", "fp32", "--json", str(tmp_path / "s.json")])
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["quantize"] == quantize and result["dtype"] == "fp32"
    assert result["speculative"]["adaptive"]["vs_best_fixed"] > 0
    assert result["speculative"]["tree"]["vs_best_fixed"] > 0
    markdown = (tmp_path / "s.md").read_text()
    assert "speculative adaptive" in markdown and "speculative tree" in markdown
    if rounds_to_bf16(quantize):
        # torch's kernels compute in bf16 even in an fp32 model: exactness is checked on the fp32 weights.
        assert result["speculative"]["identical_to_standard_fp32"] is True
        assert code == 0 and result["speculative"]["identical_up_to_ties"]  # any difference is a bf16 tie
        assert "exact check in fp32 on the unquantized weights: yes" in markdown
    else:
        # The packed AVX-512 int8 kernel keeps fp32 activations: speculative must equal standard exactly.
        assert code == 0 and result["speculative"]["identical_to_standard"] is True
        assert "identical_to_standard_fp32" not in result["speculative"]


def test_fp16_speed_in_fp32_must_equal_standard_exactly(tiny_model_dir, heldout_text, tmp_path):
    from recyclegpt.core import quant_kernels
    from recyclegpt.core.quantize import rounds_to_bf16
    from recyclegpt.eval.cli import main

    torchs = not quant_kernels.available()  # torch's int8 kernel rounds activations to bf16; int4 always runs torch's
    assert [rounds_to_bf16(q) for q in ("int8", "int4", "fp16", "none", None)] == [torchs, True, False, False, False]
    argv = ["speed", "--model", str(tiny_model_dir), "--data", str(heldout_text), "--quantize", "fp16"]
    fast = ["--num-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "6", "--repeats", "1"]
    code = main([*argv, *fast, "--dtype", "fp32", "--json", str(tmp_path / "s.json")])
    result = json.loads((tmp_path / "s.json").read_text())
    # fp16 weights compute in fp32: no bf16 tie excuses a difference, so no fp32 re-check is needed
    assert code == 0 and result["speculative"]["identical_to_standard"] is True
    assert "identical_to_standard_fp32" not in result["speculative"]


def test_unknown_quantize_is_a_one_line_error(tiny_model_dir, heldout_text, capsys):
    from recyclegpt.eval.cli import main

    code = main(["quality", "--model", str(tiny_model_dir), "--data", str(heldout_text), "--quantize", "int3"])
    assert code == 2 and "int3" in capsys.readouterr().err


def test_quantize_choices_match_core():
    from recyclegpt.core.quantize import QUANTIZE_CHOICES, QUANTIZE_HELP
    from recyclegpt.eval import cli

    assert cli.QUANTIZE_CHOICES == QUANTIZE_CHOICES  # the CLI keeps copies so that --help stays fast
    assert cli.QUANTIZE_HELP == QUANTIZE_HELP
