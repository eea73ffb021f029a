"""Sessions that survive kill -9 and follow the user between replicas: real `mcserve serve`
processes on the bundled model, a real redis-server, greedy conversations compared with a server
that was never killed."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest

import models
from tests.redis_helpers import redis_server
from tests.server_helpers import ServerProcess

TEXT = (Path(__file__).resolve().parents[1] / "evals" / "data" / "haystack.txt").read_text()
MODEL = "mc-gla-grm-small"


def user_text(i: int, chars: int) -> str:
    start = (i * 7919) % (len(TEXT) - chars)
    return f"\n\nUser: {TEXT[start:start + chars]}\nAssistant:"


def turn(url: str, session: str | None, prompt: str, max_tokens: int = 8, stream: bool = False,
         timeout: float = 120) -> dict:
    """One completion; returns text and usage (streamed with include_usage when `stream`)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    if session is not None:
        body["session_id"] = session
    if not stream:
        res = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
        assert res.status_code == 200, res.text
        out = res.json()
        return {"text": out["choices"][0]["text"], "usage": out["usage"]}
    body.update(stream=True, stream_options={"include_usage": True})
    text, usage, done = "", None, False
    import json
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as res:
        assert res.status_code == 200, res.read()
        for line in res.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                usage = chunk.get("usage") or usage
    assert done
    return {"text": text, "usage": usage}


def cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def integrity_errors(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return sum(s.value for f in families if f.name == "mcserve:session_store_integrity_errors" for s in f.samples)


@pytest.fixture
def servers(tmp_path):
    started: list[ServerProcess] = []

    def make(store: str, *options: str) -> ServerProcess:
        server = ServerProcess(models.default_model_path(), tmp_path / f"server{len(started)}.log",
                               "--session-store", store, *options)
        started.append(server)
        return server
    yield make
    for server in started:
        server.stop()


def test_a_turn_survives_kill_9_right_after_its_response(servers, tmp_path):
    crashing = servers(str(tmp_path / "crashing")).start()
    steady = servers(str(tmp_path / "steady")).start()
    history = {"crashing": "", "steady": ""}
    for i, chars in enumerate([300, 300]):
        for name, server in (("crashing", crashing), ("steady", steady)):
            history[name] += user_text(i, chars)
            history[name] += turn(server.url, "conv", history[name])["text"]
    crashing.kill()          # at once: no sleep between the response and the kill
    crashing.start()
    results = {}
    for name, server in (("crashing", crashing), ("steady", steady)):
        results[name] = turn(server.url, "conv", history[name] + user_text(9, 40))
    usage = results["crashing"]["usage"]
    assert cached(usage) >= 0.8 * usage["prompt_tokens"], usage
    assert results["crashing"]["text"] == results["steady"]["text"]
    assert integrity_errors(crashing.url) == 0


def test_kill_9_at_20_random_moments_under_streaming_load(servers, tmp_path):
    """Four sessions stream turns while the server is killed 20 times. Every session whose last
    response completed resumes from the store: most of its next prompt is read from it, and its
    greedy output equals a fresh server's reading the whole prompt."""
    server = servers(str(tmp_path / "store")).start()
    rng = random.Random(0)
    sessions = {f"s{i}": "" for i in range(4)}
    completed = {sid: 0 for sid in sessions}
    stop = threading.Event()

    def client(sid: str) -> None:
        n = 0
        while not stop.is_set():
            prompt = sessions[sid] + user_text(hash(sid) % 97 + n, 60)
            try:
                out = turn(server.url, sid, prompt, max_tokens=6, stream=True, timeout=30)
            except (httpx.HTTPError, AssertionError):
                time.sleep(0.2)  # killed mid-turn (or busy while the server comes back): try again
                continue
            sessions[sid], n = prompt + out["text"], n + 1
            completed[sid] += 1

    threads = [threading.Thread(target=client, args=(sid,), daemon=True) for sid in sessions]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            time.sleep(rng.uniform(0.2, 1.5))
            server.kill()
            server.start()
            assert integrity_errors(server.url) == 0  # nothing torn or corrupt was found
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert all(n > 0 for n in completed.values()), completed
    fresh = servers(str(tmp_path / "fresh")).start()
    for sid, history in sessions.items():
        prompt = history + user_text(3, 20)
        resumed = turn(server.url, sid, prompt)
        assert cached(resumed["usage"]) >= 0.8 * resumed["usage"]["prompt_tokens"], (sid, resumed["usage"])
        assert resumed["text"] == turn(fresh.url, None, prompt)["text"], sid
    assert integrity_errors(server.url) == 0


def test_two_replicas_share_sessions_through_redis(servers, tmp_path):
    with redis_server(tmp_path) as url:
        a = servers(url).start()
        b = servers(url).start()
        one = servers(str(tmp_path / "one")).start()
        history = {"pair": "", "one": ""}
        replicas = [a, b, a, b]
        for i, replica in enumerate(replicas):
            if i == 3:
                a.kill()   # the replica of the last turn dies: the conversation goes on at b
            chars = 300 if i == 0 else 40
            history["pair"] += user_text(i, chars)
            history["one"] += user_text(i, chars)
            paired = turn(replica.url, "roam", history["pair"])
            alone = turn(one.url, "roam", history["one"])
            assert paired["text"] == alone["text"], i
            if i > 0:
                usage = paired["usage"]
                assert cached(usage) >= 0.8 * usage["prompt_tokens"], (i, usage)
            history["pair"] += paired["text"]
            history["one"] += alone["text"]
        listed = httpx.get(b.url + "/v1/sessions").json()["data"]
        assert [s["id"] for s in listed] == ["roam"]


def test_the_bytes_written_per_turn_stay_flat(servers, tmp_path):
    """A 50-turn conversation of ~300 tokens a turn: the last turn writes at most 1.5x the bytes of
    the first, by the kernel's count of the server's writes (/proc/PID/io)."""
    server = servers(str(tmp_path / "store")).start()
    history, written = "", []
    for i in range(50):
        history += user_text(i, 1200)  # ~300 tokens of the bundled model's BPE
        before = server.io()["write_bytes"]
        history += turn(server.url, "long", history, max_tokens=4)["text"]
        written.append(server.io()["write_bytes"] - before)
    print(f"\nwrite_bytes per turn: first {written[0]:,}, last {written[-1]:,}, max {max(written):,}")
    assert written[0] > 0
    assert written[-1] <= 1.5 * written[0], written
