"""--max-queue bounds the requests in flight: the overflow gets 503, the rest their full answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import ServerProcess, build_model_dir


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    # A model big enough that one 400-token request outlasts the arrival of the other clients.
    model = build_model_dir(tmp_path_factory.mktemp("bound") / "slower", max_seq_len=512, hidden_size=256, num_layers=4)
    with ServerProcess(
        ["--model", str(model), "--dtype", "fp32", "--cpu-threads", "1", "--max-queue", "2", "--decoding", "standard"]
    ) as process:
        yield process


def test_overflow_is_refused_with_503_and_the_server_stays_up(slow_server):
    def call(i: int) -> httpx.Response:
        body = {"prompt": f"Client {i}", "max_tokens": 400, "temperature": 0}
        return httpx.post(f"{slow_server.url}/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    assert codes.count(200) >= 2
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "server_error"
            assert "busy" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{slow_server.url}/health", timeout=10).text == "ok"
    ok = httpx.post(f"{slow_server.url}/v1/completions", json={"prompt": "Again", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
