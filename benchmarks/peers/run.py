"""mcserve against vLLM's CPU build, side by side, on one machine (issue 22, item 5). Not run in CI.

    python -m benchmarks.peers.run --out peers.json                      (all variants, all loads)
    python -m benchmarks.peers.run --variants mcserve,vllm-mamba2 --loads c16,long

Setup first (README.md here): `bash benchmarks/peers/setup_vllm.sh`, then
`.peers/vllm/bin/python benchmarks/peers/make_models.py`.

Each load runs against a fresh server (started, waited for, loaded, stopped), with the cold prompt
set loadtests/bench_serve.py draws anew on every run (no --seed), so that no server reads a prefix
cache warmed by an earlier load. Variants:

- mcserve:        `mcserve serve` on the bundled model, compiled decode, bf16 weights (--mcserve-dtype),
                  sessions in a temp dir;
- vllm-llama:     vLLM on the Llama peer, its default thread binding, prefix caching on (default);
- vllm-llama-2t:  the same with VLLM_CPU_OMP_THREADS_BIND=0-1 (2 compute threads);
- vllm-mamba2:    vLLM on the Mamba2 peer without prefix caching (vLLM 0.32's CPU build crashed with
                  it on; --mamba2-prefix-caching tries it, and a crash is recorded).

Reported per load: requests/s, TPOT mean, TTFT mean, ITL median and p99 (and p99/median), the
server's memory at the end of the load (RSS and PSS summed over its process tree), and ratios
mcserve / peer. Only ratios measured in one run count: absolute numbers move between machines and days.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / ".peers"
VLLM_PYTHON = PEERS / "vllm" / "bin" / "python"
MODELS = PEERS / "models"

# 4,000-word prompts (~4,000-4,500 tokens) plus their output fit.
MAX_MODEL_LEN = 8192
KV_CACHE_GIB = "2"
READY_TIMEOUT_S = {"mcserve": 900, "vllm": 600}  # mcserve compiles its decode before /health answers
STOP_TIMEOUT_S = 40  # mcserve drains in-flight requests for 30 s on SIGTERM by default
LOAD_TIMEOUT_S = 3600


# --- the loads -------------------------------------------------------------------------------------

@dataclass
class Load:
    name: str
    args: list[str]  # bench_serve's


def build_loads(opts) -> dict[str, Load]:
    """bench_serve's arguments per load; --num-prompts, --turns and --conversations shrink them for smoke tests."""
    n = str(opts.num_prompts or 64)
    uniform = ["--num-prompts", n, "--input-len", "256", "--output-len", "64"]
    return {
        "c16": Load("c16", uniform + ["--max-concurrency", "16"]),
        "c32": Load("c32", uniform + ["--max-concurrency", "32"]),
        "multiturn": Load("multiturn", ["--multi-turn", "--conversations", str(opts.conversations),
                                        "--turns", str(opts.turns)]),
        "long": Load("long", ["--num-prompts", "1", "--input-len", "4000", "--output-len", "16"]),
    }


# --- the servers -----------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    kind: str                      # "mcserve" or "vllm"
    model_name: str                # what the API calls the model, given to bench_serve's --model
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


def mcserve_command(port: int, session_dir: str, dtype: str) -> list[str]:
    exe = Path(sys.executable).with_name("mcserve")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
    return base + ["serve", "--port", str(port), "--served-model-name", "mcserve", "--compile-decode", "on",
                   "--dtype", dtype, "--session-store", session_dir]


