"""Logging for `mcserve serve`: text for people, or one JSON object per line for log collectors
(`--log-format json`), and a request id on every line logged while a request is handled.

The id is the client's `X-Request-Id` if it sent one (so a proxy's id follows the request), else
a fresh one; the response carries it back in `X-Request-Id`. It lives in a context variable set
by `RequestIdMiddleware`, so uvicorn's access line and every line of the handlers see it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
CLIENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if getattr(record, "request_id", ""):
            line["request_id"] = record.request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        text = f"{record.levelname}: {'[' + rid + '] ' if rid else ''}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Route every logger (mcserve's, uvicorn's) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


class RequestIdMiddleware:
    """Plain ASGI: sets the request id for everything that runs for the request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if CLIENT_ID.match(given) else f"req-{secrets.token_hex(8)}"
        token = request_id.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
