"""Build the server from its config, and run it under uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

import models
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from engine.sessions import SessionStore
from engine.store.backend import open_backend

from .app import build_app
from .config import ServerConfig
from .http_protocol import bounded_h11
from .logs import configure_logging
from .tenants import TenantDirectory

log = logging.getLogger("mcserve")


def create_app(config: ServerConfig, engine_thread: bool = True) -> FastAPI:
    """The app over a started engine; with `engine_thread` False the caller runs the engine's
    loop (`run_server`: on the main thread)."""
    tenants = TenantDirectory.from_config(config.api_key, config.api_keys_file)  # a bad keys file fails first
    model_dir = Path(config.model) if config.model else models.default_model_path()
    model = models.load(model_dir, device=config.torch_device(), overrides=config.model_overrides(),
                        dtype=config.torch_dtype())
    store = SessionStore(model.fingerprint, open_backend(config.store), config.limits,
                         durability=config.session_durability,
                         lease_s=config.session_lease_s)
    engine = AsyncEngine(LLMEngine(model, config.engine, store), start_thread=engine_thread)
    log.info("max_model_len %d tokens (%d device checkpoint blocks of %d tokens)", engine.engine.max_model_len,
             config.engine.num_device_blocks, model.config.segment_size)
    return build_app(engine, config, config.served_model_name or model_dir.name, tenants)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, start draining the engine at once (stop accepting; in-flight requests
    get `shutdown_grace_s` to finish, then end with finish_reason 'abort', their sessions saved),
    so their responses complete before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float):
        super().__init__(config)
        self.app, self.grace_s, self.loop = app, grace_s, None

    async def _serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super()._serve(sockets)
        # The drain is done: exit with status 0 rather than re-raising the signal (uvicorn's default).
        getattr(self, "_captured_signals", []).clear()

    def handle_exit(self, sig, frame) -> None:
        engine = self.app.state.mc.engine
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(engine.shutdown(self.grace_s)))
        super().handle_exit(sig, frame)


def uvicorn_config(app: FastAPI, config: ServerConfig, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, log_config=None,
                          http=bounded_h11(config.request_timeout_s, config.max_connections),
                          timeout_graceful_shutdown=int(config.shutdown_grace_s) + 10)


def run_server(config: ServerConfig) -> None:
    configure_logging(config.log_format)
    log.info("config %s", json.dumps(config.describe()))
    app = create_app(config, engine_thread=False)
    engine: AsyncEngine = app.state.mc.engine
    server = DrainingServer(uvicorn_config(app, config), app, config.shutdown_grace_s)

    failed: list[BaseException] = []

    def serve_http() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - uvicorn's sys.exit(1) (a port in use): the process's
            failed.append(e)
        finally:
            engine.stop_loop()  # a no-op after a drain; ends the loop if uvicorn stopped on its own

    # The engine steps on the main thread (prefill runs 1.3x faster there than on another thread
    # here), HTTP on its own; signals arrive on the main thread, so they are handed to uvicorn.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    http = threading.Thread(target=serve_http, name="mcserve-http")
    http.start()
    engine.run_loop()
    http.join()
    if failed:
        raise failed[0]
