"""Tenants: who a request is, from its API key, and which saved sessions are theirs.

`--api-keys-file` names one tenant per key (`KEY TENANT` lines; keys hold no spaces or `#`, and
a tenant may have several keys, for rotation); `--api-key` is one more key, of
the unnamed tenant, which is also who every request is on a server without keys. A named
tenant's sessions and stored responses live in the store under `TENANT~ID`; the unnamed tenant's
under their plain ids, so a store written before tenants existed stays its own. A client's ids
never contain `~`, so no tenant can name another's session: it answers 404, as if it did not
exist. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ServerConfigError

TENANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SEPARATOR = "~"


class TenantConfigError(ServerConfigError):
    pass


@dataclass(frozen=True)
class Tenant:
    name: str = ""  # "" = the unnamed tenant (--api-key, or a server without keys)

    @property
    def label(self) -> str:
        return self.name or "default"

    def store_id(self, public_id: str) -> str:
        """The id under which the store keeps this tenant's session (or response) `public_id`."""
        return f"{self.name}{SEPARATOR}{public_id}" if self.name else public_id

    def public_id(self, store_id: str) -> str | None:
        """`store_id` as this tenant knows it; None if it is not this tenant's."""
        if not self.name:
            return None if SEPARATOR in store_id else store_id
        prefix = self.name + SEPARATOR
        return store_id[len(prefix):] if store_id.startswith(prefix) else None


UNNAMED = Tenant()


class TenantDirectory:
    """API keys to tenants. Without keys, every request is the unnamed tenant."""

    def __init__(self, keys: dict[str, Tenant]):
        # Digests of equal length, compared with every key in turn: the time taken says nothing
        # about how much of a key matched, nor which key it was.
        self._keys = [(_digest(key), tenant) for key, tenant in keys.items()]

    @property
    def open(self) -> bool:
        return not self._keys

    @classmethod
    def from_config(cls, api_key: str, api_keys_file: str) -> "TenantDirectory":
        keys = read_keys_file(Path(api_keys_file)) if api_keys_file else {}
        if api_key:
            if api_key in keys:
                raise TenantConfigError("--api-key is also a key in --api-keys-file; give each key once")
            keys[api_key] = UNNAMED
        return cls(keys)

    def authenticate(self, authorization: bytes) -> Tenant | None:
        """The tenant of an `Authorization: Bearer KEY` header value; None for a wrong key."""
        if self.open:
            return UNNAMED
        scheme, _, key = authorization.partition(b" ")
        given = _digest(key.strip().decode("latin-1")) if scheme.lower() == b"bearer" else b""
        found = None
        for digest, tenant in self._keys:
            if hmac.compare_digest(given, digest):
                found = tenant
        return found


def read_keys_file(path: Path) -> dict[str, Tenant]:
    """`KEY TENANT` per line; blank lines and `#` comments are skipped. A key given twice, a
    missing or badly named tenant is an error naming the line (never the key)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise TenantConfigError(f"cannot read --api-keys-file {path}: {e.strerror or e}") from None
    keys: dict[str, Tenant] = {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"--api-keys-file {path}, line {number}"
        if len(words) != 2:
            raise TenantConfigError(f"{where}: expected 'KEY TENANT', got {len(words)} fields")
        key, name = words
        if not TENANT_NAME.match(name):
            raise TenantConfigError(f"{where}: tenant names are 1-64 letters, digits, _ or -, got {name!r}")
        if key in keys:
            raise TenantConfigError(f"{where}: this key is given twice")
        keys[key] = Tenant(name)
    if not keys:
        raise TenantConfigError(f"--api-keys-file {path} holds no keys")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
