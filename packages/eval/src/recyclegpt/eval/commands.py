"""The two evaluations end to end: load, measure, write JSON/Markdown/PNG, log to MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recyclegpt.core.fastpath import decoding_setup, prepare_for_decoding
from recyclegpt.core.precision import dtype_name, hardware_summary
from recyclegpt.core.profiling import measure_step_cost, timed
from recyclegpt.core.quantize import rounds_to_bf16
from recyclegpt.eval import data, quality, report, speed
from recyclegpt.eval.errors import EvalError
from recyclegpt.eval.tracking import log_to_mlflow


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _device_name(model: torch.nn.Module) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _save(
    result: dict[str, Any],
    markdown: str,
    json_path: str,
    mlflow_experiment: str | None,
    params: dict[str, Any],
    chart: bool = False,
) -> Path:
    """Write the JSON, the Markdown (printed too) and the chart; log them to MLflow if asked."""
    json_file = Path(json_path)
    report.write_json(result, json_file)
    md_file = json_file.with_suffix(".md")
    md_file.write_text(markdown)
    files = [json_file, md_file]
    if chart:
        png_file = json_file.with_suffix(".png")
        report.speed_chart(result, png_file)
        files.append(png_file)
    print(markdown)
    if mlflow_experiment:
        run_id = log_to_mlflow(mlflow_experiment, result["command"], params, result, files)
        print(f"logged to MLflow experiment {mlflow_experiment!r}, run {run_id}")
    return json_file


def run_quality(
    model: str,
    data_file: str,
    max_tokens: int = 16384,
    batch_size: int = 8,
    max_depth: int = 4,
    num_prompts: int = 8,
    prompt_tokens: int = 32,
    max_new_tokens: int = 32,
    dtype: str = "auto",
    quantize: str = "none",
    json_path: str = "artifacts/eval/quality.json",
    mlflow_experiment: str | None = None,
) -> dict[str, Any]:
    """Teacher-forced quality on held-out text, plus alternating-vs-standard agreement of generations."""
    _require_positive(
        max_tokens=max_tokens,
        batch_size=batch_size,
        max_depth=max_depth,
        num_prompts=num_prompts,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
    )
    text = data.read_text(data_file)
    net = data.load_model(model, dtype, quantize)
    dtype = dtype_name(net.model.norm.weight.dtype)  # what 'auto' resolved to
    ids = data.tokenize(net.tokenizer, text, net.config.vocab_size)
    blocks = data.token_blocks(ids, net.config.max_seq_len, max_tokens)
    prompts = data.prompts_from_ids(ids[:max_tokens], num_prompts, prompt_tokens)
    data.check_fits(prompts, max_new_tokens, net.config.max_seq_len)
    result: dict[str, Any] = {
        "command": "quality",
        "model": model,
        "data": data_file,
        "dtype": dtype,
        "quantize": quantize,
        "device": _device_name(net),
        "hardware": hardware_summary(net.lm_head.weight.device),
        "tokens": blocks.numel(),
        "blocks": blocks.shape[0],
        "block_length": blocks.shape[1],
        "vocab_size": net.config.vocab_size,
        **quality.teacher_forced_quality(net, blocks, batch_size, max_depth),
        "generation": {"prompt_tokens": prompt_tokens, **quality.generation_agreement(net, prompts, max_new_tokens)},
    }
    params = {
        "model": model,
        "data": data_file,
        "max_tokens": max_tokens,
        "max_depth": max_depth,
        "num_prompts": num_prompts,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "dtype": dtype,
        "quantize": quantize,
        "device": result["device"],
        "hardware": result["hardware"],
    }
    _save(result, report.quality_markdown(result), json_path, mlflow_experiment, params)
    return result


def run_speed(
    model: str,
    prompts_file: str | None = None,
    data_file: str | None = None,
    num_prompts: int = 8,
    prompt_tokens: int = 32,
    max_new_tokens: int = 64,
    repeats: int = 3,
    chat: bool = False,
    dtype: str = "auto",
    quantize: str = "none",
    json_path: str = "artifacts/eval/speed.json",
    reference: str | None = None,
    mlflow_experiment: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Benchmark every decoding method; the result and a list of correctness failures (empty: all good)."""
    if (prompts_file is None) == (data_file is None):
        raise EvalError("give exactly one of --prompts FILE or --data FILE")
    if chat and prompts_file is None:
        raise EvalError("--chat reads user messages from --prompts FILE (one a line)")
    _require_positive(
        num_prompts=num_prompts, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, repeats=repeats
    )
    text = data.read_text(data_file) if data_file else None  # read before the (slow) model load
    expected = _read_reference(reference) if reference else None
    net = data.load_model(model, dtype, quantize, fuse=True)  # the fast path decodes, quantized or not
    dtype = dtype_name(net.model.norm.weight.dtype)  # what 'auto' resolved to
    quantize = decoding_setup(net).get("quantize", "none")  # a directory saved quantized stays so
    if prompts_file:
        prompts = data.prompts_from_file(prompts_file, net.tokenizer, net.config.vocab_size, chat=chat)
    else:
        ids = data.tokenize(net.tokenizer, text, net.config.vocab_size)
        prompts = data.prompts_from_ids(ids, num_prompts, prompt_tokens)
    data.check_fits(prompts, max_new_tokens, net.config.max_seq_len)

    unfused = data.load_model(model, dtype)  # transformers' layout and weights, for its generate
    decoders = speed.Decoders(net, max_new_tokens, peer_model=unfused)
    del unfused
    rates, outputs = speed.run_benchmark(decoders, speed.method_names(), prompts, repeats)
    step_cost = measure_step_cost(net, prompts[0])
    standard_outputs = [d.new_tokens[0].tolist() for d in outputs["standard"]]
    result: dict[str, Any] = {
        "command": "speed",
        "model": model,
        "source": prompts_file or data_file,
        "chat": chat,
        "device": _device_name(net),
        "hardware": hardware_summary(net.lm_head.weight.device),
        "dtype": dtype,
        "quantize": quantize,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        **speed.summarize(rates, outputs, step_cost),
        "outputs": {"prompts": [p[0].tolist() for p in prompts], "standard": standard_outputs},
    }
    failures = []
    # Below fp32, or where torch's int8/int4 CPU kernels take and give bf16, a broken logit tie is rounding.
    rounds_like_bf16 = dtype != "fp32" or rounds_to_bf16(quantize)
    for method, bad in speed.speculative_mismatches(outputs).items():
        draft = method.split("@")[1]
        draft_length = int(draft) if draft.isdigit() else draft
        for i in bad:
            where = speed.divergence(net, prompts[i], outputs["standard"][i].new_tokens, outputs[method][i].new_tokens)
            result["speculative"].setdefault("mismatches", []).append(
                {"draft_length": draft_length, "prompt": i + 1, **where}
            )
            if where["numerical_tie"] and rounds_like_bf16:
                continue  # a bf16 tie broken the other way; the fp32 check below decides
            tie = " (a numerical tie of the base's logits)" if where["numerical_tie"] else ""
            failures.append(
                f"speculative (draft length {draft_length}) differs from standard on prompt {i + 1} at new token "
                f"{where['new_token_index']}: tokens {where['tokens']}, base logit gap {where['logit_gap']:.3g}{tie}"
            )
    if rounds_like_bf16:
        # Losslessness is a property of the algorithm: check it exactly in fp32 on the same prompts,
        # on the unquantized weights (those quantized kernels compute in bf16) in the fast path's layout.
        exact = prepare_for_decoding(data.load_model(model, "fp32"))
        if decoding_setup(exact).get("quantize"):
            result["speculative"]["exact_check"] = "skipped: the directory holds quantized weights only"
        else:
            fp32_bad = speed.exact_equality_failures(exact, prompts, max_new_tokens)
            result["speculative"]["identical_to_standard_fp32"] = not fp32_bad
            failures += fp32_bad
        del exact
    result["speculative"]["identical_to_standard"] = not failures and result["speculative"]["identical_to_standard"]
    result["speculative"]["identical_up_to_ties"] = not failures
    if expected is not None:
        failures += _check_reference(expected, result["outputs"], reference)
    params = {
        "model": model,
        "source": prompts_file or data_file,
        "chat": chat,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "dtype": dtype,
        "quantize": quantize,
        "device": result["device"],
        "hardware": result["hardware"],
    }
    _save(result, report.speed_markdown(result), json_path, mlflow_experiment, params, chart=True)
    return result, failures


