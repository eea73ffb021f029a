"""The gate in front of /v1/*, /tokenize and /detokenize: who the caller is (its tenant) and
whether it may start one more request. Probes (/health, /version) and /metrics stay open.

Plain ASGI, not BaseHTTPMiddleware, whose wrapped `receive` would report a disconnect that did
not happen. A request counts against its tenant until its response has been sent in full,
streams included.
"""

from __future__ import annotations

from collections import Counter

from . import errors
from .tenants import Tenant, TenantDirectory


class TenantGate:
    def __init__(self, app, tenants: TenantDirectory, max_concurrent: int = 0):
        self.app, self.tenants, self.max_concurrent = app, tenants, max_concurrent
        self.in_flight: Counter = Counter()  # tenant name -> requests (the event loop's thread only)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not gated(scope["path"]):
            await self.app(scope, receive, send)
            return
        tenant = self.tenants.authenticate(dict(scope["headers"]).get(b"authorization", b""))
        if tenant is None:
            await errors.error_response(401, "invalid API key: send 'Authorization: Bearer <key>'",
                                        code="invalid_api_key")(scope, receive, send)
            return
        if self.max_concurrent and self.in_flight[tenant.name] >= self.max_concurrent:
            await errors.error_response(
                429, f"tenant {tenant.label!r} has {self.max_concurrent} requests in flight, this server's "
                     "limit per tenant; retry when one has finished", code="too_many_concurrent_requests",
                headers={"Retry-After": "1"})(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        self.in_flight[tenant.name] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[tenant.name] -= 1
            if not self.in_flight[tenant.name]:
                del self.in_flight[tenant.name]


def tenant_of(request) -> Tenant:
    return request.state.tenant


def gated(path: str) -> bool:
    """The API's paths: /v1/* and vLLM's /tokenize and /detokenize (the probes stay open)."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
