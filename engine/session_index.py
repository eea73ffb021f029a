"""Session ids and session errors, shared by the store, the engine and the server. The store's
bookkeeping (SessionLimits, SessionEntry) lives in engine/store/index.py."""

from __future__ import annotations

import re

from .store.index import SessionEntry, SessionLimits  # noqa: F401 - re-exported for callers

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # as a client names it
# As the store keeps it: the server may put its tenant's name in front (server/tenants.py).
STORE_SESSION_ID = re.compile(r"^(?:[A-Za-z0-9_-]{1,64}~)?[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class SessionError(ValueError):
    """A session request cannot be served; `code` says why (for HTTP status mapping)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code  # invalid_id, not_found, busy, wrong_model, unavailable


def check_session_id(session_id: str, pattern: re.Pattern = STORE_SESSION_ID) -> str:
    if not isinstance(session_id, str) or not pattern.match(session_id):
        raise SessionError("session id must be 1-128 characters of letters, digits and _ . : - "
                           "(starting with a letter or digit)", "invalid_id")
    return session_id
