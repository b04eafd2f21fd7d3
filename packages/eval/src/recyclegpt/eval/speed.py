"""Decoding speed of transformers' generate, standard, alternating and speculative decoding.

All methods run in one process on the same prompts, interleaved: each repeat runs every method
once over every prompt (round robin), so slow phases of a noisy machine hit all methods alike.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from typing import Any

import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.fastpath import decoding_setup
from recyclegpt.core.peer import peer_generate, transformers_peer
from recyclegpt.core.profiling import interleaved_items
from recyclegpt.core.quantize import rounds_to_bf16
from recyclegpt.core.speculation import forget_acceptance, own_acceptance
from recyclegpt.eval.peer import CallCounter

DRAFT_LENGTHS = tuple(range(1, 7))


@dataclass
class Decoded:
    """New tokens [1, N] of one prompt and what they cost."""

    new_tokens: torch.Tensor
    full_model_calls: int
    accepted_tokens: int = 0
    drafted_tokens: int = 0
    module_calls: int = 0


ADAPTIVE = "auto"  # speculative@auto: step-cost-aware drafting, up to max(DRAFT_LENGTHS) tokens
TREE = "tree"  # speculative@tree: draft trees (core.draft_tree), depth up to max(DRAFT_LENGTHS)
POLICIES = {ADAPTIVE: "adaptive", TREE: "tree"}  # the speculative methods that are not a fixed draft length


def method_names(draft_lengths: tuple[int, ...] = DRAFT_LENGTHS) -> list[str]:
    return [
        "transformers",
        "standard",
        "alternating",
        *(f"speculative@{g}" for g in draft_lengths),
        f"speculative@{ADAPTIVE}",
        f"speculative@{TREE}",
    ]


class Decoders:
    """Runs one method on one prompt: the transformers peer or one of the core decoders."""

    def __init__(self, model: RecycleGPT, max_new_tokens: int, peer_model: RecycleGPT | None = None) -> None:
        """``peer_model``: the unquantized weights for transformers (default: ``model`` itself)."""
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.peer = transformers_peer(peer_model if peer_model is not None else model)
        self.peer_calls = CallCounter(self.peer)
        self.acceptance: dict[str, object] = {}  # what each policy's calls learned, kept apart

    def __call__(self, method: str, prompt: torch.Tensor) -> Decoded:
        if method == "transformers":
            before = self.peer_calls.calls
            sequences = peer_generate(self.peer, prompt, self.max_new_tokens)
            return Decoded(sequences[:, prompt.shape[1] :], self.peer_calls.calls - before)
        decoding, _, draft = method.partition("@")
        if draft in POLICIES:
            with own_acceptance(self.model, self.acceptance, draft):
                out = self.model.generate(
                    prompt,
                    self.max_new_tokens,
                    decoding=decoding,
                    draft_length=max(DRAFT_LENGTHS),
                    draft_policy=POLICIES[draft],
                )
        else:
            out = self.model.generate(
                prompt, self.max_new_tokens, decoding=decoding, draft_length=int(draft or 4), draft_policy="fixed"
            )
        return Decoded(out.new_tokens, out.full_model_calls, out.accepted_tokens, out.drafted_tokens, out.module_calls)


def compare_outputs(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> list[int]:
    """Indices of the prompts whose candidate tokens differ from the reference (length included)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidates")
    pairs = enumerate(zip(reference, candidate, strict=True))
    return [i for i, (ref, cand) in pairs if ref.shape != cand.shape or not torch.equal(ref.cpu(), cand.cpu())]


def run_benchmark(
    decoders: Decoders, methods: list[str], prompts: list[torch.Tensor], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[Decoded]]]:
    """Tokens/s of every method in every repeat, and each method's outputs (from the first repeat).

    One warm-up pass (first prompt, every method) runs before anything is timed; the loop is
    core's :func:`recyclegpt.core.profiling.interleaved_items`: prompt by prompt, every method on
    the prompt before the next one, so all methods see the same phase of a noisy machine.
    """
    samples = interleaved_items(
        {method: (lambda prompt, method=method: decoders(method, prompt)) for method in methods},
        prompts,
        repeats,
        on_round=lambda i: print(f"speed: repeat {i + 1}/{repeats} done", file=sys.stderr, flush=True),
    )
    rates = {m: [sum(d.new_tokens.numel() for d in decoded) / s for decoded, s in samples[m]] for m in methods}
    outputs = {m: samples[m][0][0] for m in methods}
    return rates, outputs


