"""Sessions as the HTTP API shows them: ids as a tenant names them (and as the store keeps them),
session errors mapped to HTTP in this one place, and a session's card."""

from __future__ import annotations

from fastapi import Request

from engine.session_index import SESSION_ID, SessionError, check_session_id

from . import errors
from .protocol import SamplingFields
from .tenants import Tenant

SESSION_STATUS = {"busy": 409, "not_found": 404, "wrong_model": 409, "invalid_id": 400, "unavailable": 503}


def session_of(body: SamplingFields, request: Request) -> str | None:
    """The session a request names (the field, or the X-Session-Id header), as the client knows it."""
    session_id = body.session_id or request.headers.get("x-session-id")
    if session_id is not None:
        check_public_session_id(session_id)
    return session_id


def check_public_session_id(session_id: str) -> None:
    try:
        check_session_id(session_id, SESSION_ID)
    except SessionError as e:
        raise errors.APIError(400, str(e), param="session_id", code="invalid_session_id") from None


def store_session_id(tenant: Tenant, session_id: str) -> str:
    check_public_session_id(session_id)
    return tenant.store_id(session_id)


def no_session(session_id: str) -> errors.APIError:
    return errors.APIError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")


def session_header(session_id: str | None) -> dict[str, str]:
    return {"X-Session-Id": session_id} if session_id else {}


def sessions_of(state):
    store = state.engine.engine.sessions
    if store is None:
        raise errors.APIError(404, "sessions are not enabled on this server", code="sessions_disabled")
    return store


def session_api_error(e: SessionError, tenant: Tenant) -> errors.APIError:
    """The one mapping of session errors to HTTP; the message names sessions as the client does."""
    message = str(e)
    if tenant.name:
        message = message.replace(tenant.store_id(""), "")
    retry = {"Retry-After": "5"} if e.code == "unavailable" else None  # the store may be back soon
    return errors.APIError(SESSION_STATUS.get(e.code, 400), message, param="session_id", code=f"session_{e.code}",
                           headers=retry)


def guarded(tenant: Tenant, fn, *args):
    try:
        return fn(*args)
    except SessionError as e:
        raise session_api_error(e, tenant) from None


def session_card(entry, public_id: str) -> dict:
    return {"id": public_id, "object": "session", "tokens": entry.num_tokens,
            "checkpoints": entry.num_checkpoints, "bytes": entry.nbytes, "tier": entry.tier,
            "created": int(entry.created), "last_used": int(entry.last_used)}

