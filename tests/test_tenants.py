"""Tenants: keys map to tenants, a tenant sees only its own sessions and stored responses (another's
answer 404), and each tenant has its own limit on requests in flight."""

import subprocess
import sys

import httpx
import pytest

from server.config import ServerConfig
from server.tenants import UNNAMED, Tenant, TenantConfigError, TenantDirectory, read_keys_file
from tests.server_helpers import MODEL_NAME, running_server, save_tiny_model

ALICE, BOB = {"Authorization": "Bearer alice-key-1"}, {"Authorization": "Bearer bob-key-1"}


def keys_file(tmp_path, text="# key tenant\nalice-key-1 alice\nalice-key-2 alice  # rotated\n\nbob-key-1 bob\n"):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return path


# --- the directory, without a server ---------------------------------------------------------
def test_keys_file_maps_keys_to_tenants(tmp_path):
    tenants = TenantDirectory.from_config("admin-key", str(keys_file(tmp_path)))
    assert tenants.authenticate(b"Bearer alice-key-1") == tenants.authenticate(b"Bearer alice-key-2") == Tenant("alice")
    assert tenants.authenticate(b"bearer bob-key-1") == Tenant("bob")
    assert tenants.authenticate(b"Bearer admin-key") == UNNAMED
    for wrong in (b"", b"Bearer", b"Bearer alice-key-", b"Basic alice-key-1", b"Bearer alice-key-1x"):
        assert tenants.authenticate(wrong) is None
    assert TenantDirectory.from_config("", "").authenticate(b"") == UNNAMED  # no keys: open


@pytest.mark.parametrize("text,message", [
    ("k1 alice\nk2\n", "line 2: expected 'KEY TENANT', got 1 fields"),
    ("k1 alice extra\n", "line 1: expected 'KEY TENANT', got 3 fields"),
    ("k1 alice\nk1 bob\n", "line 2: this key is given twice"),
    ("k1 al~ice\n", "tenant names are 1-64 letters"),
    ("# nothing\n", "holds no keys"),
])
def test_bad_keys_files_are_one_clear_error_without_the_key(tmp_path, text, message):
    with pytest.raises(TenantConfigError, match=message) as error:
        read_keys_file(keys_file(tmp_path, text))
    assert "k1" not in str(error.value)


def test_the_api_key_is_neither_in_the_keys_file_nor_printed(tmp_path):
    with pytest.raises(TenantConfigError, match="also a key"):
        TenantDirectory.from_config("alice-key-1", str(keys_file(tmp_path)))
    assert "sekret" not in repr(ServerConfig(api_key="sekret"))


def test_store_ids_keep_tenants_apart():
    alice = Tenant("alice")
    assert alice.store_id("chat") == "alice~chat" and alice.public_id("alice~chat") == "chat"
    assert alice.public_id("bob~chat") is None and alice.public_id("chat") is None
    assert Tenant("al").public_id("alice~chat") is None
    assert UNNAMED.store_id("chat") == "chat" and UNNAMED.public_id("chat") == "chat"
    assert UNNAMED.public_id("alice~chat") is None


def test_a_bad_keys_file_stops_serve_before_the_model_loads(tmp_path):
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--api-keys-file", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("mcserve serve: error: cannot read --api-keys-file")


# --- on a server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    model_dir = save_tiny_model(root)
    with running_server(model_dir, root / "sessions", api_keys_file=str(keys_file(root)),
                        max_concurrent_per_tenant=1) as (url, _):
        yield url


def chat(url, headers, session_id, content="Hello there", max_tokens=4, **extra):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "session_id": session_id, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_a_tenant_cannot_see_resume_or_delete_anothers_session(server):
    first = chat(server, ALICE, "plans", "A long enough first message to fill a few segments")
    assert first.status_code == 200 and first.headers["x-session-id"] == "plans"
    mine = httpx.get(server + "/v1/sessions/plans", headers=ALICE).json()
    assert mine["id"] == "plans" and mine["tokens"] > 0
    assert [s["id"] for s in httpx.get(server + "/v1/sessions", headers=ALICE).json()["data"]] == ["plans"]

    assert httpx.get(server + "/v1/sessions/plans", headers=BOB).status_code == 404
    assert httpx.get(server + "/v1/sessions", headers=BOB).json()["data"] == []
    assert httpx.delete(server + "/v1/sessions/plans", headers=BOB).status_code == 404
    # Bob naming the same id gets a session of his own, started from nothing: not even the
    # prefix cache gives him Alice's prompt (it is salted by tenant), while it gives Alice hers.
    resumed = chat(server, BOB, "plans", "A long enough first message to fill a few segments")
    assert resumed.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = chat(server, ALICE, None, "A long enough first message to fill a few segments")
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert httpx.get(server + "/v1/sessions/plans", headers=ALICE).json() == mine  # untouched
    assert httpx.delete(server + "/v1/sessions/plans", headers=BOB).status_code == 200
    assert httpx.get(server + "/v1/sessions/plans", headers=ALICE).status_code == 200
    # The store's form of another tenant's id is not a name a client may use.
    assert httpx.get(server + "/v1/sessions/alice~plans", headers=BOB).status_code == 400
    assert chat(server, BOB, "alice~plans").status_code == 400


def test_a_tenant_cannot_read_or_continue_anothers_stored_response(server):
    body = {"model": MODEL_NAME, "input": "Remember this", "max_output_tokens": 3}
    response = httpx.post(server + "/v1/responses", json=body, headers=ALICE, timeout=60).json()
    assert httpx.get(server + f"/v1/responses/{response['id']}", headers=ALICE).status_code == 200
    assert httpx.get(server + f"/v1/responses/{response['id']}", headers=BOB).status_code == 404
    follow = {**body, "previous_response_id": response["id"]}
    assert httpx.post(server + "/v1/responses", json=follow, headers=BOB, timeout=60).status_code == 404
    assert httpx.post(server + "/v1/responses", json=follow, headers=ALICE, timeout=60).status_code == 200


def test_each_tenant_has_its_own_limit_on_requests_in_flight(server):
    long = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Go"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=long, headers=ALICE, timeout=60) as s:
        lines = s.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)
        refused = chat(server, ALICE, "second")
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_concurrent_requests"
        assert chat(server, BOB, "other").status_code == 200  # another tenant is not held up
    assert chat(server, ALICE, "second").status_code == 200  # the stream ended: room again


def test_wrong_and_missing_keys_are_401_and_the_key_is_not_echoed(server):
    for headers in ({}, {"Authorization": "Bearer alice-key-"}, {"Authorization": "alice-key-1"}):
        answer = chat(server, headers, "x")
        assert answer.status_code == 401 and "alice-key" not in answer.text
    assert httpx.get(server + "/health").status_code == 200  # probes need no key
