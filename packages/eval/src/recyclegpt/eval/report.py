"""Result files: JSON, a Markdown table and (speed) a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def quality_markdown(result: dict[str, Any]) -> str:
    summary = _table(
        ["metric", "value"],
        [
            ["base perplexity", result["base_perplexity"]],
            ["module perplexity", result["module_perplexity"]],
            ["alternating perplexity", result["alternating_perplexity"]],
            ["base top-1 accuracy", result["base_accuracy"]],
            ["module top-1 accuracy", result["module_accuracy"]],
            ["module/base agreement", result["agreement"]],
            ["alternating = standard (generated tokens)", result["generation"]["identical_fraction"]],
            ["identical prefix (mean tokens)", result["generation"]["mean_identical_prefix"]],
        ],
    )
    depths = _table(
        ["draft depth", "agreement with base", "module accuracy"],
        [[d, a, result["module_accuracy_by_depth"][d]] for d, a in result["agreement_by_depth"].items()],
    )
    return (
        f"## Quality: {result['model']} on {result['data']} ({result['dtype']}, {result['device']}, {result['tokens']} tokens, "
        f"{result['blocks']} blocks of {result['block_length']}; {result.get('hardware', 'hardware not recorded')})\n\n{summary}\n\n{depths}\n"
    )


def speed_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, figures) for every method and draft length, in table order."""
    rows = [(name, result[name]) for name in ("transformers", "standard", "alternating")]
    rows += [(f"speculative g={g}", e) for g, e in result["speculative"]["by_draft_length"].items()]
    if "adaptive" in result["speculative"]:
        rows.append(("speculative adaptive (g<=6)", result["speculative"]["adaptive"]))
    if "tree" in result["speculative"]:
        rows.append(("speculative tree (depth<=6)", result["speculative"]["tree"]))
    return rows


def _quantized(result: dict[str, Any]) -> str:
    return f", {result['quantize']}" if result.get("quantize", "none") != "none" else ""


def speed_markdown(result: dict[str, Any]) -> str:
    table = _table(
        ["method", "tokens/s", "speedup", "full calls/token", "accepted/verify", "predicted", "= standard"],
        [
            [
                label,
                e["tokens_per_s"],
                e["speedup"],
                e["full_calls_per_token"],
                e.get("accepted_per_verify"),
                e.get("predicted_speedup"),
                e["identical_to_standard"],
            ]
            for label, e in speed_rows(result)
        ],
    )
    cost = result["step_cost"]
    spec = result["speculative"]
    return (
        f"## Speed: {result['model']} ({result['dtype']}{_quantized(result)}, {result['device']}, {result['prompts']} {'chat ' if result.get('chat') else ''}prompts, "
        f"{result['max_new_tokens']} new tokens, median of {result['repeats']} repeats; {result.get('hardware', 'hardware not recorded')})\n\n{table}\n\n"
        f"c = module step / full step = {cost['module_step_ms']:.3f} ms / {cost['base_step_ms']:.3f} ms = "
        f"{cost['c']:.3f}; alternating bound 2/(1+c) = {cost['alternating_bound']:.2f}x. "
        f"Best draft length {spec['best_draft_length']} ({spec['speedup']:.2f}x)"
        + (f", adaptive {spec['adaptive']['vs_best_fixed']:.2f}x of it" if "adaptive" in spec else "")
        + (f", tree {spec['tree']['vs_best_fixed']:.2f}x of it" if "tree" in spec else "")
        + "; "
        f"speculative output identical to standard: {_fmt(spec['identical_to_standard'])}"
        f"{_equality_note(spec, result.get('quantize', 'none') != 'none')}.\n"
    )


def _equality_note(spec: dict[str, Any], quantized: bool = False) -> str:
    """In bf16 or quantized, say whether differences were only rounding ties and what the exact fp32 check found."""
    if "identical_to_standard_fp32" not in spec:
        return ""
    ties = " (differences are bf16 logit ties only)" if spec.get("mismatches") and spec["identical_up_to_ties"] else ""
    weights = " on the unquantized weights" if quantized else ""
    return f"{ties}; exact check in fp32{weights}: {_fmt(spec['identical_to_standard_fp32'])}"


def speed_chart(result: dict[str, Any], path: Path) -> None:
    """Tokens/s by method (left) and speculative acceptance by draft length (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speed_rows(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.bar([label.replace("speculative ", "spec ") for label, _ in rows], [e["tokens_per_s"] for _, e in rows])
    left.set_ylabel("tokens/s (median)")
    left.set_title("Decoding speed")
    left.tick_params(axis="x", rotation=45)
    by_length = result["speculative"]["by_draft_length"]
    lengths = [int(g) for g in by_length]
    right.plot(lengths, [e["accepted_per_verify"] for e in by_length.values()], marker="o", label="accepted / verify")
    right.plot(lengths, [e["acceptance_rate"] for e in by_length.values()], marker="s", label="acceptance rate")
    right.set_ylim(bottom=0)
    right.set_xlabel("draft length")
    right.set_title("Speculative acceptance")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
