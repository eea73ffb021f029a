"""Faults injected into a real `mcserve serve` process: a full disk under the session store, a
read-only store, corrupted and truncated session files, SIGTERM with streams in flight, and
clients that hold connections open and send nothing. In each, /health says what is wrong, what
does not need the broken part is still served, and nothing corrupt is ever served: a resumed
session answers exactly as the same conversation read from scratch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from tests.server_helpers import MODEL_NAME, ServerProcess, save_tiny_model

PROMPT = "Tell me about the sea, the ships on it and the light on the water. "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def serve(model_dir, tmp_path):
    started: list[ServerProcess] = []

    def start(*options: str) -> ServerProcess:
        server = ServerProcess(model_dir, tmp_path / f"server{len(started)}.log", *options)
        started.append(server)
        return server.start()
    yield start
    for server in started:
        server.stop()


def complete(url, prompt=PROMPT, session=None, max_tokens=6, timeout=60) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    if session is not None:
        body["session_id"] = session
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def cached(response: httpx.Response) -> int:
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def health(url) -> dict:
    return httpx.get(url + "/health").json()


def assert_exact_resume(url, session, prompt):
    """The session's next turn answers as the same prompt read from scratch (greedy)."""
    resumed = complete(url, prompt, session)
    assert text_of(resumed) == text_of(complete(url, prompt))
    return resumed


@contextlib.contextmanager
def mounted_tmpfs(path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory) -> None:
    """Write until the filesystem says it is full."""
    with open(directory / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()


# --- a full disk -----------------------------------------------------------------------------
@contextlib.contextmanager
def disk_that_fills(how: str, store, server_pid=lambda: None):
    """`fill()` and `free()` a disk under the store: a small tmpfs, or (where mounting is not
    allowed) a file-size limit on the server process, under which every write fails alike."""
    import resource
    if how == "tmpfs":
        with mounted_tmpfs(store, "16m") as ok:
            if not ok:
                pytest.skip("mounting a tmpfs is not allowed here; the file-size limit covers a full disk")
            yield (lambda: fill(store)), (lambda: (store / "filler").unlink())
        return
    store.mkdir(parents=True, exist_ok=True)
    limit = lambda soft: resource.prlimit(server_pid(), resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))
    yield (lambda: limit(1)), (lambda: limit(resource.RLIM_INFINITY))


@pytest.mark.parametrize("how", ["tmpfs", "file_size_limit"])
def test_a_full_disk_degrades_sessions_and_recovers_when_space_returns(serve, tmp_path, how):
    store, started = tmp_path / "store", []
    with disk_that_fills(how, store, lambda: started[0].proc.pid) as (fill_up, free):
        server = serve("--session-store", str(store))
        started.append(server)
        first = complete(server.url, PROMPT, "sea")
        saved_tokens = httpx.get(server.url + "/v1/sessions/sea").json()["tokens"]
        assert health(server.url)["status"] == "ok"
        fill_up()
        second_prompt = PROMPT + text_of(first) + " And then?"
        during = complete(server.url, second_prompt, "sea")  # its lease cannot be written: refused, not wrong
        assert during.status_code == 503 and during.headers["retry-after"], during.text
        assert during.json()["error"]["code"] == "session_unavailable"
        report = health(server.url)
        assert report["status"] == "degraded" and report["session_store"]["unavailable"], report
        assert text_of(complete(server.url, "No session here. "))  # served without the store
        assert httpx.get(server.url + "/v1/sessions/sea").json()["tokens"] == saved_tokens  # still the durable turn
        free()
        assert complete(server.url, PROMPT, "land").status_code == 200
        assert health(server.url)["status"] == "ok"
        resumed = assert_exact_resume(server.url, "sea", second_prompt + " Go on.")
        assert cached(resumed) >= saved_tokens // 8 * 8 - 8  # from the last durable turn at least


# --- a read-only store ------------------------------------------------------------------------
def test_a_read_only_store_serves_without_sessions_and_says_so(serve, tmp_path):
    store = tmp_path / "store"
    with mounted_tmpfs(store, "16m") as on_tmpfs:
        server = serve("--session-store", str(store))
        first = complete(server.url, PROMPT, "kept")
        follow = PROMPT + text_of(first) + " More."
        server.stop()
        if on_tmpfs:
            subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
        elif os.geteuid() != 0:
            for d in [store, *[p for p in store.rglob("*") if p.is_dir()]]:
                d.chmod(0o555)
        else:
            pytest.skip("root without mount: no way to make a directory read-only here")
        server = serve("--session-store", str(store))  # starts on a store it cannot write
        answer = complete(server.url, follow, "kept")  # its lease cannot be written: refused, not wrong
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "session_unavailable", answer.text
        assert httpx.get(server.url + "/v1/sessions/kept").json()["tokens"] > 0  # still readable
        report = health(server.url)
        assert report["status"] == "degraded", report
        assert "Read-only" in json.dumps(report) or "ermission" in json.dumps(report), report
        assert text_of(complete(server.url, "No session here. "))  # generation is unaffected
        server.stop()
        if on_tmpfs:
            subprocess.run(["mount", "-o", "remount,rw", str(store)], check=True)
        server = serve("--session-store", str(store))
        assert_exact_resume(server.url, "kept", follow)  # writable again: the session is intact


