"""Draft trees (EAGLE-2's dynamic trees) for greedy speculative decoding.

A chain drafts one token per depth, so a cycle ends at the first depth where the module's first
guess is wrong. A tree keeps the module's top guesses at every depth, expands the most likely of
them one module step per depth (each node reads its parent's module state; tree attention lets it
see only its own ancestors), and the base verifies the most likely nodes of the whole tree in one
forward, each node again seeing only the cache and its ancestors. Verification walks the tree from
the pending token: the base's greedy token there selects a child, that child's row selects the next,
and so on. The path it accepts is what standard decoding writes, token for token.

A node's value is the chance that it is accepted: the product, along its path, of the confidence
calibration the adaptive planner learns (:class:`recyclegpt.core.speculation.ConfidenceCalibration`),
as EAGLE-2 ranks nodes by the product of the draft's probabilities. The expected tokens of a
verification are 1 + the sum of the values of the nodes it reads, so the tree keeps the n most
valuable nodes that give the most expected tokens per millisecond under the k-token step costs the
planner measured on this machine (on a CPU a k-token step costs more with every row, unlike a GPU's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from recyclegpt.core.model import KVCache, RecycleGPT
from recyclegpt.core.speculation import StepCosts

TREE_TOP_K = 2  # children scored per expanded node, and nodes expanded per depth (4 measured slower on CPU)
MAX_TREE_NODES = 8  # nodes one verification reads at most (besides the pending token)


@dataclass
class DraftTree:
    """Nodes in the order they were drafted (depth by depth, so a parent precedes its children)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1: a child of the pending token
    depths: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # estimated chance of being accepted
    probabilities: list[float] = field(default_factory=list)  # the module's probability of the token
    path_probabilities: list[float] = field(default_factory=list)  # their product along the path
    module_steps: int = 0  # module steps the expansion took (the catch-up step not counted)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, probability: float, calibrated: float) -> int:
        above_value = self.values[parent] if parent >= 0 else 1.0
        above_probability = self.path_probabilities[parent] if parent >= 0 else 1.0
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1 if parent >= 0 else 1)
        self.values.append(above_value * calibrated)
        self.probabilities.append(probability)
        self.path_probabilities.append(above_probability * probability)
        return len(self.tokens) - 1

    def ranked(self, nodes: range | list[int]) -> list[int]:
        """``nodes`` by value, most valuable first (ties: the module's own path probability, then
        drafting order, so a node never ranks above its parent)."""
        return sorted(nodes, key=lambda n: (-self.values[n], -self.path_probabilities[n], n))

    def ancestors(self, node: int) -> list[int]:
        found = []
        while node >= 0:
            found.append(node)
            node = self.parents[node]
        return found

    def choose(self, costs: StepCosts, drafting_ms: float, limit: int) -> list[int]:
        """The nodes to verify, in drafting order: the n most valuable (a set closed under parents)
        for the n <= ``limit`` with the most expected tokens per millisecond of this cycle."""
        ranked = self.ranked(range(len(self)))[: min(limit, costs.max_tokens - 1)]
        best_count, best_rate, tokens = 0, 1.0 / (costs.base_ms[1] + drafting_ms), 1.0
        for count, node in enumerate(ranked, start=1):
            tokens += self.values[node]
            rate = tokens / (costs.base_ms[count + 1] + drafting_ms)
            if rate > best_rate:
                best_count, best_rate = count, rate
        return sorted(ranked[:best_count])

    def visibility(self, chosen: list[int]) -> torch.Tensor:
        """[n + 1, n + 1] bool: which verified rows (row 0 the pending token, row i + 1 node
        ``chosen[i]``) each row attends to: the pending token, its ancestors and itself."""
        row_of = {node: row for row, node in enumerate(chosen, start=1)}
        visible = torch.zeros(len(chosen) + 1, len(chosen) + 1, dtype=torch.bool)
        visible[:, 0] = True
        for node, row in row_of.items():
            visible[row, [row_of[a] for a in self.ancestors(node)]] = True
        return visible

    def accept(self, chosen: list[int], targets: list[int]) -> list[int]:
        """Greedy verification: rows (1-based, as in :meth:`visibility`) of the accepted path, given
        the base's greedy token ``targets[row]`` after every verified row."""
        row_of = {-1: 0, **{node: row for row, node in enumerate(chosen, start=1)}}
        children: dict[int, dict[int, int]] = {}  # row -> {token of a child: the child's row}
        for node, row in list(row_of.items())[1:]:
            children.setdefault(row_of[self.parents[node]], {})[self.tokens[node]] = row
        path, row = [], 0
        while (row := children.get(row, {}).get(targets[row], -1)) > 0:
            path.append(row)
        return path


def grow_tree(
    model: RecycleGPT,
    module_cache: KVCache,
    root_state: torch.Tensor,
    root_position: int,
    max_depth: int,
    calibrated: Callable[[float], float],
    costs: StepCosts,
) -> DraftTree:
    """Draft a tree of depth <= ``max_depth`` after the pending token at ``root_position``, whose
    module state [1, 1, d] is ``root_state`` (the module cache ends with that token). Each depth
    scores TREE_TOP_K children of every node expanded at the depth before, then expands the
    TREE_TOP_K most valuable new nodes that are worth a verified row, while the best of them is worth
    a module step. The expansions' keys stay in ``module_cache`` after its length on entry: the caller
    rolls them back."""
    tree = DraftTree()
    draft_ids = model.draft_ids
    start = module_cache.length
    slot_of: dict[int, int] = {}  # expanded node -> its module cache slot (after ``start``)
    frontier, states = [-1], root_state
    row_cost = (costs.base_ms[-1] - costs.base_ms[1]) / max(costs.max_tokens - 1, 1)
    for depth in range(1, max_depth + 1):
        probs = model.draft_head_logits(states[0]).float().softmax(-1)
        top_probs, top_index = probs.topk(min(TREE_TOP_K, probs.shape[-1]), dim=-1)
        top_tokens = (top_index if draft_ids is None else draft_ids[top_index]).tolist()
        first = len(tree)
        for row, parent in enumerate(frontier):
            for probability, token in zip(top_probs[row].tolist(), top_tokens[row], strict=True):
                tree.add(token, parent, probability, calibrated(probability))
        if depth == max_depth:
            break
        expand = [
            n for n in tree.ranked(range(first, len(tree)))[:TREE_TOP_K] if tree.values[n] * costs.base_ms[1] > row_cost
        ]
        if not expand or tree.values[expand[0]] * costs.base_ms[1] <= costs.module_ms:
            break
        if module_cache.length + len(expand) > module_cache.max_len:
            break
        offset = module_cache.length - start
        visible = torch.zeros(len(expand), offset + len(expand), dtype=torch.bool)
        for i, node in enumerate(expand):
            slot_of[node] = offset + i
            visible[i, [slot_of[a] for a in tree.ancestors(node)]] = True
        device = root_state.device
        ids = torch.tensor([[tree.tokens[n] for n in expand]], device=device)
        positions = torch.full_like(ids, root_position + depth)
        prev = states[:, [frontier.index(tree.parents[n]) for n in expand]]
        states = model.module_hidden(prev, ids, positions, module_cache, tree=visible.to(device))
        frontier = expand
        tree.module_steps += 1
    return tree
