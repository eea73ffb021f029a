"""Build the server from its config, and run it under uvicorn."""

from __future__ import annotations

from pathlib import Path

import uvicorn
from fastapi import FastAPI

import models
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.session_index import SessionLimits
from engine.sessions import SessionStore

from .app import build_app
from .config import ServerConfig


def create_app(config: ServerConfig) -> FastAPI:
    model_dir = Path(config.model) if config.model else models.default_model_path()
    model = models.load(model_dir)
    engine_config = EngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        num_device_blocks=config.num_device_blocks, num_host_blocks=config.num_host_blocks,
        ckpt_dtype=config.ckpt_dtype, max_waiting=config.max_queued_requests)
    limits = SessionLimits(config.max_sessions_in_memory, config.max_session_memory_bytes,
                           config.max_sessions_on_disk, config.max_session_disk_bytes)
    store = SessionStore(model.fingerprint, config.session_dir or None, limits)
    engine = AsyncEngine(LLMEngine(model, engine_config, store))
    return build_app(engine, config, config.served_model_name or model_dir.name)


def run_server(config: ServerConfig) -> None:
    app = create_app(config)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown: the app's lifespan then lets
    # in-flight requests finish (or saves them) before the process exits.
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=int(config.shutdown_grace_s) + 5)
