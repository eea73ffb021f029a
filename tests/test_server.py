"""The HTTP API on a real uvicorn server: every endpoint, streaming and not, sessions across
turns and restarts, every error case, and metrics that move. Driven by httpx and by the
official openai client."""

import json
import time

import httpx
import openai
import pytest

from tests.server_helpers import MODEL_NAME, running_server, save_tiny_model


@pytest.fixture(scope="module", params=["mcserve", "mamba2", "gated_deltanet"])
def model_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models"), request.param)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("sessions"), max_prompt_tokens=400) as (url, app):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


USER = [{"role": "user", "content": "Hello there"}]


def test_health_version_models(server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    version = httpx.get(server + "/version").json()
    assert version["model"] == MODEL_NAME and len(version["fingerprint"]) == 32
    models_ = httpx.get(server + "/v1/models").json()
    assert [m["id"] for m in models_["data"]] == [MODEL_NAME]
    assert httpx.get(server + f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    missing = httpx.get(server + "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_completion_and_stream_agree(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=10, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens == 10
    assert full.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=USER, max_completion_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_chat_options_n_seed_stop_logprobs(client):
    two = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=8, n=2, seed=3,
                                         temperature=1.0)
    again = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=8, n=2, seed=3,
                                           temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stopped = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=12, temperature=0,
                                             stop=[text[3:5]])
    assert stopped.choices[0].message.content == text[:text.find(text[3:5])]
    assert stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=3, temperature=0,
                                        logprobs=True, top_logprobs=2, presence_penalty=0.5,
                                        extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1})
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_completions_and_stream(client):
    full = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=6, temperature=0,
                                     logprobs=2, echo=True)
    assert full.object == "text_completion" and full.choices[0].text.startswith("Once upon")
    assert len(full.choices[0].logprobs.tokens) == 6
    stream = list(client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=6, temperature=0,
                                            stream=True))
    assert "Once upon" + "".join(c.choices[0].text for c in stream) == full.choices[0].text


def test_sessions_across_turns_and_endpoints(client, server):
    opening = [{"role": "user", "content": "A conversation of its own"}]  # nothing cached yet
    first = client.chat.completions.create(model=MODEL_NAME, messages=opening, max_tokens=8, temperature=0,
                                           extra_body={"session_id": "conv-1"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = opening + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=8, temperature=0,
                                            extra_headers={"X-Session-Id": "conv-1"})
    fresh = client.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=8, temperature=0)
    assert second.choices[0].message.content == fresh.choices[0].message.content
    # At least every whole segment of turn 1 is reused (more when the generated tokens re-encode
    # to themselves; a random tiny model emits special tokens that do not, so the session
    # restarts from its last checkpoint before the first difference, exactly).
    assert second.usage.prompt_tokens_details.cached_tokens >= whole_segments(first.usage.prompt_tokens)
    listed = httpx.get(server + "/v1/sessions").json()["data"]
    assert "conv-1" in [s["id"] for s in listed]
    info = httpx.get(server + "/v1/sessions/conv-1").json()
    assert info["tokens"] > 0 and info["bytes"] > 0 and info["tier"] in ("memory", "store")
    assert httpx.delete(server + "/v1/sessions/conv-1").json()["deleted"] is True
    gone = httpx.get(server + "/v1/sessions/conv-1")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found"


def test_session_survives_a_server_restart(model_dir, tmp_path):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 6, "temperature": 0, "session_id": "keep"}
    with running_server(model_dir, tmp_path) as (url, _):
        first = httpx.post(url + "/v1/chat/completions", json=body).json()
    history = USER + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "More"}]
    with running_server(model_dir, tmp_path) as (url, _):
        second = httpx.post(url + "/v1/chat/completions", json={**body, "messages": history}).json()
        fresh = httpx.post(url + "/v1/chat/completions",
                           json={**body, "messages": history, "session_id": None}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= whole_segments(first["usage"]["prompt_tokens"])
    assert second["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]


def test_a_turn_that_could_not_be_saved_is_answered_and_health_says_degraded(model_dir, tmp_path):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "stuck.json").mkdir()  # the manifest's rename onto it fails
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 3, "session_id": "stuck"}
    with running_server(model_dir, tmp_path) as (url, _):
        answer = httpx.post(url + "/v1/chat/completions", json=body)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
        health = httpx.get(url + "/health").json()
        assert health["status"] == "degraded" and health["session_store"]["write_errors"] == 1
        assert "stuck" in health["session_store"]["recent_write_errors"][-1]
        assert metric(httpx.get(url + "/metrics").text, "mcserve:session_write_errors_total") == 1
        saved = httpx.post(url + "/v1/chat/completions", json={**body, "session_id": "fine"})
        assert saved.status_code == 200  # a turn that lands again: healthy, the error still counted
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok" and health["session_store"]["write_errors"] == 1


def whole_segments(tokens, segment_size=8):
    return tokens // segment_size * segment_size


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


@pytest.mark.parametrize("payload,status,param", [
    ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": MODEL_NAME, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": USER, "temperature": 5}, 400, "temperature"),
    ({"model": MODEL_NAME, "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "messages": USER, "n": "two"}, 400, "n"),
    ({"model": "gpt-4", "messages": USER}, 404, "model"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 500}]}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": USER, "session_id": "../../etc"}, 400, "session_id"),
])
def test_bad_requests_get_openai_errors(server, payload, status, param):
    body = error_of(httpx.post(server + "/v1/chat/completions", json=payload), status)
    assert body["param"] == param


