"""The server process's resident memory and file descriptors over time, per lifetime.

Samples read /proc/PID/status (VmRSS) and /proc/PID/fd. Each lifetime (from a start to the kill
that ends it) is judged on its own, after its own warm-up: a restarted server loads the model and
fills its caches again. Leaks are judged from the sample after warm-up to the last one:
- RSS may grow by less than `max_rss_growth` (a fraction);
- descriptors other than sockets (files, pipes, eventfds) may grow by `fd_slack` at most;
- sockets come and go with the load (one per client connection), so they may not exceed the
  clients' connection limit plus `fd_slack`: a socket leak (CLOSE_WAIT) piles up past it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    t: float        # seconds since the lifetime's start
    rss_kb: int
    fds: int
    sockets: int

    @property
    def other_fds(self) -> int:
        return self.fds - self.sockets


def read_sample(pid: int, since: float) -> Sample | None:
    """One sample of `pid`; None if it has gone (killed between the check and the read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:  # closed while listed
                continue
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None
    sockets = sum(link.startswith("socket:") for link in links)
    return Sample(round(time.monotonic() - since, 2), rss, len(links), sockets)


@dataclass
class Lifetime:
    index: int
    pid: int
    started: float                   # monotonic
    samples: list[Sample] = field(default_factory=list)
    store: dict | None = None        # the store's counters (/metrics) at its end

    def sample(self) -> None:
        s = read_sample(self.pid, self.started)
        if s is not None:
            self.samples.append(s)

    def after_warmup(self, warmup_s: float) -> Sample | None:
        return next((s for s in self.samples if s.t >= warmup_s), None)

    def judge(self, warmup_s: float, max_rss_growth: float, fd_slack: int, max_sockets: int) -> dict:
        """The lifetime's leak checks (skipped, and said so, when it ended before warm-up did)."""
        warm = self.after_warmup(warmup_s)
        end = self.samples[-1] if self.samples else None
        report = {"index": self.index, "pid": self.pid, "duration_s": end.t if end else 0,
                  "start": sample_dict(self.samples[0]) if self.samples else None,
                  "after_warmup": sample_dict(warm), "end": sample_dict(end), "store": self.store}
        if warm is None or end is None or end.t - warm.t < warmup_s / 2:
            report["judged"] = False  # too short to tell growth from warm-up
            return report
        growth = (end.rss_kb - warm.rss_kb) / warm.rss_kb
        report.update(judged=True, rss_growth=round(growth, 4), rss_ok=growth < max_rss_growth,
                      fds_ok=end.other_fds <= warm.other_fds + fd_slack,
                      sockets_ok=end.sockets <= max_sockets + fd_slack)
        return report

    def curve(self) -> list[list]:
        return [[s.t, s.rss_kb, s.fds, s.sockets] for s in self.samples]


def sample_dict(s: Sample | None) -> dict | None:
    return None if s is None else {"t": s.t, "rss_kb": s.rss_kb, "fds": s.fds, "sockets": s.sockets}


class Monitor:
    def __init__(self):
        self.lifetimes: list[Lifetime] = []

    def new_lifetime(self, pid: int, started: float) -> None:
        self.lifetimes.append(Lifetime(len(self.lifetimes), pid, started))
        self.sample()

    def sample(self) -> None:
        if self.lifetimes:
            self.lifetimes[-1].sample()