# --- corrupted and truncated files -----------------------------------------------------------
@pytest.mark.parametrize("damage", ["flipped_block", "truncated_manifest", "truncated_slot", "garbage_manifest"])
def test_damaged_session_files_are_never_served(serve, tmp_path, damage):
    store = tmp_path / "store"
    server = serve("--session-store", str(store))
    long_prompt = PROMPT * 3
    first = complete(server.url, long_prompt, "hurt")
    complete(server.url, "Another conversation entirely. " * 3, "whole")
    follow = long_prompt + text_of(first) + " Again."
    server.stop()
    what, where = damage.split("_")[1], {"block": "blocks", "manifest": "manifests", "slot": "slots"}
    files = sorted(p for p in (store / where[what]).rglob("*") if p.is_file() and not p.name.startswith("."))
    target = next(p for p in files if what != "manifest" or p.stem == "hurt")
    data = bytearray(target.read_bytes())
    if damage.startswith("flipped"):
        data[len(data) // 2] ^= 0xFF
    elif damage.startswith("truncated"):
        data = data[: len(data) // 3]
    else:
        data = bytearray(os.urandom(len(data)))
    target.write_bytes(bytes(data))

    server = serve("--session-store", str(store))
    assert_exact_resume(server.url, "hurt", follow)  # from the longest good prefix, or from scratch
    assert_exact_resume(server.url, "whole", "Another conversation entirely. " * 3 + " Yes.")
    report = health(server.url)
    assert report["status"] == "ok" and sum(report["session_store"]["integrity_errors"].values()) >= 1, report


# --- SIGTERM with streams in flight ------------------------------------------------------------
def test_sigterm_with_streams_in_flight_ends_every_stream_and_saves_every_session(serve, tmp_path):
    store = tmp_path / "store"
    server = serve("--session-store", str(store), "--shutdown-grace-s", "1")
    streams, lines = [], []
    with contextlib.ExitStack() as stack:
        for i in range(6):
            body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5000, "ignore_eos": True, "stream": True,
                    **({"session_id": f"live-{i}"} if i % 2 == 0 else {})}
            s = stack.enter_context(httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60))
            it = s.iter_lines()
            next(it)
            streams.append(it)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # uvicorn stops listening at once; a probe that still gets through hears 503.
        with contextlib.suppress(httpx.ConnectError):
            drain = httpx.get(server.url + "/health")
            assert drain.status_code == 503 and drain.json()["error"]["code"] == "shutting_down"
        for it in streams:
            lines.append(list(it))
    assert all("data: [DONE]" in rest for rest in lines)
    assert all(any('"finish_reason":"abort"' in line for line in rest) for rest in lines)
    assert server.proc.wait(timeout=60) == 0
    server = serve("--session-store", str(store))
    for i in range(0, 6, 2):
        assert httpx.get(server.url + f"/v1/sessions/live-{i}").json()["tokens"] > len(PROMPT)


# --- connections that send nothing ---------------------------------------------------------------
def test_idle_and_trickling_connections_are_cut_and_bounded(serve):
    server = serve("--request-timeout-s", "2", "--max-connections", "64")
    before = open_fds(server)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    trickle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    for s in trickle:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        assert text_of(complete(server.url, timeout=30))  # under the cap: a real client is served beside them
        over = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        assert sum(closed(s, wait=1) for s in over) >= 40 - (64 - 50)  # past the cap: closed at once
        started = time.monotonic()
        while time.monotonic() - started < 20 and open_fds(server) > before + 4:
            for s in trickle:
                with contextlib.suppress(OSError):
                    s.sendall(b"X")  # a byte a second does not keep a connection past its deadline
            time.sleep(1)
        assert open_fds(server) <= before + 4, "idle connections were not closed"
        assert all(closed(s) for s in idle + trickle + over)
        assert text_of(complete(server.url, timeout=30))
        assert health(server.url)["status"] == "ok"
    finally:
        for s in idle + trickle + locals().get("over", []):
            s.close()


def test_clients_that_never_read_their_streams_hold_only_their_requests(serve):
    server = serve("--max-queued-requests", "16")
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    request = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(json.dumps(body))}\r\n\r\n{json.dumps(body)}").encode()
    readers_that_never_read = []
    for _ in range(12):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(request)
        readers_that_never_read.append(s)
    try:
        assert text_of(complete(server.url, timeout=60))  # served beside them
        assert health(server.url)["status"] == "ok"
    finally:
        for s in readers_that_never_read:
            s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and running(server) > 0:
        time.sleep(0.2)
    assert running(server) == 0  # their requests ended with their connections


# --- helpers -----------------------------------------------------------------------------------
def open_fds(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def closed(s: socket.socket, wait: float = 5) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def running(server: ServerProcess) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("mcserve:num_requests_running "):
            return float(line.split()[1])
    raise AssertionError("no mcserve:num_requests_running")
