"""Step-level batched decoding for continuous batching: rows join and leave between steps.

``BatchedDecoder`` runs ``standard`` or ``alternating`` decoding (the same steps as
:mod:`recyclegpt.core.decoding`) for many independent sequences at once. A sequence joins with
``add`` (its prompt is prefilled alone, then its keys and values are copied into the batch) and
leaves when it finishes or with ``remove``; every ``step`` runs one batched forward of the full
model (and, for ``alternating``, one of the module) over all rows, whatever their lengths.

The batch's KV cache is model.py's ``KVCache`` with one shared column timeline: every row's keys
end at the same column, a row's earlier columns that are not its own are masked out through
``key_valid``, and rotary positions are per row, so each row decodes as if it were alone. Rows
stay packed at the front (a leaving row's slot takes the last row), and the timeline is shifted
left when a leaving row leaves leading columns nobody owns (every step attends over ``end``
columns, so they are kept close to the longest live row) or when it would run past the end;
memory is ``max_batch_size x capacity`` columns per stack.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from recyclegpt.core.losses import shift_hidden
from recyclegpt.core.model import KVCache, RecycleGPT
from recyclegpt.core.sampling import SamplingParams, sample

BATCHED_MODES = ("standard", "alternating")
COMPACT_AFTER = 16  # shift the timeline left once this many leading columns belong to no live row


class BatchKV:
    """A KV cache of up to ``max_rows`` rows on one column timeline; rows 0..n-1 are live."""

    def __init__(self, model: RecycleGPT, part: str, max_rows: int, capacity: int) -> None:
        self.storage = model.new_cache(part, max_rows, capacity)
        self.storage.key_valid.zero_()
        self.capacity = capacity
        self.end = 0  # the shared column where every live row's next key goes
        self.starts: list[int] = []  # each live row's first column

    @property
    def rows(self) -> int:
        return len(self.starts)

    def view(self, new_columns: int) -> KVCache:
        """A KVCache over the live rows, ready for ``new_columns`` keys at ``end`` (marked valid)."""
        self._make_room(new_columns)
        n = self.rows
        self.storage.key_valid[:n, self.end : self.end + new_columns] = True
        view = KVCache.__new__(KVCache)
        view.keys = self.storage.keys[:, :n]
        view.values = self.storage.values[:, :n]
        view.key_valid = self.storage.key_valid[:n]
        view.has_padding = True  # always build the mask: rows own different columns
        view.length = self.end
        view.max_len = self.capacity
        return view

    def advanced(self, view: KVCache) -> None:
        """Take the end column from a view a forward has written to."""
        self.end = view.length

    def add_row(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append a row whose keys/values [layers, heads, P, head_dim] end at the shared end column."""
        length = keys.shape[2]
        if length > self.end:
            self._shift(length - self.end)
        row, start = self.rows, self.end - length
        self.storage.key_valid[row] = False
        self.storage.key_valid[row, start : self.end] = True
        self.storage.keys[:, row, :, start : self.end] = keys
        self.storage.values[:, row, :, start : self.end] = values
        self.starts.append(start)

    def remove_row(self, row: int) -> None:
        """Drop a live row; the last live row takes its slot."""
        last = self.rows - 1
        if row != last:
            self.storage.keys[:, row] = self.storage.keys[:, last]
            self.storage.values[:, row] = self.storage.values[:, last]
            self.storage.key_valid[row] = self.storage.key_valid[last]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        if not self.starts:
            self.end = 0
        elif min(self.starts) >= COMPACT_AFTER:  # columns nobody owns: stop attending over them
            self._shift(-min(self.starts))

    def _make_room(self, new_columns: int) -> None:
        if self.end + new_columns <= self.capacity:
            return
        self._shift(-min(self.starts))  # drop the columns no live row owns
        if self.end + new_columns > self.capacity:
            raise RuntimeError(f"batch KV cache full: {self.end} + {new_columns} columns > {self.capacity}")

    def _shift(self, by: int) -> None:
        """Move every live row's columns ``by`` columns right (negative: left)."""
        first = min(self.starts, default=self.end)
        if by == 0 or first == self.end:
            self.end = max(self.end + by, 0)
            self.starts = [s + by for s in self.starts]
            return
        if self.end + by > self.capacity:
            raise RuntimeError(f"batch KV cache full: {self.end + by} columns > {self.capacity}")
        n = self.rows
        for tensor in (self.storage.keys, self.storage.values):
            block = tensor[:, :n, :, first : self.end].clone()
            tensor[:, :n, :, first + by : self.end + by] = block
        valid = self.storage.key_valid[:n, first : self.end].clone()
        self.storage.key_valid[:n] = False
        self.storage.key_valid[:n, first + by : self.end + by] = valid
        self.end += by
        self.starts = [s + by for s in self.starts]


