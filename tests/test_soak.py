"""The soak test's short form (loadtests/soak.py): three minutes of mixed traffic on a tiny model,
the server killed with -9 and restarted every minute, and every check must pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

from loadtests.soak import log_tail

ROOT = Path(__file__).resolve().parents[1]


def explain(res: subprocess.CompletedProcess, report: dict | None, log: Path) -> str:
    """What a failure shows: the summary, the checks' evidence, and the end of the server's log."""
    parts = [res.stdout[-4000:]]
    if report is None:  # the run broke off: its traceback
        parts.append(res.stderr[-4000:])
    else:
        evidence = {"violations": report["sessions"]["violations"][:3], "5xx": report["requests"]["5xx_samples"][:3],
                    "unexpected": report["connection_errors"]["outside_samples"][:3],
                    "unexpected_4xx": report["requests"]["unexpected_4xx"][:3],
                    "lifetimes": [{k: v for k, v in life.items() if k != "curve"} for life in report["lifetimes"]]}
        parts.append(json.dumps(evidence, indent=1)[:8000])
    parts.append("--- the server's log, access lines left out ---\n" + log_tail(log)[-6000:])
    return "\n".join(parts)


def test_a_three_minute_soak_with_kills_passes(tmp_path):
    out, log = tmp_path / "soak.json", tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "loadtests.soak", "--minutes", "3", "--kill-every-s", "60",
                          "--out", str(out), "--log", str(log)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    report = json.loads(out.read_text()) if out.exists() else None
    assert res.returncode == 0 and report is not None, explain(res, report, log)
    assert report["passed"] and all(report["checks"].values()), explain(res, report, log)
    # It did what a soak must: traffic of every kind, kills, and checks that ran.
    outcomes = report["requests"]["outcomes"]
    assert all(outcomes.get(kind, 0) > 0 for kind in ("completed", "aborted", "disconnected", "deleted")), outcomes
    assert report["kills"] >= 2, report["kills"]  # one during the traffic at least, and the final one
    assert report["sessions"]["turns_completed"] > 100 and report["sessions"]["card_checks"] > 0
    assert report["final"]["followups_done"] > 0
    assert any(life.get("judged") for life in report["lifetimes"])
    assert report["duration_s"] < 240


def test_the_ledger_owes_a_completed_turn_its_tokens_and_a_touched_one_its_prompt():
    from loadtests.soak_ledger import Ledger, Session, Turn
    ledger = Ledger(segment=8)
    session = Session("s", "chat", False, 3, [])
    ledger.add(session)
    ledger.check_card(session, None, "restart 1")  # nothing completed yet: nothing owed
    session.completed_turn(Turn(prompt_tokens=42, completion_tokens=16, cached_tokens=0))
    assert session.required_tokens(8) == 57       # all_ids[:num_computed]: the last sample is not read
    ledger.check_card(session, 57, "restart 1")
    session.touched()                             # an aborted turn may have saved less, from a checkpoint
    assert session.required_tokens(8) == session.required_cached(8) == 40
    ledger.check_resume(session, 40, "traffic")
    assert ledger.turns_lost() == 0
    ledger.check_card(session, 39, "final")
    ledger.check_resume(session, 0, "final")
    assert ledger.turns_lost() == 1 and ledger.turns_lost("card") == ledger.turns_lost("resume") == 1


def test_a_connection_error_is_excused_only_around_a_kill():
    from loadtests.soak_server import GRACE_S, DownWindow
    window = DownWindow(killed=100.0, ready=105.0)
    assert window.covers(99.0, 100.5) and window.covers(104.0, 105.0 + GRACE_S)
    assert not window.covers(90.0, 99.0) and not window.covers(105.0 + GRACE_S + 0.1, 120.0)
    assert DownWindow(killed=100.0).covers(150.0, 151.0)  # still down
