"""The real recyclegpt-serve process, driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import ServerProcess

API_KEY = "test-key-123"
LIMIT = 64  # --max-tokens-limit; the tiny model's context is 128
MODES = ("standard", "alternating", "speculative")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerProcess(
        [
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "fp32",
            "--cpu-threads",
            "1",
            "--max-tokens-limit",
            str(LIMIT),
            "--max-queue",
            "48",
            "--decoding",
            "alternating",
            "--draft-length",
            "3",
        ],
        env={"RECYCLEGPT_API_KEY": API_KEY},  # the key from the environment; --api-key works alike
        api_key=API_KEY,
    ) as process:
        yield process


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {**server.headers, "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60, **kwargs)


def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health", headers=server.headers, timeout=10).text == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny-recyclegpt"]


@pytest.mark.parametrize("decoding", MODES)
def test_completion_streaming_matches_non_streaming(client, decoding):
    args = dict(
        model="tiny-recyclegpt",
        prompt="The little robot",
        max_tokens=48,
        temperature=0,
        extra_body={"decoding": decoding},
    )
    answer = client.completions.create(**args)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens <= 48
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    if choice.finish_reason == "length":
        assert answer.usage.completion_tokens == 48
    chunks = list(client.completions.create(**args, stream=True))
    content = [c.choices[0].text for c in chunks if c.choices[0].text]
    assert len(content) > 1  # sent as generated, not in one piece at the end
    assert "".join(content) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


@pytest.mark.parametrize("decoding", MODES)
@pytest.mark.parametrize("chat", [False, True])
def test_a_stop_sequence_cuts_streamed_and_whole_answers_alike(client, decoding, chat):
    args = dict(model="tiny-recyclegpt", max_tokens=40, temperature=1.0, seed=5, extra_body={"decoding": decoding})
    if chat:
        create, args["messages"] = client.chat.completions.create, [{"role": "user", "content": "Tell me about Tom."}]
    else:
        create, args["prompt"] = client.completions.create, "Her mother smiled"

    def text(choice) -> str:
        return (choice.delta.content or "") if chat else choice.text

    def whole(answer) -> str:
        return answer.choices[0].message.content if chat else answer.choices[0].text

    full = whole(create(**args))
    stop = full[len(full) // 3 :][:3]
    answer = create(**args, stop=[stop])
    assert whole(answer) == full[: full.index(stop)] and answer.choices[0].finish_reason == "stop"
    chunks = list(create(**args, stop=[stop], stream=True))
    assert "".join(text(c.choices[0]) for c in chunks) == whole(answer)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens < 40


def test_chat_streaming_matches_non_streaming(client):
    args = dict(
        model="tiny-recyclegpt",
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about Lily."}],
        max_completion_tokens=10,
        temperature=0,
    )
    answer = client.chat.completions.create(**args)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_raw_stream_ends_with_done(server):
    response = post(server, "/v1/completions", {"prompt": "Once upon", "max_tokens": 4, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)


def test_sampling_seed_top_p_and_stop(client):
    args = dict(prompt="Her mother smiled", max_tokens=16, temperature=1.5, top_p=0.9, seed=7)
    first = client.completions.create(model="tiny-recyclegpt", **args).choices[0].text
    assert client.completions.create(model="tiny-recyclegpt", **args).choices[0].text == first
    greedy = client.completions.create(
        model="tiny-recyclegpt", prompt="Her mother smiled", max_tokens=16, temperature=0
    )
    text = greedy.choices[0].text
    stop = text[len(text) // 2 :][:2]
    if stop.strip("\ufffd"):
        stopped = client.completions.create(
            model="tiny-recyclegpt", prompt="Her mother smiled", max_tokens=16, temperature=0, stop=[stop]
        )
        assert stopped.choices[0].text == text[: text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.usage.completion_tokens <= greedy.usage.completion_tokens


BAD_COMPLETIONS = [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "a", "max_tokens": LIMIT + 1}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({"prompt": "robot " * 200, "max_tokens": 4}, "prompt"),
    ({"prompt": "robot " * 200, "max_tokens": 4, "stream": True}, "prompt"),
    ({"prompt": "robot " * 25, "max_tokens": LIMIT}, "max_tokens"),  # about 76 + 64 tokens > 128
    ({"prompt": "a", "decoding": "beam"}, "decoding"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "draft_length": 0}, "draft_length"),
    ({"prompt": "a", "draft_length": 1000}, "draft_length"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stop": 5}, "stop"),
    ({"prompt": "a", "seed": 1.5}, "seed"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 17}, "n"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": ["a", ""]}, "prompt"),
]
BAD_CHATS = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "robot " * 200}], "stream": True}, "messages"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [("/v1/completions", b, p) for b, p in BAD_COMPLETIONS] + [("/v1/chat/completions", b, p) for b, p in BAD_CHATS],
)
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, param):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", "\udcff".encode("utf-8", "surrogatepass")])
def test_malformed_bodies(server, body):
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_unknown_model_is_404(server):
    response = post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


def test_the_server_survives_bad_requests(server, client):
    for body, _ in BAD_COMPLETIONS:
        post(server, "/v1/completions", body)
    answer = client.completions.create(model="tiny-recyclegpt", prompt="Still alive?", max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens >= 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/no-such-path"),
    ],
)
def test_requests_without_the_key_get_401(server, headers, method, path):
    response = httpx.request(method, f"{server.url}{path}", headers=headers, content=b"{bad", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_is_open_without_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server.url}/health", headers=headers, timeout=10)
        assert response.status_code == 200 and response.text == "ok"


def test_wrong_key_with_openai_client(server):
    bad = server.openai_client(api_key="nope", timeout=10)
    with pytest.raises(Exception) as err:
        bad.completions.create(model="tiny-recyclegpt", prompt="hi", max_tokens=2)
    assert getattr(err.value, "status_code", None) == 401


def _request(server, i: int) -> tuple[str, int, str]:
    """Request i of the load test: its own prompt, endpoint, decoder and streaming choice; greedy."""
    decoding = MODES[i % 3]
    body = {"max_tokens": 6 + i % 5, "temperature": 0, "decoding": decoding, "stream": i % 2 == 1}
    if i % 4 < 2:
        path, body["prompt"] = "/v1/completions", f"Robot number {i} walked to"
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"Story {i}: Lily and Tom"}]
    response = post(server, path, body)
    assert response.status_code == 200, response.text
    if not body["stream"]:
        data = response.json()
        choice = data["choices"][0]
        return (
            choice.get("text", choice.get("message", {}).get("content")),
            data["usage"]["completion_tokens"],
            choice["finish_reason"],
        )
    text, last = "", None
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            last = json.loads(line[6:])
            choice = last["choices"][0]
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
    return text, last["usage"]["completion_tokens"], last["choices"][0]["finish_reason"]


def test_32_concurrent_clients_get_what_they_get_alone(server):
    alone = [_request(server, i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda i: _request(server, i), range(32)))
    assert together == alone
    assert len({text for text, _, _ in alone}) > 1
    assert httpx.get(f"{server.url}/health", headers=server.headers, timeout=10).status_code == 200


@pytest.mark.parametrize("draft_policy", ["fixed", "tree"])
def test_speculative_draft_policies_answer_as_standard_does(client, draft_policy):
    """Greedy speculative decoding, drafting chains or trees, writes standard's text (fp32 server)."""
    args = dict(model="tiny-recyclegpt", prompt="Once upon a time", max_tokens=40, temperature=0)
    standard = client.completions.create(**args, extra_body={"decoding": "standard"})
    speculative = client.completions.create(
        **args, extra_body={"decoding": "speculative", "draft_policy": draft_policy}
    )
    assert speculative.choices[0].text == standard.choices[0].text
    assert speculative.usage.completion_tokens == standard.usage.completion_tokens
