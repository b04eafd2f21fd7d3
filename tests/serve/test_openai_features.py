"""OpenAI features evaluation clients rely on, through the official openai client and raw HTTP:
prompt lists, n, echo, logprobs, chat logprobs, include_usage, tokenizer endpoints, /metrics."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from recyclegpt.core import RecycleGPT

from .conftest import ServerProcess

API_KEY = "feature-key"
MODES = ("standard", "alternating", "speculative")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerProcess(
        ["--model", str(tiny_model_dir), "--dtype", "fp32", "--cpu-threads", "1", "--max-tokens-limit", "64"],
        api_key=API_KEY,
        env={"RECYCLEGPT_API_KEY": API_KEY},
    ) as process:
        yield process


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return RecycleGPT.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def reference_logprobs(model: RecycleGPT, ids: list[int]) -> torch.Tensor:
    """log p(x[t] | x[<t]) for t >= 1, computed directly with the full model in fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return logits[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))[:, 0]


def test_echoed_prompt_logprobs_equal_the_full_models_own(client, model):
    text = "Once upon a time there was a girl named Lily who loved to paint."
    ids = model.tokenizer(text)["input_ids"]
    answer = client.completions.create(
        model="tiny-recyclegpt", prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].text.startswith(text)
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    served = torch.tensor(logprobs.token_logprobs[1 : len(ids)])
    assert torch.allclose(served, reference_logprobs(model, ids), atol=1e-4)
    # the generated token: greedy, so it is the top-1 alternative and its logprob is the best one
    last_top = logprobs.top_logprobs[-1]
    assert math.isclose(logprobs.token_logprobs[-1], max(last_top.values()), abs_tol=1e-6)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


@pytest.mark.parametrize("decoding", MODES)
def test_completion_logprobs_are_the_full_models_in_every_mode(client, model, decoding):
    answer = client.completions.create(
        model="tiny-recyclegpt",
        prompt="The little robot",
        max_tokens=12,
        temperature=0,
        logprobs=3,
        extra_body={"decoding": decoding},
    )
    choice = answer.choices[0]
    prompt_ids = model.tokenizer("The little robot")["input_ids"]
    new_ids = model.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
    assert len(choice.logprobs.tokens) == answer.usage.completion_tokens
    assert "".join(choice.logprobs.tokens) == choice.text
    if new_ids and len(new_ids) == answer.usage.completion_tokens:  # the text re-tokenises the same way
        expected = reference_logprobs(model, prompt_ids + new_ids)[len(prompt_ids) - 1 :]
        assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs), expected, atol=1e-4)
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)


def test_token_id_prompt_lists_give_one_indexed_choice_each(client, model):
    prompts = [model.tokenizer(p)["input_ids"] for p in ("Her mother smiled", "Tom the cat", "To be, or not")]
    batch = client.completions.create(model="tiny-recyclegpt", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for ids, choice in zip(prompts, batch.choices, strict=True):
        alone = client.completions.create(model="tiny-recyclegpt", prompt=ids, max_tokens=6, temperature=0)
        assert choice.text == alone.choices[0].text
    assert batch.usage.prompt_tokens == sum(len(p) for p in prompts)
    strings = client.completions.create(
        model="tiny-recyclegpt", prompt=["Her mother smiled", "Tom the cat"], max_tokens=6, temperature=0
    )
    assert [c.text for c in strings.choices] == [c.text for c in batch.choices[:2]]


def test_loglikelihood_request_as_lm_eval_sends_it(server, model):
    """lm-evaluation-harness local-completions: token-id lists, echo, logprobs 1, max_tokens 1 (and 0)."""
    contexts = [model.tokenizer(t)["input_ids"] for t in ("The little robot walked", "Mom, look! she said")]
    for max_tokens in (1, 0):
        body = {"prompt": contexts, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60)
        assert response.status_code == 200, response.text
        for choice, ids in zip(sorted(response.json()["choices"], key=lambda c: c["index"]), contexts, strict=True):
            logprobs = choice["logprobs"]
            assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens
            expected = reference_logprobs(model, ids)
            assert torch.allclose(torch.tensor(logprobs["token_logprobs"][1 : len(ids)]), expected, atol=1e-4)
            assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])


def test_n_choices_and_include_usage_when_streaming(client):
    args = dict(model="tiny-recyclegpt", prompt="Once upon", max_tokens=8, temperature=1.0, seed=3, n=3)
    answer = client.completions.create(**args)
    assert sorted(c.index for c in answer.choices) == [0, 1, 2]
    assert len({c.text for c in answer.choices}) > 1  # different seeds per choice
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(3)}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[i] for i in range(3)] == [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_chat_logprobs_and_top_logprobs(client):
    args = dict(
        model="tiny-recyclegpt", messages=[{"role": "user", "content": "Tell me about Tom."}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"decoding": "standard"},
    )  # fmt: skip
    answer = client.chat.completions.create(**args)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2 and token.logprob <= 0
        # greedy standard decoding picks the full model's best token (alternating's module tokens need not)
        assert math.isclose(token.logprob, token.top_logprobs[0].logprob, abs_tol=1e-6)
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    plain = client.chat.completions.create(**{**args, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_tokenizer_endpoints_round_trip(server, model):
    headers = server.headers
    info = httpx.get(f"{server.url}/tokenizer_info", headers=headers, timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 128 and info["chat_template"]
    text = "Ünïcödé café and 東京"
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text}, headers=headers, timeout=10).json()
    assert tokens["tokens"] == model.tokenizer(text)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}, headers=headers, timeout=10)
    assert back.json()["prompt"] == text
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}, headers=headers, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}, timeout=10).status_code == 401


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"
    )


def test_metrics_move_with_traffic(server, client):
    before = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10).text
    client.completions.create(
        model="tiny-recyclegpt",
        prompt="The robot",
        max_tokens=10,
        temperature=0,
        extra_body={"decoding": "speculative", "draft_policy": "fixed"},  # an untrained module: make it draft
    )
    httpx.post(f"{server.url}/v1/completions", json={"prompt": ""}, headers=server.headers, timeout=10)
    after = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10)
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name, least in [
        ("recyclegpt:generation_tokens_total", 1),
        ("recyclegpt:prompt_tokens_total", 1),
        ("recyclegpt:time_to_first_token_seconds_count", 1),
        ("recyclegpt:e2e_request_latency_seconds_count", 1),
        ("recyclegpt:spec_decode_num_drafts_total", 1),
        ("recyclegpt:spec_decode_num_draft_tokens_total", 1),
    ]:
        assert _metric(text, name) - _metric(before, name) >= least, name
    assert 'recyclegpt:requests_total{endpoint="completions",status="200"}' in text
    assert 'recyclegpt:requests_total{endpoint="completions",status="400"}' in text
    assert "recyclegpt:spec_decode_num_accepted_tokens_total" in text
    assert "recyclegpt:spec_decode_num_accepted_tokens_per_pos_total" in text
    assert "recyclegpt:num_requests_running" in text and "recyclegpt:num_requests_waiting" in text
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401
