"""What the session store holds, as bytes: checksummed blobs of tensors, and session manifests.

A blob (a checkpoint block, or a session's online slot) is
    MAGIC (8 bytes) | sha256 of the payload (32 bytes) | payload (safetensors bytes)
and its safetensors metadata names what it is (kind, key, fingerprint), so a blob that is
truncated, flipped, or found under the wrong key fails its checks instead of being used.

A manifest is the small JSON record of one session: its token ids (uint32, base64), the ordered
keys of its checkpoint blocks, the key of its online slot (null when it has none), the model
fingerprint and checkpoint dtype, and a sha256 over all of that.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from array import array
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

MAGIC = b"MCBLOB1\n"
MANIFEST_FORMAT = "mcserve.session.v2"


class IntegrityError(ValueError):
    """Stored bytes that fail their checks; `kind` says how (missing, truncated, checksum,
    format, mismatch), for the integrity-error counter."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def encode_blob(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    payload = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode_blob(data: bytes | None, expect: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a blob, after checking its framing, checksum and that its metadata has
    every `expect`ed value. Raises IntegrityError."""
    what = expect.get("key", "blob")
    if data is None:
        raise IntegrityError(f"{what} is missing", "missing")
    if len(data) < len(MAGIC) + 32 or data[:len(MAGIC)] != MAGIC:
        raise IntegrityError(f"{what} is truncated or not a blob", "truncated")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise IntegrityError(f"{what} fails its checksum", "checksum")
    meta = _safetensors_metadata(payload)
    wrong = {k: (v, meta.get(k)) for k, v in expect.items() if meta.get(k) != v}
    if wrong:
        raise IntegrityError(f"{what} is not what its key says ({wrong})", "mismatch")
    return load_safetensors(payload)


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8:8 + n]).get("__metadata__") or {}


@dataclass
class Manifest:
    session_id: str
    fingerprint: str
    ckpt_dtype: str
    tokens: list[int]
    blocks: list[str]                 # block keys, in order: block i covers tokens[:(i+1) * segment]
    slot: str | None                  # the online slot's key; None: resume from the last block
    logical_bytes: int                # the session's size were nothing shared
    created: float
    updated: float
    format: str = MANIFEST_FORMAT
    extra: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        body = asdict(self)
        body["tokens"] = base64.b64encode(array("I", self.tokens).tobytes()).decode()
        body["num_tokens"] = len(self.tokens)
        body["checksum"] = _digest(body)
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | None, session_id: str) -> "Manifest":
        """Raises IntegrityError for bytes that are not a whole, unaltered manifest of `session_id`."""
        if data is None:
            raise IntegrityError(f"the manifest of session {session_id!r} is missing", "missing")
        try:
            body = json.loads(data)
            checksum = body.pop("checksum")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError(f"the manifest of session {session_id!r} is truncated or not JSON",
                                 "truncated") from None
        if checksum != _digest(body):
            raise IntegrityError(f"the manifest of session {session_id!r} fails its checksum", "checksum")
        if body.get("format") != MANIFEST_FORMAT or body.get("session_id") != session_id:
            raise IntegrityError(f"the manifest of session {session_id!r} has format {body.get('format')!r} "
                                 f"for session {body.get('session_id')!r}", "format")
        tokens = array("I")
        tokens.frombytes(base64.b64decode(body.pop("tokens")))
        body.pop("num_tokens", None)
        return cls(tokens=tokens.tolist(), **body)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