def vllm_command(model_dir: Path, name: str, port: int, prefix_caching: bool, dtype: str | None) -> list[str]:
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(MAX_MODEL_LEN)]
    if dtype:
        cmd += ["--dtype", dtype]
    # Said outright either way: vLLM's default is on for the Llama but off for Mamba2 (0.32).
    return cmd + ["--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]


# Offline: nothing may be downloaded at run time. The KV cache gets a fixed, ample size. The CPU
# platform is named outright rather than inferred from package metadata (see setup_vllm.sh).
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def build_variant(name: str, port: int, session_dir: str, opts) -> Variant:
    if name == "mcserve":
        return Variant(name, "mcserve", "mcserve", mcserve_command(port, session_dir, opts.mcserve_dtype))
    llama = vllm_command(MODELS / "llama", "llama-peer", port, True, opts.vllm_dtype)
    if name == "vllm-llama":
        return Variant(name, "vllm", "llama-peer", llama, dict(VLLM_ENV))
    if name == "vllm-llama-2t":  # both cores compute, none reserved for the API server
        return Variant(name, "vllm", "llama-peer", llama, {**VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    if name == "vllm-mamba2":
        mamba2 = vllm_command(MODELS / "mamba2", "mamba2-peer", port, opts.mamba2_prefix_caching, opts.vllm_dtype)
        return Variant(name, "vllm", "mamba2-peer", mamba2, dict(VLLM_ENV))
    raise SystemExit(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")


VARIANTS = ("mcserve", "vllm-llama", "vllm-llama-2t", "vllm-mamba2")


class Server:
    """One server process group: started in its own session, so that SIGTERM and SIGKILL reach the
    children it spawns (vLLM's engine core) as well."""

    def __init__(self, variant: Variant, port: int, log_path: Path):
        self.variant, self.port, self.log_path = variant, port, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **self.variant.env}
        log = open(self.log_path, "wb")  # closed in close(), after the process is gone
        self.proc = subprocess.Popen(self.variant.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._log = log

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /health and /v1/models both answer 200; raises if the server exits first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} before it was ready")
            if http_ok(self.url + "/health") and http_ok(self.url + "/v1/models"):
                return time.monotonic() - start
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> str:
        """SIGTERM to the group, SIGKILL after STOP_TIMEOUT_S; then SIGKILL for whatever of the group is left."""
        if self.proc is None:
            return "never started"
        how = "exited by itself" if self.proc.poll() is not None else "SIGTERM"
        signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            how = "SIGKILL after SIGTERM timed out"
            signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # The leader may be gone while children of its group linger (an orphaned engine core).
        if wait_group_gone(self.proc.pid, 10):
            return how
        signal_group(self.proc.pid, signal.SIGKILL)
        wait_group_gone(self.proc.pid, 10)
        return how + "; group members left, killed"

    def close(self) -> None:
        self._log.close()


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_group_gone(pgid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not group_members(pgid):
            return True
        time.sleep(0.2)
    return not group_members(pgid)


def group_members(pgid: int) -> list[int]:
    members = []
    for pid in proc_pids():
        stat = read_stat(pid)
        if stat and stat[2] == pgid and stat[0] != "Z":
            members.append(pid)
    return members


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # urllib's URLError is an OSError
        return False


# A few tokens, shorter than one cache block of any server (vLLM's CPU blocks are 128 tokens, mcserve's
# segments 64): it warms code paths (first-call allocations, lazy imports), never a prompt's prefix.
WARMUP_PROMPT = "Say hello."


def warm_up(url: str, model: str) -> float:
    """One short request before the timed load, as `vllm bench serve` sends a test prompt first, so that
    no server's first-request costs land in its load's numbers. Seconds it took."""
    body = {"model": model, "messages": [{"role": "user", "content": WARMUP_PROMPT}], "max_tokens": 4,
            "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
    return time.monotonic() - start


# --- memory, from /proc (psutil is not in mcserve's venv) ---------------------------------------------

def proc_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2])


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in proc_pids():
        stat = read_stat(pid)
        if stat:
            children.setdefault(stat[1], []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def status_kb(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_memory(root: int) -> dict:
    """RSS summed over the tree (shared pages count once per process, as `ps` would add them up) and PSS
    (shared pages split between their users: what the tree really holds)."""
    pids = process_tree(root)
    rss = sum(status_kb(p, "status", "VmRSS") for p in pids)
    pss = sum(status_kb(p, "smaps_rollup", "Pss") for p in pids)
    return {"processes": len(pids), "rss_mb": rss / 1024, "pss_mb": pss / 1024}


class MemorySampler(threading.Thread):
    """The tree's peak RSS during a load, sampled every half second."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak_rss_mb, self._done = root, 0.0, threading.Event()

    def run(self) -> None:
        while True:  # a sample first: a load may end (or fail) within the first half second
            self.peak_rss_mb = max(self.peak_rss_mb, tree_memory(self.root)["rss_mb"])
            if self._done.wait(0.5):
                return

    def finish(self) -> float:
        self._done.set()
        self.join()
        return self.peak_rss_mb


# --- server logs ----------------------------------------------------------------------------------

# vLLM's OpenMP binding (vllm/utils/ompmultiprocessing.py) and its Torch thread count (torch_utils.py).
THREAD_PATTERNS = re.compile(r"core ids=|reserved_cpus|VLLM_CPU_OMP_THREADS_BIND|OMP_NUM_THREADS|Torch threads|"
                             r"OMP threads binding", re.IGNORECASE)
# vLLM prefixes each line of a child's log: "(Worker pid=7) ERROR 12-06 01:40:38 [file.py:1063] ".
LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\) \w+ [\d-]+ [\d:]+ \[[^\]]+\] ")
EXCEPTION_LINE = re.compile(r"^(\w+\.)*[A-Z]\w*(Error|Exception)(:|$)")


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def thread_info(lines: list[str]) -> dict:
    """What the server logged about its compute threads; for vLLM, the OpenMP cores it bound."""
    matches = [line.strip()[:300] for line in lines if THREAD_PATTERNS.search(line)]
    cores = [m.group(1) for line in lines if (m := re.search(r"core ids=\[([^\]]*)\]", line))]
    counts = [len([c for c in ids.split(",") if c.strip()]) for ids in cores]
    return {"omp_core_ids": cores, "omp_threads": counts, "log_lines": matches[:20]}


def vllm_dtype(lines: list[str]) -> str | None:
    """The dtype vLLM chose (on the CPU it runs a float32 checkpoint in bfloat16 unless told)."""
    return next((m.group(1) for line in lines if (m := re.search(r"Initializing a V1 LLM engine.*?dtype=([\w.]+)", line))),
                None)


def error_excerpt(lines: list[str], limit: int = 12) -> list[str]:
    """The exceptions the server logged, first one first (the root cause: later ones are mostly
    its echoes, such as the API server's EngineDeadError), each after the source line it came from."""
    bare = [LOG_PREFIX.sub("", line).rstrip() for line in lines]
    found: list[str] = []
    for i, line in enumerate(bare):
        if EXCEPTION_LINE.match(line) and not any(line in f for f in found):
            where = next((bare[j].strip() for j in range(i - 1, max(i - 6, -1), -1)
                          if bare[j].lstrip().startswith("File ")), "")
            found.append(f"{line}   ({where})" if where else line)
    return found[:limit]


# --- one load against one fresh server -------------------------------------------------------------

def run_bench(url: str, model: str, load: Load, json_out: Path, log_path: Path) -> tuple[dict | None, str]:
    cmd = [sys.executable, "-m", "loadtests.bench_serve", "--base-url", url, "--model", model,
           "--json-out", str(json_out)] + load.args
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=LOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"bench_serve timed out after {LOAD_TIMEOUT_S} s"
    if proc.returncode != 0 or not json_out.exists():
        return None, f"bench_serve exited {proc.returncode}: " + " | ".join(log_lines(log_path)[-5:])
    return json.loads(json_out.read_text()), ""


def run_one(variant: Variant, load: Load, port: int, work: Path, warmup: bool) -> dict:
    server = Server(variant, port, work / f"{variant.name}-{load.name}.server.log")
    record: dict = {"server_log": str(server.log_path)}
    server.start()
    try:
        record["ready_s"] = server.wait_ready(READY_TIMEOUT_S[variant.kind])
        record["warmup_s"] = warm_up(server.url, variant.model_name) if warmup else None
        sampler = MemorySampler(server.proc.pid)
        sampler.start()
        bench, error = run_bench(server.url, variant.model_name, load, work / f"{variant.name}-{load.name}.json",
                                 work / f"{variant.name}-{load.name}.bench.log")
        peak, end = sampler.finish(), tree_memory(server.proc.pid)
        record["memory"] = {**end, "peak_rss_mb": max(peak, end["rss_mb"])}
        record["bench"], record["error"] = bench, error
        record["server_alive_after_load"] = server.alive()
    except (RuntimeError, OSError, http.client.HTTPException) as e:  # the last two: the warm-up's
        record["error"] = f"{type(e).__name__}: {e}"
    finally:
        record["stopped"] = server.stop()
        server.close()
    lines = log_lines(server.log_path)
    record["threads"] = thread_info(lines)
    if variant.kind == "vllm":
        record["dtype"] = vllm_dtype(lines)
    failed = record.get("bench") is None or bench_failures(record["bench"])
    if failed or not record.get("server_alive_after_load", False):
        record["server_errors"] = error_excerpt(lines)
    return record


def bench_failures(bench: dict) -> int:
    if "turns" in bench:
        return sum(t["failed"] for t in bench["turns"])
    return bench.get("failed", 0)


# --- the report ------------------------------------------------------------------------------------

def load_metrics(record: dict) -> dict:
    """The table's numbers of one uniform load (c16, c32, long)."""
    bench, memory = record.get("bench"), record.get("memory", {})
    if not bench or "turns" in bench:
        return {}
    itl = bench["itl"]
    ratio = itl["p99_ms"] / itl["median_ms"] if itl["median_ms"] else None
    return {"requests/s": bench["request_throughput"], "TPOT mean (ms)": bench["tpot"]["mean_ms"],
            "TTFT mean (ms)": bench["ttft"]["mean_ms"], "ITL mean (ms)": itl["mean_ms"], "ITL median (ms)": itl["median_ms"],
            "ITL p99 (ms)": itl["p99_ms"], "ITL p99/median": ratio,
            "prompt tokens (mean)": bench["mean_prompt_tokens"], "cached prompt share": bench["cached_prompt_share"],
            "failed": bench["failed"], "RSS end (MB)": memory.get("rss_mb"), "PSS end (MB)": memory.get("pss_mb"),
            "RSS peak (MB)": memory.get("peak_rss_mb"), "server ready after (s)": record.get("ready_s")}


def turn_ttfts(record: dict, kind: str) -> list[float | None]:
    """Mean TTFT per turn: mcserve's resumed sessions; vLLM's resent histories, read from its prefix cache."""
    bench = record.get("bench")
    if not bench or "turns" not in bench:
        return []
    key = "ttft_ms_session" if kind == "mcserve" else "ttft_ms_resend"
    return [t[key] for t in bench["turns"]]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


RATIO_METRICS = ("requests/s", "TPOT mean (ms)", "TTFT mean (ms)", "ITL p99 (ms)", "RSS end (MB)", "PSS end (MB)")


def uniform_tables(load: str, results: dict, names: list[str]) -> str:
    metrics = {n: load_metrics(results[n]["loads"].get(load, {})) for n in names}
    keys = next((list(m) for m in metrics.values() if m), [])
    if not keys:
        return f"### {load}\n\nno results\n"
    text = f"### {load}\n\n" + markdown_table(["", *names], [[k, *(metrics[n].get(k) for n in names)] for k in keys])
    peers = [n for n in names if n != "mcserve"]
    if "mcserve" in names and metrics["mcserve"] and peers:
        rows = [[f"mcserve / peer, {k}", *(ratio(metrics["mcserve"].get(k), metrics[p].get(k)) for p in peers)]
                for k in RATIO_METRICS]
        text += "\n\n" + markdown_table(["", *peers], rows)
    return text + "\n"


def multiturn_table(results: dict, names: list[str]) -> str:
    ttfts = {n: turn_ttfts(results[n]["loads"].get("multiturn", {}), results[n]["kind"]) for n in names}
    turns = max((len(t) for t in ttfts.values()), default=0)
    if not turns:
        return "### multiturn\n\nno results\n"
    header = ["turn", *(f"{n} ({'session' if results[n]['kind'] == 'mcserve' else 'resend'}) TTFT ms" for n in names)]
    rows = [[t + 1, *(ttfts[n][t] if t < len(ttfts[n]) else None for n in names)] for t in range(turns)]
    peers = [n for n in names if n != "mcserve" and ttfts[n]]
    if "mcserve" in names and ttfts["mcserve"] and peers:
        header += [f"mcserve / {p}" for p in peers]
        for t, row in enumerate(rows):
            row += [ratio(ttfts["mcserve"][t], ttfts[p][t] if t < len(ttfts[p]) else None) for p in peers]
    note = ("bench_serve runs each conversation twice, each time with new text: first resumed by session, then "
            "resending its whole history. mcserve's numbers are its session pass; vLLM's are its resend pass, "
            "read from its prefix cache (vLLM ignores the session_id field).")
    return "### multiturn (mean TTFT per turn)\n\n" + note + "\n\n" + markdown_table(header, rows) + "\n"


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def failures_section(results: dict) -> str:
    lines = []
    for name, result in results.items():
        for load, record in result["loads"].items():
            failed = bench_failures(record["bench"]) if record.get("bench") else 0
            if record.get("error") or record.get("server_errors") or failed:
                what = record.get("error") or f"{failed} requests failed"
                alive = "" if record.get("server_alive_after_load", True) else "; the server had exited"
                lines.append(f"- {name} / {load}: {what}{alive}")
                lines += [f"    {line}" for line in record.get("server_errors", [])[:4]]
    return "### failures\n\n" + "\n".join(lines) + "\n" if lines else ""


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    return {"date": date, "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu}


def report(results: dict, info: dict, loads: list[str]) -> str:
    names = list(results)
    head = [f"## mcserve vs vLLM {info['vllm_version']} (CPU build), {info['machine']['date']}", "",
            f"Machine: {info['machine']['nproc']} CPUs (nproc), {info['machine']['cpu']}. Prompts: cold "
            "(a new set per load, bench_serve without --seed), a fresh server per load"
            + (", " + info["warmup"] if info["warmup"] else "") + ".", ""]
    for name in names:
        threads = sorted({c for r in results[name]["loads"].values() for c in r.get("threads", {}).get("omp_threads", [])})
        dtypes = sorted({r["dtype"] for r in results[name]["loads"].values() if r.get("dtype")})
        extra = f" (OpenMP compute threads: {threads}; dtype {', '.join(dtypes)})" if threads else ""
        head.append(f"- {name}{extra}: `{results[name]['command_line']}`")
    sections = ["\n".join(head) + "\n"]
    for load in loads:
        sections.append(multiturn_table(results, names) if load == "multiturn" else uniform_tables(load, results, names))
    sections.append(failures_section(results))
    return "\n".join(s for s in sections if s)


# --- main ------------------------------------------------------------------------------------------

def command_line(variant: Variant) -> str:
    env = " ".join(f"{k}={v}" for k, v in variant.env.items())
    return (env + " " if env else "") + " ".join(variant.command)


def check_setup(names: list[str]) -> None:
    if any(n.startswith("vllm") for n in names) and not VLLM_PYTHON.exists():
        raise SystemExit(f"no vLLM at {VLLM_PYTHON}: run bash benchmarks/peers/setup_vllm.sh")
    for n, model in (("vllm-llama", "llama"), ("vllm-llama-2t", "llama"), ("vllm-mamba2", "mamba2")):
        if n in names and not (MODELS / model / "config.json").exists():
            raise SystemExit(f"no {MODELS / model}: run {VLLM_PYTHON} benchmarks/peers/make_models.py")


def vllm_version() -> str:
    if not VLLM_PYTHON.exists():
        return "(not installed)"
    out = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def run_variant(name: str, loads: list[Load], opts, work: Path) -> dict:
    result: dict = {"loads": {}}
    for i, load in enumerate(loads):
        session_dir = tempfile.mkdtemp(prefix="mcserve-sessions-", dir=work)
        variant = build_variant(name, opts.port, session_dir, opts)
        if i == 0:  # the first load's exact command; later ones differ only in the session dir
            result.update(kind=variant.kind, model_name=variant.model_name, command=variant.command,
                          env=variant.env, command_line=command_line(variant))
            print(f"\n[{name}] {command_line(variant)}", flush=True)
        print(f"[{name}] {load.name}: bench_serve {' '.join(load.args)}", flush=True)
        record = {"command_line": command_line(variant), **run_one(variant, load, opts.port, work, not opts.no_warmup)}
        shutil.rmtree(session_dir, ignore_errors=True)
        result["loads"][load.name] = record
        print(f"[{name}] {load.name}: {summary_line(record)}", flush=True)
    return result


def summary_line(record: dict) -> str:
    if record.get("error"):
        return "FAILED: " + record["error"]
    m = load_metrics(record)
    text = (f"{fmt(m['requests/s'])} req/s, TTFT {fmt(m['TTFT mean (ms)'])} ms, failed {m['failed']}" if m else
            "turns TTFT (session/resend ms): " + ", ".join(
                f"{fmt(t['ttft_ms_session'])}/{fmt(t['ttft_ms_resend'])}" for t in record["bench"]["turns"]))
    threads = record.get("threads", {}).get("omp_threads")
    return text + (f"; OpenMP threads {threads}" if threads else "") + f"; stopped: {record['stopped']}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--loads", default="c16,c32,multiturn,long", help="comma-separated, of: c16, c32, multiturn, long")
    parser.add_argument("--num-prompts", type=int, help="prompts of c16 and c32 (default 64; fewer for a smoke test)")
    parser.add_argument("--conversations", type=int, default=4, help="multiturn: conversations (default 4)")
    parser.add_argument("--turns", type=int, default=6, help="multiturn: turns per conversation (default 6)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", help="the JSON report (default: peers.json in the work dir)")
    parser.add_argument("--work-dir", help="server and bench logs (default: .peers/runs/<UTC time>)")
    parser.add_argument("--mamba2-prefix-caching", action="store_true",
                        help="run vLLM's Mamba2 with prefix caching on (vLLM 0.32's CPU build crashed with it)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the one short request each server gets before its timed load")
    parser.add_argument("--vllm-dtype", help="vLLM's --dtype (default: vLLM's choice, bfloat16 on the CPU)")
    parser.add_argument("--mcserve-dtype", default="bf16", choices=("fp32", "bf16"),
                        help="mcserve's --dtype (default bf16, as vLLM's default on the CPU)")
    return parser.parse_args(argv)


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # so that a SIGTERM to the harness still stops the server it runs (run_one's finally)


def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, interrupt)
    opts = parse_args(argv)
    names = [n.strip() for n in opts.variants.split(",") if n.strip()]
    all_loads = build_loads(opts)
    unknown = [x for x in opts.loads.split(",") if x not in all_loads] + [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown loads or variants: {unknown}")
    loads = [all_loads[x] for x in opts.loads.split(",")]
    check_setup(names)
    if http_ok(f"http://127.0.0.1:{opts.port}/health") or http_ok(f"http://127.0.0.1:{opts.port}/v1/models"):
        raise SystemExit(f"port {opts.port} already answers: stop that server or pass --port")
    work = Path(opts.work_dir or PEERS / "runs" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    work.mkdir(parents=True, exist_ok=True)
    out = opts.out or str(work / "peers.json")
    info = {"machine": machine(), "vllm_version": vllm_version(), "work_dir": str(work),
            "argv": sys.argv, "prompts": "cold: a new set per load (bench_serve without --seed)",
            "warmup": None if opts.no_warmup else f"each warmed by one request of a few tokens ({WARMUP_PROMPT!r})"}
    results = {}
    for name in names:
        results[name] = run_variant(name, loads, opts, work)
        write_json(out, info, results)  # after every variant, so that a long run loses little
    text = report(results, info, [x.name for x in loads])
    print("\n" + text)
    write_json(out, info, results, text)
    print(f"JSON report: {out}; server and bench logs: {work}")


def write_json(path: str, info: dict, results: dict, markdown: str | None = None) -> None:
    Path(path).write_text(json.dumps({**info, "variants": results, "markdown": markdown}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the running server was stopped on the way out (run_one's finally)
        sys.exit("benchmarks.peers.run: interrupted")
