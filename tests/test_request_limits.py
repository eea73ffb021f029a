"""Every size a request can have is bounded, and a request over a bound gets a 413 or a 400 that
names the limit: body bytes (declared or chunked), messages, stop strings, n, seeds."""

import httpx
import pytest

from server.protocol import MAX_MESSAGES, MAX_N, MAX_STOP, MAX_STOP_CHARS
from tests.server_helpers import MODEL_NAME, running_server, save_tiny_model

LIMIT = 256 << 10
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    with running_server(save_tiny_model(root), max_request_body_bytes=LIMIT) as (url, _):
        yield url


def refused(response, status, *words):
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message
    return response.json()["error"]


def test_a_body_over_the_limit_is_413_whether_declared_or_chunked(server):
    big = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * LIMIT}]}
    declared = httpx.post(server + "/v1/chat/completions", json=big)
    assert refused(declared, 413, str(LIMIT), "--max-request-body-bytes")["code"] == "request_too_large"

    def chunks():  # no Content-Length: the server counts as it reads
        for _ in range(LIMIT // 1024 + 2):
            yield b" " * 1024
    chunked = httpx.post(server + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    refused(chunked, 413, str(LIMIT))
    small = {"model": MODEL_NAME, "messages": USER, "max_tokens": 2}
    assert httpx.post(server + "/v1/chat/completions", json=small).status_code == 200  # served as before


@pytest.mark.parametrize("extra,param,words", [
    ({"messages": USER * (MAX_MESSAGES + 1)}, "messages", [str(MAX_MESSAGES)]),
    ({"stop": [f"s{i}" for i in range(MAX_STOP + 1)]}, "stop", [str(MAX_STOP)]),
    ({"stop": "s" * (MAX_STOP_CHARS + 1)}, "stop", [str(MAX_STOP_CHARS)]),
    ({"n": MAX_N + 1}, "n", [str(MAX_N)]),
    ({"seed": 2**64}, None, ["seed", "64-bit"]),
])
def test_sizes_over_their_limits_are_400_naming_the_limit(server, extra, param, words):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 2, **extra}
    error = refused(httpx.post(server + "/v1/chat/completions", json=body), 400, *words)
    assert param is None or error["param"] == param


def test_responses_input_is_bounded_too(server):
    body = {"model": MODEL_NAME, "input": USER * (MAX_MESSAGES + 1), "max_output_tokens": 2}
    refused(httpx.post(server + "/v1/responses", json=body), 400, str(MAX_MESSAGES))