def _read_reference(path: str) -> dict[str, list[list[int]]]:
    """The ``outputs`` of an earlier ``speed`` JSON: its prompts and standard greedy tokens."""
    try:
        outputs = json.loads(Path(path).read_text())["outputs"]
        return {"prompts": outputs["prompts"], "standard": outputs["standard"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvalError(f"--reference {path} is not a speed JSON with outputs: {error}") from error


def _check_reference(expected: dict[str, list[list[int]]], actual: dict[str, list[list[int]]], path: str) -> list[str]:
    if expected["prompts"] != actual["prompts"]:
        return [f"--reference {path} was measured on other prompts"]
    bad = speed.compare_outputs(
        [torch.tensor(t) for t in expected["standard"]], [torch.tensor(t) for t in actual["standard"]]
    )
    if bad:
        return [f"standard output differs from --reference {path} on prompt(s) {', '.join(str(i + 1) for i in bad)}"]
    return []


SAMPLE_METHODS = (("standard", 1), ("alternating", 1), ("speculative", 4))


def run_samples(
    model: str, prompt: str, max_new_tokens: int = 48, dtype: str = "auto", quantize: str = "none"
) -> list[dict[str, Any]]:
    """Greedy continuations of ``prompt`` by each decoder, printed with what each cost."""
    _require_positive(max_new_tokens=max_new_tokens)
    if not prompt.strip():
        raise EvalError("--prompt is empty")
    net = data.load_model(model, dtype, quantize)
    dtype = dtype_name(net.model.norm.weight.dtype)  # what 'auto' resolved to
    ids = data.tokenize(net.tokenizer, prompt, net.config.vocab_size).unsqueeze(0)
    data.check_fits([ids], max_new_tokens, net.config.max_seq_len)
    samples = []
    for decoding, draft_length in SAMPLE_METHODS:
        net.generate(ids, 4, decoding=decoding, draft_length=draft_length)  # warm-up
        out, seconds = timed(
            lambda d=decoding, g=draft_length: net.generate(ids, max_new_tokens, decoding=d, draft_length=g)
        )
        text = net.tokenizer.decode(out.new_tokens[0].tolist())
        samples.append(
            {
                "decoding": decoding,
                "text": text,
                "tokens_per_s": out.new_tokens.shape[1] / seconds,
                "full_model_calls": out.full_model_calls,
                "module_calls": out.module_calls,
            }
        )
    print(
        f"## Samples ({dtype}; {hardware_summary(net.lm_head.weight.device)}; greedy, {max_new_tokens} new tokens) after: {prompt!r}\n"
    )
    for sample in samples:
        print(
            f"### {sample['decoding']}: {sample['tokens_per_s']:.0f} tokens/s, "
            f"{sample['full_model_calls']} full-model calls, {sample['module_calls']} module calls"
        )
        print(f"```\n{prompt}{sample['text']}\n```\n")
    return samples
