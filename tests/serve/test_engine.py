"""In-process pieces of the server: request validation, prompts, the engine, CLI checks."""

from __future__ import annotations

import json

import pytest
import torch

from recyclegpt.core import RecycleConfig, RecycleGPT
from recyclegpt.serve.cli import main, resolve_api_key
from recyclegpt.serve.engine import Engine, Job
from recyclegpt.serve.prompts import PLAIN_CHAT_TEMPLATE, chat_text
from recyclegpt.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_request

from .conftest import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _parse(kind, body, limit=64):
    return parse_request(kind, json.dumps(body).encode(), limit)


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        (CompletionRequest, {}, "prompt"),
        (CompletionRequest, {"prompt": ""}, "prompt"),
        (CompletionRequest, {"prompt": ["a", ""]}, "prompt"),
        (CompletionRequest, {"prompt": [[1, 2], []]}, "prompt"),
        (CompletionRequest, {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        (CompletionRequest, {"prompt": "a", "logprobs": 6}, "logprobs"),
        (CompletionRequest, {"prompt": ["a"] * 9, "n": 2}, "n"),
        (
            CompletionRequest,
            {"prompt": "a", "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        (ChatRequest, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        (
            ChatRequest,
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        (CompletionRequest, {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        (CompletionRequest, {"prompt": "a", "max_tokens": 65}, "max_tokens"),
        (CompletionRequest, {"prompt": "a", "max_tokens": True}, "max_tokens"),
        (CompletionRequest, {"prompt": "a", "temperature": float("nan")}, "temperature"),
        (CompletionRequest, {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (
            ChatRequest,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content",
        ),
        (ChatRequest, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (
            ChatRequest,
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99},
            "max_completion_tokens",
        ),
    ],
)
def test_parse_request_names_the_bad_field(kind, body, param):
    with pytest.raises(ApiError) as err:
        _parse(kind, body)
    assert err.value.status == 400
    assert err.value.param == param
    assert param.split("[")[0] in err.value.message


def test_parse_request_accepts_openai_shapes():
    request = _parse(CompletionRequest, {"prompt": ["hello"], "stop": "x", "user": "someone", "logit_bias": {}})
    assert request.prompts == ["hello"] and request.stop == ["x"]
    assert _parse(CompletionRequest, {"prompt": [[1, 2], [3]], "n": 2}).prompts == [[1, 2], [3]]
    assert _parse(CompletionRequest, {"prompt": [5, 6], "echo": True, "max_tokens": 0}).prompts == [[5, 6]]
    chat = _parse(
        ChatRequest,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
    )
    assert chat.messages[0].text() == "ab"


def test_chat_prompt_uses_the_tokenizer_template_or_the_plain_one(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_text(tokenizer, messages) == "system: Be brief.\nuser: Hi\nassistant:"
    templated = build_tokenizer()
    templated.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert chat_text(templated, messages) == "<system>Be brief.<user>Hi<assistant>"
    assert "assistant" in PLAIN_CHAT_TEMPLATE


def test_engine_runs_core_generate_and_checks_the_context(tokenizer):
    torch.manual_seed(0)
    config = RecycleConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32
    )
    engine = Engine(RecycleGPT(config).eval(), tokenizer)
    job = Job(prompt="The robot", max_tokens=6, temperature=0.0, decoding="speculative", draft_length=3)
    (final,) = list(engine.run(job))
    assert final["usage"]["completion_tokens"] <= 6
    assert final["usage"]["prompt_tokens"] == len(tokenizer("The robot")["input_ids"])
    standard = list(engine.run(Job(prompt="The robot", max_tokens=6, temperature=0.0, decoding="standard")))
    assert final["text"] == standard[0]["text"]  # speculative greedy is lossless
    assert final["stats"]["decoding"] == "speculative" and final["finish_reason"] in ("stop", "length")
    with pytest.raises(ApiError, match="context of 32") as err:
        list(engine.run(Job(prompt="The robot", max_tokens=31)))
    assert err.value.param == "max_tokens"
    with pytest.raises(ApiError, match="prompt is") as err:
        list(engine.run(Job(messages=[{"role": "user", "content": "robot " * 40}])))
    assert err.value.param == "messages"


def test_api_key_resolution():
    assert resolve_api_key(None, {"RECYCLEGPT_API_KEY": "env"}) == "env"
    assert resolve_api_key("flag", {"RECYCLEGPT_API_KEY": "env"}) == "flag"
    assert resolve_api_key(None, {"RECYCLEGPT_API_KEY": ""}) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "no such file"),
        (["--model", "{tmp}", "--host", "10.1.2.3"], "--host 10.1.2.3"),
        (["--model", "{tmp}", "--draft-length", "0"], "--draft-length 0"),
        (["--model", "{tmp}", "--max-tokens-limit", "0"], "--max-tokens-limit 0"),
        (["--model", "{tmp}", "--max-batch-size", "0"], "--max-batch-size 0"),
        (["--model", "{tmp}", "--max-kv-mb", "0.0001"], "--max-kv-mb 0.0001"),
    ],
)
def test_cli_rejects_bad_arguments(args, message, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tiny_model_dir)) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_kv_check_sizes_the_cache_in_the_dtype_auto_decodes_in(cpu_class, monkeypatch, tiny_model_dir, tmp_path):
    """--max-kv-mb is checked against the cache of the dtype the worker will load: fp32 where the CPU
    decode kernels run (twice bf16's bytes), bf16 on a native-bf16 CPU without them."""
    import torch

    from recyclegpt.core import RecycleConfig, RecycleGPT, precision
    from recyclegpt.core.batching import BATCHED_MODES, BatchedDecoder
    from recyclegpt.serve.cli import kv_problem

    def row_mib(dtype: torch.dtype) -> float:
        with torch.device("meta"):
            meta = RecycleGPT(RecycleConfig.load(tiny_model_dir / "config.json")).to(dtype)
        return sum(BatchedDecoder.kv_bytes(meta, mode, 1) for mode in BATCHED_MODES) / 2**20

    between = (row_mib(torch.bfloat16) + row_mib(torch.float32)) / 2  # one bf16 row fits, one fp32 row does not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's choice, also on a GPU machine
    cpu_class("avx512_bf16")
    monkeypatch.setattr(precision, "cpu_decode_kernels_run", lambda *_: False)
    assert kv_problem(tiny_model_dir, "auto", "none", 8, between) is None
    monkeypatch.setattr(precision, "cpu_decode_kernels_run", lambda *_: True)
    assert "one batch row of this model needs" in kv_problem(tiny_model_dir, "auto", "none", 8, between)
    assert kv_problem(tiny_model_dir, "auto", "int8", 8, between) is None  # weight-only int8 decodes in bf16
    saved_int8 = tmp_path / "int8"
    RecycleGPT.from_pretrained(str(tiny_model_dir), quantize="int8").save_pretrained(str(saved_int8))
    assert kv_problem(saved_int8, "auto", "none", 8, between) is None  # it loads as int8, so in bf16
    cpu_class("avx2")
    assert kv_problem(tiny_model_dir, "auto", "int8", 8, between) is not None


def test_the_kv_bound_sets_the_batch_rows(tokenizer):
    from recyclegpt.core.batching import BatchedDecoder
    from recyclegpt.serve.api import batch_rows

    config = RecycleConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128
    )
    model = RecycleGPT(config)
    per_row = BatchedDecoder.kv_bytes(model, "standard", 1) + BatchedDecoder.kv_bytes(model, "alternating", 1)
    assert batch_rows(model, 8, 1e6) == 8
    assert batch_rows(model, 8, 3.5 * per_row / 2**20) == 3
    with pytest.raises(ValueError, match="--max-kv-mb"):
        batch_rows(model, 8, 0.5 * per_row / 2**20)


def test_setup_measures_speculative_step_costs_before_the_first_request(tiny_model_dir) -> None:
    from recyclegpt.core.speculation import COSTS_KEY
    from recyclegpt.serve.api import RecycleGPTAPI

    api = RecycleGPTAPI(str(tiny_model_dir), "fp32", spec=None, cpu_threads=1, draft_length=3)
    threads = torch.get_num_threads()
    try:
        api.setup("cpu")  # sets the worker's torch threads: this process's, here
    finally:
        torch.set_num_threads(threads)
    (costs,) = api.engine.model.__dict__[COSTS_KEY].values()
    assert costs.max_tokens >= 4  # a 3-token draft and the pending token: the default request's widest verify
