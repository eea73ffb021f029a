"""The compiled decode step (--compile-decode, torch.compile) decodes what the eager one does."""

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from tests.helpers import tiny_model


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled here, not read from a cache
    torch._dynamo.reset()
    model = tiny_model(segment_size=8)
    # Batches of 1 and more, block tables of 0, 1 and many checkpoints, segment ends while decoding.
    prompts = [[3], [5, 6, 7, 8, 9, 10, 11, 12, 13], list(range(1, 40)), list(range(40, 61))]
    params = SamplingParams(max_tokens=20, temperature=0)
    config = EngineConfig(max_num_seqs=4, num_device_blocks=64, num_host_blocks=0)
    eager = LLMEngine(model, config).generate(prompts, params)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, num_device_blocks=64, num_host_blocks=0, compile_decode=True))
    assert engine.runner.decode_math is not engine.runner._decode_math
    assert engine.generate(prompts, params) == eager
    assert engine.generate(prompts[:1], params) == eager[:1]
