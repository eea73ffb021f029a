"""The session store's backends behind one interface (memory, a directory, a real Redis), and
the codec of what they hold: checksummed blobs and manifests."""

import time

import pytest
import torch

from engine.store.backend import BackendError, open_backend
from engine.store.codec import IntegrityError, Manifest, decode_blob, encode_blob
from tests.redis_helpers import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "file", "redis"])
def backend(request, tmp_path):
    if request.param == "redis":
        b = open_backend(request.getfixturevalue("redis_url"))
        b.client.flushdb()
    else:
        b = open_backend(str(tmp_path / "store") if request.param == "file" else "")
    yield b
    b.close()


def test_values_put_get_delete_list(backend):
    assert backend.get("block", "k1") is None
    backend.put("manifest", "s1", b"one")
    backend.put("manifest", "s1", b"two")          # replaced
    assert backend.put_new("block", "k1", b"abc")
    assert not backend.put_new("block", "k1", b"xyz")  # the first writer wins
    backend.barrier()
    assert backend.get("manifest", "s1") == b"two" and backend.get("block", "k1") == b"abc"
    assert backend.touch("block", "k1") and not backend.touch("block", "nope")
    assert {k: s.size for k, s in backend.list("block").items()} == {"k1": 3}
    assert set(backend.list("manifest")) == {"s1"} and backend.list("slot") == {}
    backend.delete("block", "k1")
    backend.delete("block", "k1")                 # deleting twice is fine
    assert backend.get("block", "k1") is None and backend.list("block") == {}


def test_leases_exclude_other_owners_until_released_or_expired(backend):
    assert backend.acquire_lease("s", "a", 0.5)
    assert backend.acquire_lease("s", "a", 0.5)   # a renewal
    assert not backend.acquire_lease("s", "b", 0.5)
    backend.release_lease("s", "b")               # not b's to release
    assert not backend.acquire_lease("s", "b", 0.5)
    backend.release_lease("s", "a")
    assert backend.acquire_lease("s", "b", 0.3)
    time.sleep(0.5)
    assert backend.acquire_lease("s", "a", 0.5)   # b's ran out


def test_bad_store_specs_are_clear_errors(tmp_path):
    with pytest.raises(BackendError, match="use a directory"):
        open_backend("s3://bucket")
    with pytest.raises(BackendError, match="redis://127.0.0.1:1/0"):
        open_backend("redis://127.0.0.1:1/0")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BackendError, match="cannot be created"):
        open_backend(str(tmp_path / "file" / "store"))


def test_blobs_detect_damage_and_misplacement():
    tensors = {"ckpt": torch.randn(2, 3, 4), "summary": torch.randn(2, 3)}
    blob = encode_blob(tensors, {"kind": "block", "key": "k"})
    back = decode_blob(blob, {"kind": "block", "key": "k"})
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    cases = {"checksum": bytes(flipped), "truncated": blob[:20], "missing": None}
    for kind, data in cases.items():
        with pytest.raises(IntegrityError) as err:
            decode_blob(data, {"kind": "block", "key": "k"})
        assert err.value.kind == kind
    with pytest.raises(IntegrityError) as err:
        decode_blob(blob, {"kind": "block", "key": "other"})
    assert err.value.kind == "mismatch"


def test_manifests_round_trip_and_detect_damage():
    m = Manifest("s", "fp", "fp32", [1, 2, 70000], ["b0"], "s.x", 123, 1.0, 2.0)
    data = m.encode()
    assert Manifest.decode(data, "s") == m
    with pytest.raises(IntegrityError, match="checksum"):
        Manifest.decode(data.replace(b'"fp32"', b'"bf16"'), "s")
    with pytest.raises(IntegrityError) as err:
        Manifest.decode(data[:-10], "s")
    assert err.value.kind == "truncated"
    with pytest.raises(IntegrityError) as err:
        Manifest.decode(data, "t")  # a manifest found under another session's name
    assert err.value.kind == "format"


def test_the_lease_owner_is_readable_until_expiry(backend):
    assert backend.lease_owner("s") is None
    backend.acquire_lease("s", "a", 0.3)
    assert backend.lease_owner("s") == "a"
    time.sleep(0.5)
    assert backend.lease_owner("s") is None


def test_a_renewal_never_brings_back_a_lease_that_ran_out_or_was_taken(backend):
    assert backend.acquire_lease("s", "a", 0.3)
    assert backend.renew_lease("s", "a", 0.3)
    assert not backend.renew_lease("s", "b", 0.3)      # not b's
    time.sleep(0.5)
    assert not backend.renew_lease("s", "a", 0.3)      # ran out: lost, not re-created
    assert backend.lease_owner("s") is None
    assert backend.acquire_lease("s", "b", 5)
    assert not backend.renew_lease("s", "a", 5) and backend.lease_owner("s") == "b"


def test_a_fenced_put_lands_only_under_its_owners_lease(backend):
    assert not backend.put_fenced("manifest", "s", b"x", "s", "a")  # no lease at all
    assert backend.get("manifest", "s") is None
    backend.acquire_lease("s", "a", 0.3)
    assert backend.put_fenced("manifest", "s", b"from a", "s", "a")
    time.sleep(0.5)
    backend.acquire_lease("s", "b", 5)                  # a stalled past its lease; b took over
    assert backend.put_fenced("manifest", "s", b"from b", "s", "b")
    assert not backend.put_fenced("manifest", "s", b"stale a", "s", "a")
    assert backend.get("manifest", "s") == b"from b"


def test_delete_if_idle_spares_what_was_touched_lately(backend):
    backend.put("block", "old", b"1")
    backend.put("block", "new", b"2")
    time.sleep(1.1)
    assert backend.get("block", "old") == b"1" and "old" in backend.list("block")  # reads are not uses
    assert backend.list("block")["old"].age_s >= 1.0
    assert backend.touch("block", "new")
    assert backend.delete_if_idle("block", "old", 1.0)
    assert not backend.delete_if_idle("block", "new", 1.0)
    assert not backend.delete_if_idle("block", "gone", 0.0)
    assert backend.get("block", "old") is None and backend.get("block", "new") == b"2"
    assert backend.delete_if_idle("block", "new", 0.0)
    assert backend.list("block") == {}
