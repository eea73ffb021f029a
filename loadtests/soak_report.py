"""The soak's verdict: the counts, the curves, the checks, and a summary to print."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .soak_ledger import Ledger
from .soak_monitor import Monitor
from .soak_server import SoakServer
from .soak_traffic import Tally


@dataclass
class Limits:
    warmup_s: float
    max_rss_growth: float
    fd_slack: int
    max_sockets: int


def connection_errors(tally: Tally, server: SoakServer) -> dict:
    """Transport errors and cut streams: expected when the request overlapped a kill, else failures."""
    outside = [o for o in tally.cut if not server.was_down(o.started, o.ended)]
    return {"during_kills": len(tally.cut) - len(outside), "outside_kills": len(outside),
            "outside_samples": [{"kind": o.kind, "error": o.error[:200], "at_s": round(o.ended - server.starts[0], 1)}
                                for o in outside[:10]]}


def server_log_errors(log: str) -> dict:
    tracebacks = [m.start() for m in re.finditer(r"^Traceback \(most recent call last\):", log, re.M)]
    return {"tracebacks": len(tracebacks), "first": log[tracebacks[0]:tracebacks[0] + 3000] if tracebacks else None}


def lifetimes(monitor: Monitor, limits: Limits) -> list[dict]:
    return [{**life.judge(limits.warmup_s, limits.max_rss_growth, limits.fd_slack, limits.max_sockets),
             "curve": life.curve()} for life in monitor.lifetimes]


def checks(tally: Tally, ledger: Ledger, errors: dict, lives: list[dict], final: dict, log: dict) -> dict:
    judged = [life for life in lives if life.get("judged")]
    return {
        "no_5xx": not tally.server_errors,
        "no_unexpected_errors": not (errors["outside_kills"] or tally.client_errors or tally.malformed
                                     or ledger.card_errors),
        "no_completed_turn_lost": ledger.turns_lost() == 0,
        "final_checks_complete": final["cards_checked"] == final["cards_due"]
                                 and final["followups_done"] == final["followups_due"],
        "rss_growth_under_limit": bool(judged) and all(life["rss_ok"] for life in judged),
        "no_fd_leak": bool(judged) and all(life["fds_ok"] and life["sockets_ok"] for life in judged),
        "no_server_tracebacks": log["tracebacks"] == 0,
        "no_store_errors": all(store_trouble(life["store"]) == 0 for life in lives),
    }


def store_trouble(counters: dict | None) -> float:
    """Integrity and write errors the store counted (none read: none known)."""
    return sum(v for k, v in (counters or {}).items()
               if k.startswith(("session_store_integrity_errors", "session_write_errors")))


def build(run: dict, tally: Tally, ledger: Ledger, server: SoakServer, monitor: Monitor, limits: Limits,
          final: dict) -> dict:
    errors = connection_errors(tally, server)
    lives = lifetimes(monitor, limits)
    log = server_log_errors(server.log_text(chars=None))
    verdict = checks(tally, ledger, errors, lives, final, log)
    requests = {"total": tally.requests, "per_s": round(tally.requests / run["traffic_s"], 2),
                "outcomes": dict(tally.outcomes), "http_errors": {str(k): v for k, v in tally.statuses.items()},
                "5xx": len(tally.server_errors), "5xx_samples": tally.server_errors[:10],
                "unexpected_4xx": tally.client_errors[:10], "malformed": tally.malformed[:10]}
    return {**run, "requests": requests,
            "connection_errors": errors, "kills": len(server.windows),
            "restart_s": [round(w.ready - w.killed, 2) for w in server.windows if w.ready],
            "kill_windows": [[round(w.killed, 2), w.ready and round(w.ready, 2)] for w in server.windows],
            "sessions": ledger.summary(), "final": final, "limits": limits.__dict__, "lifetimes": lives,
            "server_log": log, "checks": verdict, "passed": all(verdict.values())}


def summary(report: dict) -> str:
    req, ses = report["requests"], report["sessions"]
    lines = [f"soak {report['date']}: {report['traffic_s']:.0f} s of traffic ({report['duration_s']:.0f} s in all), "
             f"concurrency {report['config']['concurrency']}, model {report['model']}",
             f"requests {req['total']} ({req['per_s']}/s): "
             + ", ".join(f"{k} {v}" for k, v in sorted(req["outcomes"].items())),
             f"HTTP errors {req['http_errors'] or 'none'}; 5xx {req['5xx']}; connection errors during kills "
             f"{report['connection_errors']['during_kills']}, outside {report['connection_errors']['outside_kills']}",
             f"kills {report['kills']} (restart {', '.join(f'{s:.1f}' for s in report['restart_s'])} s)",
             f"sessions {ses['sessions']}, turns completed {ses['turns_completed']}, lost {ses['turns_lost']} "
             f"(not in the store {ses['turns_not_stored']}, not resumed {ses['turns_not_resumed']}); "
             f"card checks {ses['card_checks']}, resume checks {ses['resume_checks']} "
             f"(final: {report['final']['cards_checked']}/{report['final']['cards_due']} cards, "
             f"{report['final']['followups_done']}/{report['final']['followups_due']} follow-ups)"]
    for life in report["lifetimes"]:
        lines.append(lifetime_line(life))
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["checks"].items()))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def lifetime_line(life: dict) -> str:
    def at(s):
        return f"{s['rss_kb'] / 1024:.0f} MiB/{s['fds']} fds ({s['sockets']} sockets)" if s else "-"
    verdict = (f"RSS {life['rss_growth']:+.1%} after warm-up" if life.get("judged") else "too short to judge")
    if life["store"] is not None:
        verdict += f"; store errors {store_trouble(life['store']):.0f}"
    return (f"  lifetime {life['index']} (pid {life['pid']}, {life['duration_s']:.0f} s): start {at(life['start'])}, "
            f"after warm-up {at(life['after_warmup'])}, end {at(life['end'])}: {verdict}")
