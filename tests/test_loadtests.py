"""The serving benchmark runs against a real server and reports what it measured."""

import json
import subprocess
import sys

import pytest

from tests.server_helpers import running_server, save_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("models"))
    with running_server(model_dir, tmp_path_factory.mktemp("sessions")) as (url, _):
        yield url


def bench(*args):
    res = subprocess.run([sys.executable, "-m", "loadtests.bench_serve", *args], capture_output=True, text=True,
                         timeout=300)
    return res


def test_load_run_reports_latencies_and_throughput(server, tmp_path):
    res = bench("--base-url", server, "--num-prompts", "3", "--input-len", "12", "--output-len", "4",
                "--max-concurrency", "2", "--request-rate", "50", "--json-out", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 3 and result["failed"] == 0
    assert result["output_token_throughput"] > 0 and result["ttft"]["p99_ms"] >= result["ttft"]["median_ms"] > 0
    assert result["tpot"]["mean_ms"] > 0 and result["e2e"]["mean_ms"] > result["ttft"]["mean_ms"]


def test_multi_turn_compares_sessions_with_resending(server):
    res = bench("--base-url", server, "--multi-turn", "--conversations", "2", "--turns", "3", "--input-len", "10",
                "--output-len", "3")
    assert res.returncode == 0, res.stderr
    turns = json.loads(res.stdout)["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["failed"] == 0 for t in turns)
    assert turns[2]["cached_tokens_with_session"] > 0 and turns[2]["speedup"] > 0


def test_loopback_only():
    res = bench("--base-url", "http://example.com:8000")
    assert res.returncode != 0 and "loopback only" in res.stderr


def test_a_load_with_sessions_saves_one_per_request(server):
    import httpx
    before = len(httpx.get(server + "/v1/sessions").json()["data"])
    res = bench("--base-url", server, "--num-prompts", "3", "--input-len", "8", "--output-len", "2", "--sessions")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["completed"] == 3
    assert len(httpx.get(server + "/v1/sessions").json()["data"]) == before + 3


def test_the_durability_benchmark_runs_both_modes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "loadtests.bench_durability", "--quick", "--json-out",
                          str(tmp_path / "d.json")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    runs = json.loads((tmp_path / "d.json").read_text())["runs"]
    assert [len(runs["sync"]), len(runs["async"])] == [1, 1]
    assert all(r[0]["completed"] == 8 and r[0]["failed"] == 0 for r in runs.values())


def test_prompts_are_fresh_every_run_unless_warm_is_asked(server):
    def cached_share(*extra):
        res = bench("--base-url", server, "--num-prompts", "3", "--input-len", "40", "--output-len", "2", *extra)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["cached_prompt_share"]
    assert cached_share() < 0.2 and cached_share() < 0.2  # a new set each time: the server has not seen it
    assert cached_share("--seed", "7", "--warm") > 0.6    # the set sent once before, on purpose
