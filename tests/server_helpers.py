"""A real mcserve server on loopback, in a thread, for the HTTP tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

import models
from server.config import ServerConfig
from server.serve import create_app, uvicorn_config
from tests.helpers import tiny_model

MODEL_NAME = "tiny-mc"


def save_tiny_model(path, arch="mcserve"):
    memory = "delta" if arch == "gated_deltanet" else "gla"
    model = tiny_model(arch=arch, memory=memory, aggregation="grm", vocab_size=260, segment_size=8)
    model.tokenizer = models.byte_tokenizer()
    models.save(model, path / MODEL_NAME)
    return path / MODEL_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(proc: subprocess.Popen, url: str, timeout: float, what: str, log=lambda: "") -> None:
    """Poll `url` until it answers 200; fail at once (with the process's output) if it exits."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, log()
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"{what} did not become ready in {timeout} s"
        time.sleep(0.1)


@contextmanager
def running_server(model_dir, session_dir=None, **options):
    options = {"default_max_tokens": 16, **options}
    config = ServerConfig.from_options({"model": str(model_dir), "port": free_port(),
                                        "session_dir": str(session_dir or ""), "shutdown_grace_s": 2.0, **options})
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class ServerProcess:
    """`mcserve serve` in a process of its own, so a test can kill it with -9 and start it again."""

    def __init__(self, model_dir, log_path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir),
                     "--port", str(self.port), "--shutdown-grace-s", "2", *options]
        self.log_path, self.proc = log_path, None

    def start(self, timeout: float = 120) -> "ServerProcess":
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until_ready(self.proc, self.url + "/health", timeout, "mcserve", self.log_text)
        return self

    def log_text(self) -> str:
        return open(self.log_path).read()[-4000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()

    def io(self) -> dict[str, int]:
        """The kernel's I/O counters of the server process (/proc/PID/io)."""
        with open(f"/proc/{self.proc.pid}/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f)}
