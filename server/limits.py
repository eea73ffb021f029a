"""Request body size, checked before anything reads the body.

A body over the limit is refused with 413 as soon as its Content-Length (or, for a chunked
body, its running length) says so; the rest is never read into memory. Plain ASGI, in front of
FastAPI. The other sizes of a request (messages, stop strings, n) are checked in protocol.py.
"""

from __future__ import annotations

from . import errors


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            body.append(chunk)
        await self.app(scope, replay(b"".join(body), receive), send)

    async def _refuse(self, scope, receive, send):
        await errors.error_response(
            413, f"the request body is over this server's limit of {self.max_bytes} bytes "
                 "(--max-request-body-bytes)", code="request_too_large")(scope, receive, send)


def replay(body: bytes, receive):
    """A `receive` that hands over the body read already, then the client's own messages (so a
    disconnect is still seen)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return receive_again
