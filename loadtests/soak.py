"""A soak test of mcserve: mixed traffic for a set time against a server that is killed with -9
and started again every few minutes, then a verdict.

    python -m loadtests.soak --minutes 3 --kill-every-s 60          # the short form (tests/test_soak.py)
    python -m loadtests.soak --minutes 20 --out /tmp/soak20.json    # the long form
    python -m loadtests.soak --minutes 10 --model bundled           # the bundled model, not a tiny random one

It starts its own server on loopback (a tiny random model unless --model, a fresh session store)
and stops by itself: `--minutes` bounds the whole run, the last part of it kept for the final
checks. C workers send conversations over /v1/chat/completions and /v1/completions, streamed or
not, each naming its session (the `session_id` field or the X-Session-Id header) and sending the
whole conversation so far; some streams are dropped mid-way and some requests cancelled, and a
few requests have no session. Ended conversations are kept (--keep-sessions), older ones checked
and deleted, so that the store stays the size of a server in steady use. After each restart, and
at the end after a last kill -9, every session must still show its last completed turn, and a
follow-up turn must resume from it (loadtests/soak_ledger.py says what that means in tokens). The
server's RSS and descriptors are sampled throughout (loadtests/soak_monitor.py).

Fails (exit 1; 2 if the run broke off) on any 5xx, any connection error while the server was up,
any completed turn lost, RSS growth after warm-up of 10% or more, a descriptor leak, a traceback
in the server's log, or an integrity or write error the store counted; prints a summary and
writes the counts and curves to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import httpx

import models

from .soak_checks import CARD_PARALLELISM, check_cards, follow_up_all, store_counters
from .soak_ledger import Ledger
from .soak_monitor import Monitor
from .soak_report import Limits, build, summary
from .soak_server import SoakServer, tiny_model_dir
from .soak_traffic import Mix, Traffic

STOP_TIMEOUT_S = 90     # workers finish the turn they are in (bounded by the request timeout)
FINAL_GRACE_S = 60      # the final checks may run this far past --minutes, no further
MIN_LIFETIME_S = 5      # no kill this close to the end of the traffic
ACCESS_LINE = re.compile(r'INFO: +[\d.:]+ - "')  # uvicorn's line per request


def resolve_model(name: str | None, work: Path) -> Path:
    if name is None:
        return tiny_model_dir(work / "model")
    return models.default_model_path() if name == "bundled" else Path(name)


def final_reserve_s(args) -> float:
    """The end of the run kept for the final kill, restart and checks of every session (about
    keep_sessions + concurrency of them: a few seconds on the tiny model)."""
    return min(max(0.1 * args.minutes * 60, 30.0), 120.0)


def kill_times(every_s: float, start: float, until: float, rng: random.Random) -> list[float]:
    """Every `every_s` seconds, give or take 5% of it, so that kills land anywhere in a request."""
    if every_s <= 0:
        return []
    times, k = [], 1
    while (at := start + (k + rng.uniform(-0.05, 0.05)) * every_s) < until - MIN_LIFETIME_S:
        times.append(at)
        k += 1
    return times


async def sample_every(monitor: Monitor, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        monitor.sample()


async def end_lifetime(monitor: Monitor, traffic: Traffic) -> None:
    """The lifetime's last word: a sample, and the store's counters."""
    monitor.sample()
    monitor.lifetimes[-1].store = await store_counters(traffic.client)


async def kill_and_restart(server: SoakServer, monitor: Monitor, traffic: Traffic) -> None:
    await end_lifetime(monitor, traffic)
    await asyncio.to_thread(server.kill)
    await asyncio.to_thread(server.start)
    traffic.lifetime += 1
    monitor.new_lifetime(server.pid, server.starts[-1])


async def run_traffic(args, traffic: Traffic, server: SoakServer, monitor: Monitor, until: float) -> None:
    workers = [asyncio.create_task(traffic.worker()) for _ in range(args.concurrency)]
    checks = []
    for at in kill_times(args.kill_every_s, time.monotonic(), until, random.Random(args.seed + 1)):
        await asyncio.wait(workers, timeout=max(0.0, at - time.monotonic()))
        if all(w.done() for w in workers):  # --max-requests reached
            break
        await kill_and_restart(server, monitor, traffic)
        when = f"restart {traffic.lifetime}"
        checks.append(asyncio.create_task(check_cards(traffic.client, traffic.ledger, when, until)))
    await asyncio.wait(workers, timeout=max(0.0, until - time.monotonic()))
    traffic.stopping.set()
    done, pending = await asyncio.wait(workers, timeout=STOP_TIMEOUT_S)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()  # a worker's bug is the soak's failure, not a silent stall
    await asyncio.gather(*checks)


async def final_checks(args, traffic: Traffic, server: SoakServer, monitor: Monitor, deadline: float) -> dict:
    """After the run, a last kill -9: every completed turn must have survived it."""
    started = time.monotonic()
    await kill_and_restart(server, monitor, traffic)
    cards_due, cards = await check_cards(traffic.client, traffic.ledger, "final", deadline)
    followups_due, followups = await follow_up_all(traffic, args.concurrency, deadline)
    await end_lifetime(monitor, traffic)
    return {"cards_due": cards_due, "cards_checked": cards, "followups_due": followups_due,
            "followups_done": followups, "seconds": round(time.monotonic() - started, 1)}


async def soak(args, work: Path, log: Path, began: float) -> dict:
    model_dir = resolve_model(args.model, work)
    log.write_text("")  # this run's log alone: its tracebacks are counted
    server = SoakServer(model_dir, work / "store", log, *args.server_arg)
    deadline = began + args.minutes * 60
    await asyncio.to_thread(server.start)
    monitor = Monitor()
    monitor.new_lifetime(server.pid, server.starts[-1])
    connections = args.concurrency + CARD_PARALLELISM
    pool = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(60, connect=5)  # the tiny model answers in well under a second
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=pool) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            ledger = Ledger(segment_size(model_dir))
            mix = Mix(keep_sessions=args.keep_sessions)
            traffic = Traffic(client, model, ledger, mix, args.seed, args.max_requests)
            sampler = asyncio.create_task(sample_every(monitor, args.sample_every_s))
            traffic_began = time.monotonic()
            await run_traffic(args, traffic, server, monitor, deadline - final_reserve_s(args))
            traffic_s = time.monotonic() - traffic_began
            final = await final_checks(args, traffic, server, monitor, deadline + FINAL_GRACE_S)
            sampler.cancel()
    finally:
        await asyncio.to_thread(server.stop)
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python -m loadtests.soak", *args.argv]), "config": vars(args),
           "model": str(model_dir), "server_log_path": str(log), "duration_s": round(time.monotonic() - began, 1),
           "traffic_s": round(traffic_s, 1)}
    limits = Limits(args.warmup_s, args.max_rss_growth, args.fd_slack, connections + 1)  # + the listener
    return build(run, traffic.tally, ledger, server, monitor, limits, final)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="the whole run, final checks included")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument("--out", help="write the counts, checks and RSS/fd curves here (JSON)")
    parser.add_argument("--log", help="the server's log (default: in the run's temporary directory)")
    parser.add_argument("--model", help="a model directory, or 'bundled' (default: a tiny random model)")
    parser.add_argument("--kill-every-s", type=float, default=180.0, help="kill -9 and restart the server "
                        "this often (0: only the final kill)")
    parser.add_argument("--warmup-s", type=float, help="each lifetime's warm-up, not judged for growth "
                        "(default: a third of --kill-every-s, at most 60)")
    parser.add_argument("--sample-every-s", type=float, default=2.0)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--fd-slack", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--keep-sessions", type=int, default=Mix.keep_sessions, help="ended conversations "
                        "kept for the final checks; older ones are checked and deleted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="an option passed on to `mcserve serve`, e.g. --server-arg=--max-num-seqs=8")
    parser.add_argument("--workdir", help="keep the model, store and log here (default: a temporary directory)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.warmup_s is None:
        # A restarted server fills its memory tier with the sessions in use again: some tens of
        # conversations (--keep-sessions), a minute on two cores; growth after that is a leak.
        args.warmup_s = min(60.0, args.kill_every_s / 3) if args.kill_every_s > 0 else 60.0
    if args.minutes * 60 < final_reserve_s(args) + 30:
        parser.error(f"--minutes {args.minutes} leaves no time for traffic")
    return args


def log_tail(log: Path, lines: int = 80) -> str:
    """The end of the server's log without its access lines: what it said besides serving."""
    if not log.exists():
        return ""
    said = [line for line in log.read_text(errors="replace").splitlines() if not ACCESS_LINE.match(line)]
    return "\n".join(said[-lines:])


def segment_size(model_dir: Path) -> int:
    """From the model's config.json (mcserve's own format: the tiny model or the bundled one)."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["segment_size"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mcserve-soak-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        log = Path(args.log) if args.log else work / "server.log"
        try:
            report = asyncio.run(soak(args, work, log, began))
        except Exception:  # noqa: BLE001 - the server would not start again, or a bug here: say what happened
            traceback.print_exc()
            print(f"soak: the run broke off; the server's log ({log}), access lines left out:\n{log_tail(log)}",
                  file=sys.stderr)
            return 2
        print(summary(report), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if not report["passed"]:
            print(f"--- the server's log ({log}), access lines left out ---\n{log_tail(log)}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
