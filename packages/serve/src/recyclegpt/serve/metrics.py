"""Prometheus metrics of the server, in the API process (``GET /metrics``).

LitServe runs the model in a separate inference worker. Rather than sharing counters across
processes (prometheus multiprocess mode), the worker ships what it measured for each choice in
that choice's messages (the ``started`` message, then ``usage``, ``timing`` and ``drafts`` in the
final one) and the one API process (``num_api_servers=1``) counts it here, so every figure comes
from one registry. Names follow vLLM's, under ``recyclegpt:`` instead of ``vllm:``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "recyclegpt:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's counters, gauges and histograms in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests", "HTTP requests to the generation endpoints, by endpoint and status code",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.success = Counter(
            PREFIX + "request_success", "Finished choices, by finish reason", ["finished_reason"], registry=r
        )
        self.waiting = Gauge(
            PREFIX + "num_requests_waiting", "Choices queued, not yet in the worker's batch", registry=r
        )
        self.running = Gauge(PREFIX + "num_requests_running", "Choices in the worker's running batch", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "From arrival to the first generated token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds", "Mean time between generated tokens, per choice",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "From arrival to the last token, per choice",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.drafts = Counter(PREFIX + "spec_decode_num_drafts", "Speculative drafts verified", registry=r)
        self.draft_tokens = Counter(PREFIX + "spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted_tokens = Counter(
            PREFIX + "spec_decode_num_accepted_tokens", "Draft tokens the full model accepted", registry=r
        )
        self.accepted_per_position = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by position in the draft",
            ["position"], registry=r,
        )  # fmt: skip

    def finished(self, arrival: float, final: dict[str, Any]) -> None:
        """Count a choice from its final worker message."""
        usage, timing, drafts = final["usage"], final.get("timing"), final.get("drafts")
        self.success.labels(final["finish_reason"]).inc()
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generation_tokens.inc(usage["completion_tokens"])
        if timing and usage["completion_tokens"] > 0:
            self.ttft.observe(max(0.0, timing["first_token"] - arrival))
            self.e2e.observe(max(0.0, timing["done"] - arrival))
            if usage["completion_tokens"] > 1:
                self.tpot.observe((timing["done"] - timing["first_token"]) / (usage["completion_tokens"] - 1))
        if drafts and drafts["drafts"]:
            self.drafts.inc(drafts["drafts"])
            self.draft_tokens.inc(drafts["draft_tokens"])
            self.accepted_tokens.inc(drafts["accepted_tokens"])
            for position, count in enumerate(drafts["accepted_per_position"]):
                self.accepted_per_position.labels(str(position)).inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
