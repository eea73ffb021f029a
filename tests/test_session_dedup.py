"""Sessions that share a prefix share its blocks in the store: 100 sessions with one 2,000-token
system prompt and a 200-token turn each take at most 1.2x one prefix plus 100 tails."""

from __future__ import annotations

import torch

import models
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from engine.sessions import SessionStore


def store_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_100_sessions_share_one_system_prompt(tmp_path):
    model = models.load(models.default_model_path())
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(0, model.config.vocab_size, (2000,), generator=gen).tolist()
    tails = [torch.randint(0, model.config.vocab_size, (200,), generator=gen).tolist() for _ in range(100)]
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=2048, num_device_blocks=512, num_host_blocks=0)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def save(directory, sessions: dict[str, list[int]]) -> SessionStore:
        engine = LLMEngine(model, config, SessionStore(model.fingerprint, directory))
        for sid, prompt in sessions.items():
            engine.add_request(prompt, params, session_id=sid)
            while engine.has_unfinished():
                engine.step()
        engine.sessions.flush()
        return engine.sessions

    # What the parts cost alone: the prefix's blocks, and one turn's own blocks, slot and manifest.
    alone = save(tmp_path / "alone", {"one": system + tails[0]})
    S = model.config.segment_size
    prefix_blocks = alone.index.entries["one"].blocks[:len(system) // S]
    prefix = sum(alone.index.blobs[("block", k)] for k in prefix_blocks)
    tail = store_bytes(tmp_path / "alone") - prefix
    shared = save(tmp_path / "shared", {f"user-{i}": system + t for i, t in enumerate(tails)})
    total = store_bytes(tmp_path / "shared")
    print(f"\nstore {total:,} bytes; one prefix {prefix:,} + 100 tails of {tail:,} = {prefix + 100 * tail:,}")
    assert total <= 1.2 * (prefix + 100 * tail), (total, prefix, tail)
    index = shared.index
    assert index.logical_bytes / index.physical_bytes > 4  # what the store would take unshared
    assert index.num_blobs("block") == len(prefix_blocks) + 100 * (len(system + tails[0]) // S - len(prefix_blocks))
