"""How far the speculative decoder drafts: from measured step costs and the acceptance it sees.

A cycle that drafts d tokens costs one (d+1)-token full-model step plus d drafts (the first dearer:
it also catches the module up on the tokens the last verification accepted) and yields
1 + a1 + a1*a2 + ... + a1*...*ad tokens on average, where a_j is the chance that draft j is
accepted once drafts 1..j-1 were. :class:`DraftPlanner` keeps an exponential moving average of
each a_j, measures the step costs once per model, dtype, device and thread count and then learns
them from the steps decoding takes (:class:`StepCosts`), and picks the d (0 = a plain standard
step) with the most tokens per millisecond. Once drafting pays, how far
each cycle drafts follows the module's confidence (EAGLE-2's observation: a draft module's
probabilities are calibrated; on SmolLM2, drafts given 0.5-0.7 were accepted 74% of the time, 0.9+
98%): it drafts on, up to ``draft_length``, while the product of its drafts' (calibrated) probabilities pays for
another module step and verified row, drops a draft that does not pay for its row, and drops any
greedy draft below ``CONFIDENCE_FLOOR``. A module's probabilities are not calibrated everywhere (the
demo's drafts given 0.05-0.1 are accepted 44% of the time), so the planner learns, from every
verified draft, how often drafts of each confidence are accepted (:class:`ConfidenceCalibration`),
and chains those rates instead of the raw probabilities. When drafting does not
pay it probes with one draft at exponentially growing intervals, so a module that starts agreeing
is noticed again; an estimate of a deeper a_j that cycles stop testing drifts back toward the prior
(``UNTESTED_DRIFT``), so that depth is tried again. ``draft_length`` stays the upper bound. Costs are
cached on the model, and so is what a call learned of acceptance: the next call starts from both (a
server's steady state, where a module that never agrees costs a probe now and then, not a
relearning per request). A seeded sampling call starts from the prior and the costs as measured
instead, and learns nothing, so that it always repeats itself. None of this changes
the output in fp32: greedy speculative equals standard whatever the depth, and sampling follows the
full model. In bf16, or on CPU kernels that round to bf16 (int4; int8 without AVX-512), the depth
decides how an exact logit tie rounds, so a greedy call's tokens at such a tie can depend on the
calls before it and on how fast the machine ran its steps.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from recyclegpt.core.model import RecycleGPT
from recyclegpt.core.profiling import measure_step_costs

DRAFT_POLICIES = ("adaptive", "fixed", "tree")
MAX_PROBE_INTERVAL = 256  # cycles; a probe re-reads every token since the last one, so it is not cheap
COST_PROMPT_LENGTH = 32
ACCEPTANCE_KEY = "_speculation_acceptance"  # where a model keeps what its calls learned
COSTS_KEY = "_speculation_costs"  # where a model keeps its measured step costs
# A draft whose module probability is below this is not verified. Measured on the demo model (1,024
# tokens; 9.6% of its module's top probabilities fall below 0.05): 0.05 ran at 0.93x of the best fixed
# draft length, 0.02 at 0.97x; a random module's near-uniform drafts (~1/V) stay below either.
# Greedy drafts only: a sampled draft is accepted with chance min(1, p/q), so a low q says little
# (the 10-layer demo at temperature 0.7: adaptive 1.56x standard without the floor, 1.36x with it).
CONFIDENCE_FLOOR = 0.02
# Per cycle, an estimate of a_j (j >= 2) that the cycle did not test moves this far back toward the
# prior, so a depth judged bad on a few misses is tried again later. Without it, a deterministic
# prompt that missed at depth 2 early kept SmolLM2 (int4) at one draft a cycle for every later call:
# 1.78 tokens per full call against 2.46 in the first call.
UNTESTED_DRIFT = 0.05


@dataclass
class StepCosts:
    """Milliseconds of a k-token full-model step (index k, k >= 1) and of a module step.

    ``module_ms`` is a draft chained onto the one before it; ``first_module_ms`` the first draft of a
    cycle, which also catches the module up on the tokens the last verification accepted and starts
    with caches the full-model step just filled with its own weights (default: ``module_ms``; timed
    in SmolLM2 decoding, bf16 + w8a8: ~0.8-1.0 ms against ~0.35-0.45 for a chained draft, where a
    one-off measurement gives ~1.0 for both).

    The costs start as measured (:func:`step_costs`) and, while ``learning``, follow what decoding
    observes (:meth:`observe_base`, :meth:`observe_module`). The measurement is a short loop before
    any decoding; decoding's own steps run with colder caches, longer contexts and whatever else the
    machine is doing (a shared VM's speed drifts by ~20% within a day), and a planner's choices are
    only as good as its costs. Full-model steps keep their measured shape (how a k-token step
    compares to a 1-token one) under one learned factor, the moving average of observed / measured
    over every width: a width observed only now and then would otherwise hold a cost from another
    phase of the machine than its neighbours'. Drafts learn their own times.
    """

    base_ms: list[float]  # base_ms[k] for k = 1..max; base_ms[0] unused
    module_ms: float
    first_module_ms: float | None = None
    learning: bool = True
    smoothing: float = 0.1  # weight of the newest observation in the moving averages

    def __post_init__(self) -> None:
        if self.first_module_ms is None:
            self.first_module_ms = self.module_ms
        for k in range(2, len(self.base_ms)):  # timing noise must not make more tokens look cheaper
            self.base_ms[k] = max(self.base_ms[k], self.base_ms[k - 1])
        self.measured = (list(self.base_ms), self.module_ms, self.first_module_ms)
        self.base_factor = 1.0  # observed / measured full-model step time
        self.counts: dict[str, int] = {}  # observations so far of "base", "first" and "module"

    @property
    def max_tokens(self) -> int:
        return len(self.base_ms) - 1

    def drafting_ms(self, drafts: int) -> float:
        """The module's share of a cycle that drafts ``drafts`` tokens in a chain."""
        return self.first_module_ms + (drafts - 1) * self.module_ms if drafts > 0 else 0.0

    def observe_base(self, tokens: int, ms: float) -> None:
        """A ``tokens``-token full-model step (LM head and verification included) took ``ms``."""
        if not self.learning or not 1 <= tokens <= self.max_tokens:
            return
        self._scale_base(self._average(self.base_factor, ms / self.measured[0][tokens], "base"))

    def observe_module(self, ms: float, first: bool) -> None:
        """A draft (module step and pick) took ``ms``; ``first``: the first of its cycle."""
        if not self.learning:
            return
        if first:
            self.first_module_ms = self._average(self.first_module_ms, ms, "first")
        else:
            self.module_ms = self._average(self.module_ms, ms, "module")

    def _average(self, current: float, observed: float, key: str) -> float:
        """``current`` moved toward ``observed``: the mean of the observations while they are few (the
        measurement counting as one), then a moving average. One observation counts at most as half
        or twice ``current``: a step that a page fault or another process held up must not swing it."""
        self.counts[key] = self.counts.get(key, 1) + 1
        bounded = min(max(observed, current / 2), current * 2)
        return current + max(self.smoothing, 1.0 / self.counts[key]) * (bounded - current)

    def inherit(self, learned: StepCosts) -> None:
        """Take over what decoding taught ``learned`` (costs measured before these, over fewer widths)."""
        self.counts = dict(learned.counts)
        self.module_ms, self.first_module_ms = learned.module_ms, learned.first_module_ms
        self._scale_base(learned.base_factor)

    def _scale_base(self, factor: float) -> None:
        """Full-model step costs: the measured ones times ``factor``."""
        self.base_factor = factor
        self.base_ms = [measured * factor for measured in self.measured[0]]

    def as_measured(self) -> StepCosts:
        """The costs as first measured, not learning (a seeded call's plan must repeat itself)."""
        base_ms, module_ms, first_module_ms = self.measured
        return StepCosts(list(base_ms), module_ms, first_module_ms, learning=False)


# Bins of module probability in which acceptance is learned (greedy drafts below CONFIDENCE_FLOOR are not verified).
CALIBRATION_EDGES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def _calibration_bins() -> list[tuple[float, float]]:
    return list(zip(CALIBRATION_EDGES, CALIBRATION_EDGES[1:], strict=False))


@dataclass
class ConfidenceCalibration:
    """How often a draft the module gave probability p is accepted, learned per bin of p.

    A bin starts at its midpoint (a calibrated module), counted as one observation, and moves to the
    running acceptance of its drafts (the mean while it has few, then a moving average). Measured on the
    demo model (held-out code, teacher-forced): drafts given 0.05-0.1 agree with the base 44% of the
    time, 0.1-0.2 62%, 0.2-0.3 72%; SmolLM2's module is close to calibrated.
    """

    smoothing: float = 0.1
    rates: list[float] = field(default_factory=lambda: [(lo + hi) / 2 for lo, hi in _calibration_bins()])
    counts: list[int] = field(default_factory=lambda: [1] * len(_calibration_bins()))

    @staticmethod
    def bin(probability: float) -> int:
        """The first bin whose upper edge exceeds ``probability`` (the last for 0.95 and above)."""
        return bisect.bisect_right(CALIBRATION_EDGES, probability, 1, len(CALIBRATION_EDGES) - 1) - 1

    def __call__(self, probability: float) -> float:
        """The learned chance that a draft given ``probability`` is accepted."""
        return self.rates[self.bin(probability)]

    def observe(self, probability: float, accepted: bool) -> None:
        index = self.bin(probability)
        self.counts[index] += 1
        weight = max(self.smoothing, 1.0 / self.counts[index])
        self.rates[index] += weight * (float(accepted) - self.rates[index])

    def copy(self) -> ConfidenceCalibration:
        return ConfidenceCalibration(self.smoothing, list(self.rates), list(self.counts))


@dataclass
class DraftPlanner:
    """Chooses each cycle's draft depth; learns acceptance by depth as decoding goes."""

    costs: StepCosts
    prior: float = 0.5  # acceptance assumed before anything was seen
    smoothing: float = 0.1  # weight of the newest observation in the moving averages
    acceptance: list[float] = field(default_factory=list)  # acceptance[j-1] = a_j
    observed: list[int] = field(default_factory=list)  # how often depth j was verified
    probe_interval: int = 1
    cycles_since_probe: int = 0
    probing: bool = False  # the last plan was a one-draft probe
    calibration: ConfidenceCalibration = field(default_factory=ConfidenceCalibration)

    @property
    def max_depth(self) -> int:
        return self.costs.max_tokens - 1

    def _a(self, depth: int) -> float:
        """a_depth (depth >= 1), as :meth:`_acceptances` gives it."""
        return self._acceptances(depth)[-1]

    def _update(self, depth: int, hit: float) -> None:
        self.acceptance[depth - 1] = (1 - self.smoothing) * self._a(depth) + self.smoothing * hit
        self.observed[depth - 1] += 1

    def _acceptances(self, depth: int) -> list[float]:
        """[a_1, ..., a_depth]: a depth never verified yet borrows the estimate of the depth before it.
        One pass for every depth (planning asks for every depth each cycle: one pass a depth cost ~20
        us a cycle, a share of a small model's)."""
        while len(self.acceptance) < depth:
            self.acceptance.append(self.prior)
            self.observed.append(0)
        found: list[float] = []
        for j in range(depth):
            found.append(self.acceptance[j] if j == 0 or self.observed[j] else found[-1])
        return found

    def rates(self, limit: int) -> list[float]:
        """Expected tokens per millisecond of a cycle that drafts 0, 1, ..., ``limit`` tokens."""
        base_ms, drafting_ms = self.costs.base_ms, self.costs.drafting_ms
        found, tokens, chain = [1.0 / base_ms[1]], 1.0, 1.0
        for depth, accepted in enumerate(self._acceptances(limit), start=1):
            chain *= accepted
            tokens += chain
            found.append(tokens / (base_ms[depth + 1] + drafting_ms(depth)))
        return found

    def plan(self, limit: int) -> int:
        """Draft depth for the next cycle, at most ``limit`` (0: a standard step). Drafting may go
        deeper while the module stays confident (:meth:`keep_drafting`), except on a probe."""
        limit = min(limit, self.max_depth)
        self.probing = False
        if limit < 1:
            return 0
        rates = self.rates(limit)
        best = rates.index(max(rates))  # the shallowest of equals
        if best > 0:
            self.cycles_since_probe = 0
            return best
        self.cycles_since_probe += 1
        if self.cycles_since_probe >= self.probe_interval:
            self.cycles_since_probe = 0
            self.probing = True
            return 1  # a probe: has the module started agreeing?
        return 0

    def chain_acceptance(self, depth: int) -> float:
        """Estimated chance that drafts 1..depth are all accepted."""
        chain = 1.0
        for accepted in self._acceptances(depth):
            chain *= accepted
        return chain

    def keep_drafting(self, depth: int, chain_confidence: float | None = None) -> bool:
        """After ``depth`` drafts: is draft ``depth + 1`` worth a module step and a wider verification?

        ``chain_confidence``: the chance the drafts so far all pass, the product of their
        :meth:`calibrated` probabilities; without it, the acceptance averages stand in for it.
        """
        if depth >= self.max_depth:
            return False
        chain = self.chain_acceptance(depth) if chain_confidence is None else chain_confidence
        expected_gain = chain * self._a(depth + 1) * self.costs.base_ms[1]
        extra_cost = self.costs.module_ms + self.costs.base_ms[depth + 2] - self.costs.base_ms[depth + 1]
        return expected_gain > extra_cost

    def worth_verifying(self, depth: int, chain_confidence: float) -> bool:
        """Is draft ``depth`` (already drafted; its module step is paid) worth one more verified row?"""
        return chain_confidence * self.costs.base_ms[1] > self.costs.base_ms[depth + 1] - self.costs.base_ms[depth]

    @staticmethod
    def confident(probability: float) -> bool:
        """Is a draft the module gave ``probability`` worth verifying at all? (Greedy acceptance is
        an argmax match, which a weakly trained module often gets right with a flat distribution, so
        only a near-uniform guess is dropped.)"""
        return probability >= CONFIDENCE_FLOOR

    def calibrated(self, probability: float) -> float:
        """The chance that a draft the module gave ``probability`` is accepted, as learned so far."""
        return self.calibration(probability)

    def observe(self, proposed: int, accepted: int, dropped: bool, confidences: list[float] | None = None) -> None:
        """Update the averages after a verification of ``proposed`` drafts, ``accepted`` of them
        taken; ``dropped``: a further draft was made but judged too unlikely to verify;
        ``confidences``: the module's probability of each proposed draft (teaches the calibration)."""
        tested = min(accepted + 1, proposed)  # drafts up to the first rejection were verified
        for j in range(1, tested + 1):
            self._update(j, 1.0 if j <= accepted else 0.0)
            if confidences is not None:
                self.calibration.observe(confidences[j - 1], j <= accepted)
        if dropped and accepted == proposed and proposed < self.max_depth:
            self._update(proposed + 1, 0.0)  # the module itself expected a rejection here
            tested += 1
        if proposed > 0:
            for j in range(max(tested + 1, 2), len(self.acceptance) + 1):
                if self.observed[j - 1]:
                    self.acceptance[j - 1] += UNTESTED_DRIFT * (self.prior - self.acceptance[j - 1])
        # Only a failed probe makes the next one wait longer: misses while drafting pays are what
        # the acceptance estimates are for. (Doubling on those as well once left a module that had a
        # bad stretch at one probe per 256 cycles for the rest of a server's life: fp16 SmolLM2 under
        # AVX2 emulation, adaptive 1.07x standard against 1.22x for the best fixed draft length.)
        if accepted > 0:
            self.probe_interval = 1
        elif self.probing:
            self.probe_interval = min(2 * self.probe_interval, MAX_PROBE_INTERVAL)


def _cost_key(model: RecycleGPT) -> tuple:
    weight = model.model.norm.weight
    return (str(weight.device), weight.dtype, torch.get_num_threads())


def step_costs(model: RecycleGPT, max_tokens: int) -> StepCosts:
    """k-token step costs for k = 1..max_tokens on this machine, measured once and cached on the model."""
    cache: dict = model.__dict__.setdefault(COSTS_KEY, {})
    key = _cost_key(model)
    known = cache.get(key)
    if known is not None and known.max_tokens >= max_tokens:
        return known
    length = min(COST_PROMPT_LENGTH, model.config.max_seq_len - max_tokens)
    prompt = (torch.arange(max(length, 1)) * 7919 % model.config.vocab_size).unsqueeze(0)
    ms = measure_step_costs(model, prompt, range(1, max_tokens + 1), iterations=7, inner=1)
    costs = StepCosts([0.0, *(ms[f"base_{k}"] for k in range(1, max_tokens + 1))], ms["module"])
    if known is not None and known.learning:  # wider steps are measured now; keep what decoding taught
        costs.inherit(known)
    cache[key] = costs
    return costs


def pin_step_costs(model: RecycleGPT, costs: StepCosts, learning: bool = False) -> None:
    """Plan with ``costs`` instead of measuring them on this machine (costs measured once elsewhere,
    or a test whose planning must not depend on how fast the machine running it is): a frozen copy of
    their present values, which decoding leaves as they are; with ``learning``, ``costs`` itself, as
    the start that decoding refines."""
    if not learning:
        costs = StepCosts(list(costs.base_ms), costs.module_ms, costs.first_module_ms, learning=False)
    model.__dict__.setdefault(COSTS_KEY, {})[_cost_key(model)] = costs


def draft_planner(
    model: RecycleGPT, draft_length: int, remember: bool = True, max_tokens: int | None = None
) -> DraftPlanner:
    """A planner for one generate call, drafts up to ``draft_length``, over the model's cached step
    costs (of up to ``max_tokens`` tokens, default ``draft_length + 1``; a draft tree verifies more);
    with ``remember`` it starts from what the model's earlier calls learned of acceptance (see
    :func:`remember_acceptance`) and of step costs, else from the prior and the costs as measured."""
    costs = step_costs(model, max_tokens or draft_length + 1)
    planner = DraftPlanner(costs if remember else costs.as_measured())
    memory = model.__dict__.get(ACCEPTANCE_KEY) if remember else None
    if memory is not None:
        acceptance, observed, planner.probe_interval, planner.cycles_since_probe, calibration = memory
        planner.acceptance, planner.observed = list(acceptance), list(observed)
        planner.calibration = calibration.copy()
    return planner


def remember_acceptance(model: RecycleGPT, planner: DraftPlanner) -> None:
    """Keep what ``planner`` learned for the model's next call, the probe clock and the confidence
    calibration included (so that short requests still probe now and then)."""
    model.__dict__[ACCEPTANCE_KEY] = (
        list(planner.acceptance),
        list(planner.observed),
        planner.probe_interval,
        planner.cycles_since_probe,
        planner.calibration.copy(),
    )


@contextmanager
def own_acceptance(model: RecycleGPT, memories: dict[str, object], name: str) -> Iterator[None]:
    """Within: the model's calls start from, and leave what they learn of acceptance in,
    ``memories[name]`` instead of the model's one memory (restored after). A benchmark that runs the
    adaptive and the tree policy side by side keeps each one's learning its own, as a server running
    one policy would; the step costs, a property of the machine, stay shared."""
    outer = model.__dict__.pop(ACCEPTANCE_KEY, None)
    if memories.get(name) is not None:
        model.__dict__[ACCEPTANCE_KEY] = memories[name]
    try:
        yield
    finally:
        memories[name] = model.__dict__.pop(ACCEPTANCE_KEY, None)
        if outer is not None:
            model.__dict__[ACCEPTANCE_KEY] = outer


def forget_acceptance(model: RecycleGPT) -> None:
    """Let the model's next adaptive call start from the prior again."""
    model.__dict__.pop(ACCEPTANCE_KEY, None)


def forget_measurements(model: RecycleGPT) -> None:
    """Drop the cached step costs and acceptance (after the model was transformed)."""
    model.__dict__.pop(COSTS_KEY, None)
    forget_acceptance(model)
