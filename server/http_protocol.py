"""uvicorn's h11 protocol, bounded against clients that hold connections open and send nothing.

uvicorn times out an idle keep-alive connection only once a response has completed, and cancels
even that timer at the first byte of the next request: a client that connects and sends nothing,
or trickles a request one byte at a time (slowloris), holds its connection, and its file
descriptor, for ever. Here every request must arrive whole, headers and body, within
`request_timeout_s` of the connection becoming ready for it; a connection beyond
`max_connections` is closed at once. Both are options of `mcserve serve`.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def bounded_h11(request_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    class BoundedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()  # before any byte is read: the server's fds stay bounded
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                self._disarm()  # the request has arrived whole; its response may take its time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11Protocol
