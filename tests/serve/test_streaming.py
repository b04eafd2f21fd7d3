"""Streaming in the inference worker: incremental text, generate in a lockstep thread, the engine's deltas."""

from __future__ import annotations

import threading

import pytest
import torch

from recyclegpt.core import RecycleConfig, RecycleGPT
from recyclegpt.serve.engine import Engine, Job
from recyclegpt.serve.protocol import ApiError
from recyclegpt.serve.streaming import LockstepGenerate
from recyclegpt.serve.text import TextStream

from .conftest import build_tokenizer

MODES = ("standard", "alternating", "speculative")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.manual_seed(0)
    config = RecycleConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128
    )
    return Engine(RecycleGPT(config).eval(), tokenizer)


def stream_text(tokenizer, ids: list[int], stops: list[str], chunk: int) -> tuple[list[str], str | None, int]:
    """Feed ids ``chunk`` at a time as generation would; the non-empty deltas, finish reason and token count."""
    text = TextStream(tokenizer, tokenizer.eos_token_id, stops)
    deltas = [text.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(text.close())
    return [d for d in deltas if d], text.finish_reason, text.completion_tokens


def test_text_stream_rebuilds_multibyte_text_token_by_token(tokenizer):
    text = "naïve café 東京 🙂 and robots"
    ids = tokenizer(text)["input_ids"]
    deltas, finish_reason, count = stream_text(tokenizer, ids, [], chunk=1)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert len(deltas) > 1 and (finish_reason, count) == ("length", len(ids))


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_text_stream_ends_at_eos_and_stop_sequences(tokenizer, chunk):
    ids = tokenizer("The little robot walked to the market")["input_ids"]
    eos = tokenizer.eos_token_id
    assert stream_text(tokenizer, [*ids[:3], eos, *ids[3:]], [], chunk)[1:] == ("stop", 4)
    assert "".join(stream_text(tokenizer, [*ids[:3], eos, *ids[3:]], [], chunk)[0]) == tokenizer.decode(ids[:3])
    deltas, finish_reason, count = stream_text(tokenizer, ids, ["market", "walked"], chunk)
    assert "".join(deltas) == "The little robot " and finish_reason == "stop"
    assert tokenizer.decode(ids[:count]).startswith("The little robot w")
    assert not tokenizer.decode(ids[: count - 1]).startswith("The little robot w")


def test_text_stream_holds_back_a_possible_stop_sequence(tokenizer):
    text = TextStream(tokenizer, tokenizer.eos_token_id, ["robots", "bot walked"])
    assert text.push(tokenizer("The little ro")["input_ids"]) == "The little "  # "ro" may start "robots"
    # "robot" is not "robots", but " walked" completes "bot walked", which starts earlier: that one cuts.
    assert text.push(tokenizer("bot walked home")["input_ids"]) == "ro"
    assert text.finished and text.finish_reason == "stop"
    held = TextStream(tokenizer, None, ["robots"])
    assert held.push(tokenizer("two robo")["input_ids"]) == "two "
    assert held.close() == "robo" and held.finish_reason == "length"


class HoldSecondCall:
    """A forward pre-hook on the base: its second call (the first decoding step) waits for ``release``."""

    def __init__(self, model: RecycleGPT) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.handle = model.model.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        if self.calls == 2 and not self.gate.wait(timeout=60):
            raise RuntimeError("nothing was streamed before generation went on")

    @property
    def holding(self) -> bool:
        """Generate has not got past its second call (it may not have reached it yet)."""
        return self.calls <= 2 and not self.gate.is_set()

    def release(self) -> None:
        self.gate.set()
        self.handle.remove()


def test_the_first_delta_comes_while_generate_is_still_running(engine):
    """A stream that started only after generation would never get its first delta: generate would wait
    in its second call until the hook gives up and the run fails."""
    hold = HoldSecondCall(engine.model)
    try:
        job = Job(prompt="Once upon a time", max_tokens=8, temperature=0.0, decoding="standard", stream=True)
        messages = engine.run(job)
        first = next(messages)
        assert first["text"] and "finish_reason" not in first
        assert hold.holding  # generate has made one token and cannot make another yet
        hold.release()
        *rest, final = messages
    finally:
        hold.release()
    assert final["usage"]["completion_tokens"] == 8 and final["stats"]["full_model_calls"] == 8
    (whole,) = engine.run(Job(prompt="Once upon a time", max_tokens=8, temperature=0.0, decoding="standard"))
    assert "".join(m["text"] for m in (first, *rest, final)) == whole["text"]


def test_a_stopped_generation_ends_generate_at_the_tokens_handed_out(engine):
    hold = HoldSecondCall(engine.model)
    try:
        generation = LockstepGenerate(engine.model, [5, 6, 7], 40)
        first = generation.advance()
        assert hold.calls == 1  # generate waits for the next advance() before its second call
        generation.stop()
    finally:
        hold.release()
    assert len(first) == 1 and generation.finished and generation.advance() == []
    # generate stopped at the token handed out and still reports what it did
    assert generation.output is not None and generation.output.new_tokens.shape[1] == 1
    assert generation.output.full_model_calls == 1


@pytest.mark.parametrize("decoding", MODES)
def test_closing_a_stream_stops_its_generate_thread(engine, decoding):
    job = Job(prompt="Once upon a time", max_tokens=60, temperature=0.0, decoding=decoding, stream=True)
    messages = engine.run(job)
    assert next(messages)["text"]
    assert any(thread.name == "recyclegpt-generate" for thread in threading.enumerate())
    messages.close()  # what a client that goes away does to the stream
    assert not any(thread.name == "recyclegpt-generate" for thread in threading.enumerate())


def test_generate_errors_reach_the_reader(engine):
    generation = LockstepGenerate(engine.model, [5, 6, 7], 4, decoding="speculative", draft_length=0)
    with pytest.raises(ValueError, match="draft_length"):
        generation.advance()
    assert generation.finished and generation.output is None
    with pytest.raises(ApiError, match="top_p") as err:
        list(engine.run(Job(prompt="The robot", max_tokens=4, top_p=0.0)))
    assert err.value.status == 400


@pytest.mark.parametrize("decoding", MODES)
def test_engine_stream_equals_the_whole_answer(engine, decoding):
    job = Job(prompt="The little robot", max_tokens=60, temperature=1.0, seed=3, decoding=decoding, draft_length=3)
    (whole,) = engine.run(job)
    job.stream = True
    *deltas, final = engine.run(job)
    assert len(deltas) > 1 and all(d["text"] and d.keys() == {"text"} for d in deltas)
    assert "".join(d["text"] for d in (*deltas, final)) == whole["text"]
    assert (final["finish_reason"], final["usage"]) == (whole["finish_reason"], whole["usage"])
    assert final["stats"]["full_model_calls"] == whole["stats"]["full_model_calls"]


@pytest.mark.parametrize("decoding", MODES)
def test_engine_cuts_at_a_stop_sequence(engine, decoding):
    job = Job(prompt="Her mother smiled", max_tokens=60, temperature=1.0, seed=5, decoding=decoding, draft_length=3)
    (whole,) = engine.run(job)
    text = whole["text"]
    stop = text[len(text) // 3 :][:3]
    job.stop = [stop]
    for stream in (False, True):
        job.stream = stream
        *deltas, final = engine.run(job)
        assert "".join(d["text"] for d in (*deltas, final)) == text[: text.index(stop)]
        assert final["finish_reason"] == "stop"
        assert final["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"]