def test_malformed_json_and_unknown_session(server):
    body = error_of(httpx.post(server + "/v1/chat/completions", content=b"{not json",
                               headers={"content-type": "application/json"}), 400)
    assert body["code"] == "invalid_json"
    assert error_of(httpx.get(server + "/v1/sessions/never-made"), 404)["code"] == "session_not_found"
    assert error_of(httpx.delete(server + "/v1/sessions/never-made"), 404)["code"] == "session_not_found"


def test_busy_session_and_disconnect_abort(server):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 5000, "temperature": 0, "stream": True,
            "session_id": "busy-1", "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        busy = httpx.post(server + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert error_of(busy, 409)["code"] == "session_busy"
    # The client went away: the request is aborted, its state saved, and the session free again.
    aborted = 'mcserve:request_success_total{finished_reason="abort"}'
    for _ in range(200):
        metrics = httpx.get(server + "/metrics").text
        if "mcserve:num_requests_running 0.0" in metrics and aborted in metrics:
            break
        time.sleep(0.02)
    assert "mcserve:num_requests_running 0.0" in metrics and aborted in metrics
    again = httpx.post(server + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
    assert again.status_code == 200 and again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_api_key_and_queue_full(model_dir):
    with running_server(model_dir, api_key="sekret", max_queued_requests=1) as (url, _):
        body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 3}
        assert error_of(httpx.post(url + "/v1/chat/completions", json=body), 401)["code"] == "invalid_api_key"
        assert error_of(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=auth).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        long = {**body, "max_tokens": 5000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, headers=auth, timeout=30) as s:
            lines = s.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)
            full = httpx.post(url + "/v1/chat/completions", json=body, headers=auth)
            assert error_of(full, 429)["code"] == "queue_full" and full.headers["retry-after"] == "1"


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_metrics_move_with_requests(server, client):
    before = httpx.get(server + "/metrics").text
    client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, temperature=0,
                                   extra_body={"session_id": "metrics-1"})
    after = httpx.get(server + "/metrics").text
    assert metric(after, "mcserve:prompt_tokens_total") > metric(before, "mcserve:prompt_tokens_total")
    assert metric(after, "mcserve:generation_tokens_total") >= metric(before, "mcserve:generation_tokens_total") + 4
    ttft = "mcserve:time_to_first_token_seconds_count"
    assert metric(after, ttft) > metric(before, ttft)
    assert metric(after, "mcserve:e2e_request_latency_seconds_count") > 0
    assert metric(after, 'mcserve:sessions{tier="memory"}') >= 1
    assert metric(after, 'mcserve:checkpoint_blocks{state="free",tier="device"}') > 0
    for name in ("mcserve:num_requests_waiting", "mcserve:cached_checkpoints", "mcserve:prefix_cache_queries_total",
                 "mcserve:inter_token_latency_seconds_count", "mcserve:request_queue_time_seconds_count",
                 'mcserve:checkpoint_bytes{state="used",tier="host"}', 'mcserve:session_bytes{tier="store"}',
                 'mcserve:evictions_total{kind="checkpoint_block"}', 'mcserve:preemptions_total{kind="swap_out"}'):
        metric(after, name)
    assert json.loads(json.dumps(after)) == after  # plain text exposition


def test_a_request_longer_than_the_pool_can_hold_is_refused_at_once(model_dir):
    # the case: 600 tokens on a pool of 4 checkpoint blocks once span forever in preemptions
    with running_server(model_dir, num_device_blocks=4, num_host_blocks=2, default_max_tokens=0) as (url, _):
        card = httpx.get(url + "/v1/models").json()["data"][0]
        limit = card["max_model_len"]
        assert limit == 5 * 8 - 1  # (4 blocks + the open segment) x segment 8, less the unread last token
        started = time.monotonic()
        too_long = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 600})
        assert time.monotonic() - started < 1.0
        body = error_of(too_long, 400)
        assert body["code"] == "context_length_exceeded" and f"maximum context length is {limit}" in body["message"]
        # With no max_tokens, a request gets what is left of the limit, and finishes.
        full = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello", "ignore_eos": True},
                          timeout=60).json()
        usage = full["usage"]
        assert full["choices"][0]["finish_reason"] == "length"
        assert usage["prompt_tokens"] + usage["completion_tokens"] == limit


def test_bf16_weights_serve_and_keep_sessions_per_dtype(model_dir, tmp_path):
    """--dtype bf16: the weights are cast on load, a session resumes on the same dtype, and a
    fingerprint of its own keeps an fp32 server from reading it."""
    sessions = tmp_path / "sessions"
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 4, "temperature": 0, "session_id": "s"}
    with running_server(model_dir, sessions, dtype="bf16") as (url, app):
        assert {p.dtype.__repr__() for p in app.state.mc.engine.engine.model.parameters()} == {"torch.bfloat16"}
        first = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert first.status_code == 200, first.text
        bf16_fingerprint = httpx.get(url + "/version").json()["fingerprint"]
        history = USER + [first.json()["choices"][0]["message"], {"role": "user", "content": "more"}]
        second = httpx.post(url + "/v1/chat/completions", json={**body, "messages": history}, timeout=30)
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    with running_server(model_dir, sessions) as (url, app):
        assert httpx.get(url + "/version").json()["fingerprint"] != bf16_fingerprint
