"""`mcserve serve` as users start it: options and environment, then SIGTERM mid-request saves the
in-flight session and exits cleanly."""

import os
import signal
import subprocess
import sys

import httpx

from tests.server_helpers import MODEL_NAME, free_port, save_tiny_model, wait_until_ready


def test_serve_then_sigterm_saves_in_flight_work(tmp_path):
    model_dir = save_tiny_model(tmp_path)
    port = free_port()
    env = {**os.environ, "MCSERVE_SESSION_DIR": str(tmp_path / "sessions"), "MCSERVE_SHUTDOWN_GRACE_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url + "/health", 30, "the server", proc.stdout.read)
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 10000,
                "ignore_eos": True, "stream": True, "session_id": "inflight"}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest
        assert any('"finish_reason":"abort"' in line for line in rest)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "sessions" / "manifests" / "inflight.json").is_file()


def test_serve_bad_options_are_one_line(tmp_path):
    for args, message in [(["--model", str(tmp_path / "none")], "model directory not found"),
                          (["--port", "0"], "port must be in 1..65535")]:
        res = subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_device_kernel_and_graph_options_are_validated():
    import pytest
    import torch

    from server.config import ServerConfig, ServerConfigError

    config = ServerConfig.load({}, {"MCSERVE_DEVICE": "cpu", "MCSERVE_KERNELS": "torch", "MCSERVE_CUDA_GRAPHS": "on"})
    assert (config.torch_device(), config.engine.kernels, config.engine.cuda_graphs) == ("cpu", "torch", True)
    assert ServerConfig().torch_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ({"device": "gpu"}, {"cuda_graphs": "maybe"}, {"kernels": "cuda"}):
        with pytest.raises(ServerConfigError, match=next(iter(bad))):
            ServerConfig.load({}, {f"MCSERVE_{k.upper()}": v for k, v in bad.items()})
    if not torch.cuda.is_available():
        with pytest.raises(ServerConfigError, match="no CUDA GPU"):
            ServerConfig(device="cuda:0").torch_device()
