"""The deploy files against a running mcserve: the image's entrypoint command run outside Docker,
the dashboard's queries naming metrics the server really exports, and a real Prometheus (Debian's
package, started here on loopback with deploy/prometheus/prometheus.yml) scraping the server and
answering with the memory-cache metrics through its HTTP API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_helpers import MODEL_NAME, free_port, running_server, save_tiny_model, wait_until_ready
from tests.test_deploy_static import (
    DEPLOY,
    METRIC_NAME,
    dashboard,
    dashboard_exprs,
    dockerfile_env,
    dockerfile_instructions,
    exec_form,
    healthcheck_command,
    tool,
    yaml,
)

MEMORY_CACHE = ("mcserve:checkpoint_blocks", "mcserve:checkpoint_bytes", "mcserve:cached_checkpoints",
                "mcserve:sessions", "mcserve:session_bytes", "mcserve:evictions_total")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def chat(url: str, content: str, session_id: str | None = None, model: str = MODEL_NAME) -> dict:
    headers = {"X-Session-Id": session_id} if session_id else {}
    res = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                     json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4})
    assert res.status_code == 200, res.text
    return res.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny mcserve that has served a few requests: two sessions, one of them evicted from memory
    to disk (at most one session in memory), and one request without a session."""
    tmp = tmp_path_factory.mktemp("deploy")
    model_dir = save_tiny_model(tmp)
    with running_server(model_dir, tmp / "sessions", max_sessions_in_memory=1) as (url, app):
        chat(url, "the first session " * 8, session_id="first")
        chat(url, "the second session " * 8, session_id="second")
        chat(url, "no session at all")
        app.state.mc.engine.engine.sessions.flush()
        yield url


def test_dashboard_queries_name_exported_metrics(server):
    exported = {name for name, _ in scrape(server)}
    exprs = dashboard_exprs(dashboard())
    named = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert len(named) >= 15
    missing = sorted(named - exported)
    assert not missing, f"the dashboard queries metrics mcserve does not export: {missing}"


# --- the image's entrypoint, outside Docker -------------------------------------------------------
def test_image_entrypoint_serves_and_drains(tmp_path):
    """ENTRYPOINT + CMD with the image's MCSERVE_* environment (port and session directory moved to
    free ones here), the bundled model; the HEALTHCHECK command passes; SIGTERM exits 0 with the
    session saved."""
    ins = dockerfile_instructions()
    argv = exec_form(ins, "ENTRYPOINT") + exec_form(ins, "CMD")
    image_env = {k: v for k, v in dockerfile_env(ins).items() if k.startswith("MCSERVE_")}
    port = free_port()
    env = {**os.environ, **image_env, "MCSERVE_PORT": str(port), "MCSERVE_SESSION_STORE": str(tmp_path / "sessions"),
           "MCSERVE_SHUTDOWN_GRACE_S": "2", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    if tool(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed in this environment (pip install -e .)")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url + "/health", 90, "the server", proc.stdout.read)
        check = subprocess.run(healthcheck_command(ins), env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        assert model == "mc-gla-grm-small"  # the bundled model
        chat(url, "Hello", session_id="entrypoint", model=model)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "sessions" / "manifests" / "entrypoint.json").is_file()
    check = subprocess.run(healthcheck_command(ins), env=env, capture_output=True, text=True, timeout=30)
    assert check.returncode != 0, "the HEALTHCHECK must fail when the server is down"


# --- a real Prometheus ------------------------------------------------------------------------------
class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict]:
        res = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = res.json()
        assert res.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = tool("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed (Debian: apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mcserve"]
    job["static_configs"] = [{"targets": [server.removeprefix("http://")]}]  # the deploy config, aimed here
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url + "/-/ready", 30, "prometheus", (tmp / "prometheus.log").read_text)
        yield Prometheus(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_reads_back_the_memory_cache_metrics(server, prometheus):
    expected = {key: value for key, value in scrape(server).items() if key[0] in MEMORY_CACHE}
    selector = '{__name__=~"%s", job="mcserve"}' % "|".join(MEMORY_CACHE)
    deadline = time.time() + 30
    while True:
        got = {}
        for series in prometheus.query(selector):
            labels = {k: v for k, v in series["metric"].items() if k not in ("__name__", "job", "instance")}
            got[(series["metric"]["__name__"], tuple(sorted(labels.items())))] = float(series["value"][1])
        if got == expected or time.time() > deadline:
            break
        time.sleep(0.25)
    assert got == expected
    assert prometheus.query('up{job="mcserve"}')[0]["value"][1] == "1"

    def value(name, **labels):
        return expected[(name, tuple(sorted(labels.items())))]
    # the store holds every saved session, memory an LRU cache of one session here
    assert value("mcserve:sessions", tier="memory") == 1 and value("mcserve:sessions", tier="store") == 2
    assert value("mcserve:evictions_total", kind="session_memory") == 1
    assert value("mcserve:session_bytes", tier="store") > 0
    assert value("mcserve:checkpoint_blocks", tier="device", state="cached") > 0
    assert value("mcserve:checkpoint_bytes", tier="device", state="cached") > 0
    assert {k: v for k, v in scrape(server).items() if k[0] in MEMORY_CACHE} == expected  # still idle


def test_prometheus_evaluates_every_dashboard_query(server, prometheus):
    """Each panel's PromQL, with Grafana's variables filled in, is valid, and the memory-cache
    panels have data."""
    prometheus.query('up{job="mcserve"} == 1')
    for expr in dashboard_exprs(dashboard()):
        if expr.startswith("label_values("):  # a Grafana variable: its series selector must match
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        promql = (expr.replace("$__rate_interval", "1m").replace('"$job"', '"mcserve"')
                  .replace('"$instance"', '".*"'))
        assert "$" not in promql, promql
        result = prometheus.query(promql)
        if "rate(" not in promql and any(m in promql for m in MEMORY_CACHE + ("mcserve:num_requests_",)):
            assert result, f"no data for {expr}"