def summarize(
    rates: dict[str, list[float]],
    outputs: dict[str, list[Decoded]],
    step_cost: dict[str, float],
) -> dict[str, Any]:
    """Per-method figures; ``speculative`` reports its best draft length and keeps every length."""
    standard_rate = statistics.median(rates["standard"])
    reference = [d.new_tokens for d in outputs["standard"]]
    c = step_cost["c"]
    per_method: dict[str, dict[str, Any]] = {}
    for method, method_rates in rates.items():
        decoded = outputs[method]
        tokens = sum(d.new_tokens.numel() for d in decoded)
        calls = sum(d.full_model_calls for d in decoded)
        rate = statistics.median(method_rates)
        entry: dict[str, Any] = {
            "tokens_per_s": rate,
            "speedup": rate / standard_rate,
            "full_calls_per_token": calls / tokens,
            "identical_to_standard": not compare_outputs(reference, [d.new_tokens for d in decoded]),
        }
        if method.startswith("speculative@"):
            verifications = calls - len(decoded)  # every prompt's first call is the prefill
            drafted = sum(d.drafted_tokens for d in decoded)
            accepted = sum(d.accepted_tokens for d in decoded)
            entry["accepted_per_verify"] = accepted / verifications if verifications else 0.0
            entry["acceptance_rate"] = accepted / drafted if drafted else 0.0
            # Tokens per full call over what a full call cost with the module steps it needed (as many
            # as the decoder made: g per cycle when fixed, as many as it chose when adaptive).
            module_steps = sum(d.module_calls for d in decoded) / calls
            entry["predicted_speedup"] = (tokens / calls) / (1 + module_steps * c)
        per_method[method] = entry
    per_method["alternating"]["predicted_speedup"] = step_cost["alternating_bound"]
    by_length = {
        m.split("@")[1]: e
        for m, e in per_method.items()
        if m.startswith("speculative@") and m.split("@")[1] not in POLICIES
    }
    best = max(by_length, key=lambda g: by_length[g]["tokens_per_s"])
    speculative = {
        **by_length[best],
        "best_draft_length": int(best),
        "identical_to_standard": all(e["identical_to_standard"] for e in by_length.values()),
        "by_draft_length": by_length,
    }
    for name, policy in POLICIES.items():  # speculative["adaptive"], speculative["tree"]
        entry = per_method.get(f"speculative@{name}")
        if entry is not None:
            speculative[policy] = {**entry, "vs_best_fixed": entry["tokens_per_s"] / by_length[best]["tokens_per_s"]}
            speculative["identical_to_standard"] &= entry["identical_to_standard"]
    return {
        "transformers": per_method["transformers"],
        "standard": per_method["standard"],
        "alternating": per_method["alternating"],
        "speculative": speculative,
        "step_cost": step_cost,
    }


@torch.inference_mode()
def divergence(model: RecycleGPT, prompt: torch.Tensor, expected: torch.Tensor, actual: torch.Tensor) -> dict[str, Any]:
    """Where ``actual`` [1, N] first leaves ``expected`` [1, N], and the base's logit gap there.

    A gap near zero (within the dtype's rounding) is a numerical tie that a different
    computation order broke the other way, not a decoding bug. torch's int8 and int4 CPU kernels
    take and give bf16 whatever the model's dtype, so bf16's rounding applies where they run
    (:func:`recyclegpt.core.quantize.rounds_to_bf16`; the packed int8 kernel and fp16 weights compute
    in fp32: the model's dtype applies).
    """
    index = int((expected.cpu() != actual.cpu())[0].nonzero()[0])
    device = model.model.norm.weight.device
    prefix = torch.cat((prompt.to(device), expected[:, :index].to(device)), dim=1)
    logits = model(prefix)[0, -1].float()
    want, got = int(expected[0, index]), int(actual[0, index])
    gap = float(logits[want] - logits[got])
    bf16_kernels = rounds_to_bf16(decoding_setup(model).get("quantize")) and device.type == "cpu"
    dtype = torch.bfloat16 if bf16_kernels else model.model.norm.weight.dtype
    tolerance = 4 * torch.finfo(dtype).eps * float(logits.abs().max())
    return {"new_token_index": index, "tokens": [want, got], "logit_gap": gap, "numerical_tie": abs(gap) <= tolerance}


def speculative_mismatches(outputs: dict[str, list[Decoded]]) -> dict[str, list[int]]:
    """For each draft length, the prompts where speculative greedy output differs from standard."""
    reference = [d.new_tokens for d in outputs["standard"]]
    found = {}
    for method, decoded in outputs.items():
        if method.startswith("speculative@"):
            bad = compare_outputs(reference, [d.new_tokens for d in decoded])
            if bad:
                found[method] = bad
    return found


def exact_equality_failures(model: RecycleGPT, prompts: list[torch.Tensor], max_new_tokens: int) -> list[str]:
    """Speculative greedy vs standard at every draft length, on ``model`` as loaded (run it in fp32)."""
    failures = []
    for i, prompt in enumerate(prompts):
        reference = model.generate(prompt, max_new_tokens).new_tokens
        for g in (*DRAFT_LENGTHS, *POLICIES):
            policy = POLICIES.get(g, "fixed")
            length = max(DRAFT_LENGTHS) if g in POLICIES else g
            forget_acceptance(model)  # each adaptive run drafts from the prior, as a first call would
            out = model.generate(
                prompt, max_new_tokens, decoding="speculative", draft_length=length, draft_policy=policy
            ).new_tokens
            if not torch.equal(out, reference):
                failures.append(f"speculative (draft length {g}) differs from standard in fp32 on prompt {i + 1}")
    return failures
