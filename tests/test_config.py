"""One configuration tree for `mcserve serve`: every option explains itself in --help, is set by
the command line, MCSERVE_* or a YAML file in that order over the defaults, is logged at start
with secrets masked; JSON logs carry the request id on every line of a request."""

import json
import re
import subprocess
import sys

import httpx
import pytest

from engine.config import EngineConfig
from engine.session_index import SessionLimits
from server.config import OPTIONS, ServerConfig, ServerConfigError
from tests.server_helpers import MODEL_NAME, ServerProcess, save_tiny_model


def test_the_server_config_holds_the_engine_and_store_configs_and_their_defaults():
    config = ServerConfig()
    assert config.engine == EngineConfig() and config.limits == SessionLimits()
    names = {o.name for o in OPTIONS}
    assert {"max_num_seqs", "num_device_blocks", "max_queued_requests", "max_sessions_on_disk"} <= names
    built = ServerConfig.from_options({"max_num_seqs": 4, "num_host_blocks": 0, "max_sessions_on_disk": 9})
    assert (built.engine.max_num_seqs, built.engine.num_host_blocks, built.limits.max_store_sessions) == (4, 0, 9)
    shown = ServerConfig(api_key="k", session_store="redis://:pw@host:6379/0").describe()
    assert (shown["api_key"], shown["session_store"]) == ("***", "redis://:***@host:6379/0")


def test_precedence_is_command_line_then_environment_then_file_then_defaults(tmp_path):
    path = tmp_path / "mcserve.yaml"
    path.write_text("port: 9001\nmax-num-seqs: 8\nnum_device_blocks: 64\ncuda_graphs: on\n")
    env = {"MCSERVE_MAX_NUM_SEQS": "16", "MCSERVE_NUM_DEVICE_BLOCKS": "128"}
    config = ServerConfig.load({"num_device_blocks": 256}, env, file=str(path))
    assert config.port == 9001                       # file over default
    assert config.engine.max_num_seqs == 16           # environment over file
    assert config.engine.num_device_blocks == 256     # command line over environment
    assert config.engine.cuda_graphs is True and config.host == "127.0.0.1"


@pytest.mark.parametrize("text,message", [
    ("nonsense_option: 1\n", "unknown option 'nonsense_option'"),
    ("port: [1]\n", "port must be a int"),
    ("- a\n- b\n", "must be a mapping"),
    ("port: : :\n", "not valid YAML"),
    ("max_num_seqs: 0\n", "max_num_seqs must be > 0"),
])
def test_bad_config_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ServerConfigError, match=message):
        ServerConfig.load({}, {}, file=str(path))


def test_help_explains_every_option_with_its_default_and_variable():
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    flat = " ".join(out.split())
    for opt in OPTIONS:
        if opt.name == "model_set":
            continue
        flag = "--" + opt.name.replace("_", "-")
        assert flag in out and opt.env in flat, flag
        entry = re.search(rf"^  {re.escape(flag)} .*?(?=^  --|\Z)", out, re.M | re.S)  # its entry, not the usage
        assert entry, flag
        text = " ".join(entry.group().split())
        assert "default:" in text and opt.help.split()[0] in text, flag
    assert "command line > environment > file > defaults" in flat


def test_the_start_line_shows_the_effective_config_and_json_logs_carry_request_ids(tmp_path):
    model_dir = save_tiny_model(tmp_path)
    refused = ServerProcess(model_dir, tmp_path / "refused.log", "--session-store", "redis://:hunter2@127.0.0.1:1/0")
    with pytest.raises(AssertionError):
        refused.start()  # an unreachable store stops the start, and its error shows no password
    assert "redis://:***@127.0.0.1:1/0" in refused.log_text() and "hunter2" not in refused.log_text()
    server = ServerProcess(model_dir, tmp_path / "server.log", "--log-format", "json", "--api-key", "sekret-key",
                           "--session-store", f"file://{tmp_path / 'store'}")
    server.start()
    try:
        body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}
        answer = httpx.post(server.url + "/v1/completions", json=body,
                            headers={"Authorization": "Bearer sekret-key", "X-Request-Id": "trace-42"}, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-42"
        assert httpx.get(server.url + "/health").headers["x-request-id"].startswith("req-")
    finally:
        server.stop()
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    start = next(line for line in lines if line["message"].startswith("config "))
    shown = json.loads(start["message"][len("config "):])
    assert shown["api_key"] == "***" and shown["session_store"].endswith("store")
    assert shown["num_device_blocks"] == ServerConfig().engine.num_device_blocks
    text = (tmp_path / "server.log").read_text()
    assert "sekret-key" not in text
    access = [line for line in lines if "POST /v1/completions" in line["message"]]
    assert access and all(line.get("request_id") == "trace-42" for line in access)
