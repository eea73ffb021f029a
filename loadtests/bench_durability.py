"""What durable sessions cost: the same load against `mcserve serve --session-durability sync`
and `async`, side by side in one run.

    python -m loadtests.bench_durability                 # 3 rounds, concurrency 16
    python -m loadtests.bench_durability --quick         # a smoke run

Each round starts a fresh server per mode (the bundled model, a fresh session directory, so no
prompt is cached), sends `--num-prompts` streaming chat requests of `--input-len` words at
`--max-concurrency`, each naming a new session (so each response also saves one), and stops the
server. The modes alternate which goes first. Reported: per mode, the median over rounds of the
p50 and p99 time to first token, the p50 end-to-end latency and requests/s, and sync / async.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import httpx

from .bench_serve import run_load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, durability: str, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                             "--session-store", store, "--session-durability", durability],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench_durability: the server exited ({proc.returncode})")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("bench_durability: the server did not start")
        time.sleep(0.2)


def one_run(args, durability: str, round_: int, tmp: str) -> dict:
    with open(os.path.join(tmp, f"{durability}-{round_}.log"), "w") as log:
        proc, url = start_server(os.path.join(tmp, f"{durability}-{round_}"), durability, log)
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            load = SimpleNamespace(base_url=url, model=model, num_prompts=args.num_prompts, input_len=args.input_len,
                                   output_len=args.output_len, request_rate=float("inf"),
                                   max_concurrency=args.max_concurrency, duration=0, timeout=600,
                                   seed=1000 + round_, sessions=True, warm=False)
            result = asyncio.run(run_load(load))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if result["failed"]:
        raise SystemExit(f"bench_durability: {result['failed']} requests failed: {result['errors']}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.num_prompts, args.input_len, args.output_len, args.max_concurrency = 1, 8, 32, 4, 4
    runs: dict[str, list[dict]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in (("sync", "async") if r % 2 == 0 else ("async", "sync")):
                runs[mode].append(one_run(args, mode, r, tmp))
                res = runs[mode][-1]
                print(f"# round {r} {mode}: TTFT p50 {res['ttft']['median_ms']:.0f} ms, "
                      f"e2e p50 {res['e2e']['median_ms']:.0f} ms, {res['request_throughput']:.2f} req/s", flush=True)

    def median(mode, metric, stat):
        return statistics.median(r[metric][stat] if stat else r[metric] for r in runs[mode])
    rows = {"TTFT p50 (ms)": ("ttft", "median_ms"), "TTFT p99 (ms)": ("ttft", "p99_ms"),
            "e2e p50 (ms)": ("e2e", "median_ms"), "requests/s": ("request_throughput", None)}
    table = {name: {mode: median(mode, *key) for mode in runs} for name, key in rows.items()}
    print("| | sync (durable) | async | sync / async |\n|---|--:|--:|--:|")
    for name, v in table.items():
        print(f"| {name} | {v['sync']:,.1f} | {v['async']:,.1f} | {v['sync'] / v['async']:.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"table": table, "runs": runs, "config": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