@dataclass
class Sequence:
    """One row: its tokens so far (prompt + new), budget, sampling and stop rule."""

    key: Hashable
    tokens: list[int]
    prompt_length: int
    max_new_tokens: int
    params: SamplingParams
    eos_token_id: int | None = None
    finished: bool = False
    full_model_calls: int = 0
    module_calls: int = 0
    new_since_report: list[int] = field(default_factory=list)

    @property
    def num_new(self) -> int:
        return len(self.tokens) - self.prompt_length

    def accept(self, token: int) -> None:
        if self.finished:
            return
        self.tokens.append(token)
        self.new_since_report.append(token)
        if token == self.eos_token_id or self.num_new >= self.max_new_tokens:
            self.finished = True


@dataclass
class StepOutput:
    """A row's tokens from one step (or from ``add``), whether it has finished, and its cost so far."""

    key: Hashable
    new_tokens: list[int]
    finished: bool
    full_model_calls: int = 0
    module_calls: int = 0


class BatchedDecoder:
    """Continuous batching of ``standard`` or ``alternating`` decoding over up to ``max_batch_size`` rows."""

    def __init__(
        self, model: RecycleGPT, decoding: str = "standard", max_batch_size: int = 8, capacity: int | None = None
    ) -> None:
        if decoding not in BATCHED_MODES:
            raise ValueError(f"batched decoding must be one of {', '.join(BATCHED_MODES)}, got {decoding!r}")
        self.model = model
        self.decoding = decoding
        self.max_batch_size = max_batch_size
        # +2: alternating's full call reads two new tokens at once
        self.capacity = capacity or model.config.max_seq_len + 2
        self.device = model.lm_head.weight.device
        self.base = BatchKV(model, "base", max_batch_size, self.capacity)
        self.module = BatchKV(model, "module", max_batch_size, self.capacity) if decoding == "alternating" else None
        self.rows: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.rows)

    def has_capacity(self) -> bool:
        return len(self.rows) < self.max_batch_size

    @staticmethod
    def kv_bytes(model: RecycleGPT, decoding: str, max_batch_size: int, capacity: int | None = None) -> int:
        """Bytes of KV cache a decoder of this shape allocates."""
        config = model.config
        columns = capacity or config.max_seq_len + 2
        layers = config.num_layers + (config.module_layers if decoding == "alternating" else 0)
        element = model.lm_head.weight.element_size()
        return 2 * layers * max_batch_size * config.num_kv_heads * columns * config.head_dim * element

    @torch.inference_mode()
    def add(
        self,
        key: Hashable,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> StepOutput:
        """Prefill a new sequence alone and join it to the batch; returns its first token(s)."""
        if not self.has_capacity():
            raise RuntimeError(f"the batch is full ({self.max_batch_size} rows)")
        if not prompt or max_new_tokens < 1 or len(prompt) + max_new_tokens > self.model.config.max_seq_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones does not fit the model's context"
            )
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        row = Sequence(key, list(prompt), len(prompt), max_new_tokens, SamplingParams(temperature, top_k, top_p, generator), eos_token_id)  # fmt: skip
        model = self.model
        ids = torch.tensor([prompt], device=self.device)
        base_cache = model.new_cache("base", 1, len(prompt))
        hidden = model.base_hidden(ids, cache=base_cache)
        row.full_model_calls += 1
        self._sample(hidden[:, -1], [row])
        module_keys = None
        if self.decoding == "alternating" and not row.finished:
            # Module catch-up over the prompt (zero state before the first token) plus the new token.
            prev = torch.cat((shift_hidden(hidden), hidden[:, -1:]), dim=1)
            module_cache = model.new_cache("module", 1, len(row.tokens))
            state = model.module_hidden(prev, torch.tensor([row.tokens], device=self.device), cache=module_cache)
            row.module_calls += 1
            self._sample(state[:, -1], [row], module=True)
            module_keys = module_cache
        if not row.finished:
            self.base.add_row(base_cache.keys[:, 0], base_cache.values[:, 0])
            if self.module is not None:
                self.module.add_row(module_keys.keys[:, 0], module_keys.values[:, 0])
            self.rows.append(row)
        return self._report(row)

    def remove(self, key: Hashable) -> None:
        """Drop a sequence before it finishes (a stop sequence, a client gone)."""
        for index, row in enumerate(self.rows):
            if row.key == key:
                self._remove_row(index)
                return

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One batched step for every row: standard, one token each; alternating, up to two (full, module)."""
        if not self.rows:
            return []
        if self.decoding == "standard":
            hidden = self._base_forward(1)
            self._sample(hidden[:, -1], self.rows)
        else:
            hidden = self._base_forward(2)
            self._sample(hidden[:, -1], self.rows)
            live = [row for row in self.rows if not row.finished]
            if live:
                state = self._module_forward(hidden)
                self._sample(state[:, -1], self.rows, module=True)
        outputs = [self._report(row) for row in self.rows]
        for index in reversed(range(len(self.rows))):
            if self.rows[index].finished:
                self._remove_row(index)
        return outputs

    # ----------------------------------------------------------------------------- internals
    def _last(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's last ``count`` tokens [n, count] and their rotary positions."""
        # Built as Python lists: a step of a small model is short, and tensor arithmetic costs ~10 us an op.
        ids = torch.tensor([row.tokens[-count:] for row in self.rows], device=self.device)
        firsts = [len(row.tokens) - count for row in self.rows]
        positions = torch.tensor([range(first, first + count) for first in firsts], device=self.device)
        return ids, positions

    def _base_forward(self, count: int) -> torch.Tensor:
        ids, positions = self._last(count)
        view = self.base.view(count)
        hidden = self.model.base_hidden(ids, positions, view)
        self.base.advanced(view)
        for row in self.rows:
            row.full_model_calls += 1
        return hidden

    def _module_forward(self, prev_hidden: torch.Tensor) -> torch.Tensor:
        """The module over each row's last two slots, with the full model's states before them."""
        ids, positions = self._last(2)
        view = self.module.view(2)
        state = self.model.module_hidden(prev_hidden, ids, positions, view)
        self.module.advanced(view)
        for row in self.rows:
            row.module_calls += 1
        return state

    def _sample(self, hidden: torch.Tensor, rows: list[Sequence], module: bool = False) -> None:
        """One token for each row from the base's states, or (``module``) from the module's, which
        score only the draft vocabulary where the module has one (as core's alternating decoding)."""
        model = self.model
        if all(row.params.greedy for row in rows):
            picked = model.greedy_draft_token(hidden) if module else model.greedy_base_token(hidden)
            tokens = picked.tolist()
        else:
            logits = model.draft_logits(hidden) if module else model.base_logits(hidden)
            tokens = [int(sample(logits[i : i + 1], row.params)[0]) for i, row in enumerate(rows)]
        for row, token in zip(rows, tokens, strict=True):
            row.accept(token)

    def _report(self, row: Sequence) -> StepOutput:
        out = StepOutput(row.key, row.new_since_report, row.finished, row.full_model_calls, row.module_calls)
        row.new_since_report = []
        return out

    def _remove_row(self, index: int) -> None:
        self.base.remove_row(index)
        if self.module is not None:
            self.module.remove_row(index)
        last = self.rows.pop()
        if index < len(self.rows):
            self.rows[index] = last
