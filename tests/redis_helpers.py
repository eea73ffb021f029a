"""A real redis-server (Debian's package) on a free loopback port, for the store's tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import contextmanager

import pytest
import redis

from tests.server_helpers import free_port


@contextmanager
def redis_server(directory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(directory), "--protected-mode", "yes"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.time() + 20
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.time() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
