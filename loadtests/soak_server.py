"""The server under soak: one `mcserve serve` process on loopback, killed with -9 and started
again on the same port and session store, with a record of when it was down.

The process handling itself is the tests' `ServerProcess` (tests/server_helpers.py), which the
kill -9 tests of tests/test_session_durability.py use too; what this adds is the down windows, so
that a connection error can be told apart: expected while the server is down, a failure otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tests.server_helpers import ServerProcess, save_tiny_model

# A connection error this soon after the server is back still belongs to the kill (a request
# that raced the restart); later ones are the server's fault.
GRACE_S = 2.0


@dataclass
class DownWindow:
    killed: float
    ready: float | None = None  # None: still down

    def covers(self, start: float, end: float) -> bool:
        """Whether a request that ran from `start` to `end` overlapped the window."""
        until = float("inf") if self.ready is None else self.ready + GRACE_S
        return start <= until and end >= self.killed


class SoakServer:
    def __init__(self, model_dir: Path, store: Path, log_path: Path, *options: str):
        self.process = ServerProcess(model_dir, log_path, "--session-store", str(store), *options)
        self.url = self.process.url
        self.windows: list[DownWindow] = []
        self.starts: list[float] = []  # the time each lifetime became ready

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def start(self) -> None:
        self.process.start()
        self.starts.append(time.monotonic())
        if self.windows and self.windows[-1].ready is None:
            self.windows[-1].ready = self.starts[-1]

    def kill(self) -> None:
        """kill -9: no drain, no flush; what was durable must be all that counts."""
        self.windows.append(DownWindow(time.monotonic()))
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()

    def was_down(self, start: float, end: float) -> bool:
        return any(w.covers(start, end) for w in self.windows)

    def log_text(self, chars: int | None = 4000) -> str:
        """The server's log (all its lifetimes), or its last `chars` characters."""
        text = Path(self.process.log_path).read_text(errors="replace")
        return text if chars is None else text[-chars:]


def tiny_model_dir(root: Path) -> Path:
    """The tests' tiny random model (byte tokenizer, 8-token segments): fast on any CPU."""
    return save_tiny_model(root)
