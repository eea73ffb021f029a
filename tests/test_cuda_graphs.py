"""CUDA graphs of the decode step: bucket choice everywhere; capture and replay on CUDA only (the
padded static step they replay is tested on the CPU in test_model_runner)."""

import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import batch_buckets, bucket, width_bucket
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from tests.helpers import tiny_model


def test_buckets_cover_every_batch_and_width():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(3) == [1, 2, 3] and batch_buckets(1) == [1]
    for max_seqs in (1, 5, 8, 33):
        buckets = batch_buckets(max_seqs)
        assert all(b <= bucket(b, buckets) <= max_seqs for b in range(1, max_seqs + 1))
    assert [width_bucket(w) for w in (0, 1, 2, 3, 5, 8, 9)] == [0, 1, 2, 4, 8, 8, 16]


def test_graphs_need_the_triton_path_on_cuda():
    model = tiny_model()  # on the CPU
    for kernels, graphs in (("triton", True), ("torch", True), ("triton", False)):
        config = EngineConfig(kernels=kernels, cuda_graphs=graphs, max_num_seqs=2, num_device_blocks=8,
                              num_host_blocks=0)
        assert LLMEngine(model, config).runner.graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("memory,aggregation,boundary", [("gla", "grm", "carry"), ("delta", "ssc", "reset")])
def test_graph_replay_equals_eager_kernels(memory, aggregation, boundary):
    model = tiny_model(memory=memory, aggregation=aggregation, boundary=boundary).cuda()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 61, (n,), generator=gen).tolist() for n in (12, 3, 7, 20, 1)]
    params = SamplingParams(max_tokens=17, temperature=0.0)
    outs = []
    for graphs in (False, True):
        config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, num_device_blocks=64, num_host_blocks=64,
                              max_prefill_chunk=8, kernels="triton", cuda_graphs=graphs)
        engine = LLMEngine(model, config)
        outs.append(engine.generate(prompts, params))
        assert (engine.runner.graphs is not None) == graphs
    assert outs[0] == outs[1]
    assert len(engine.runner.graphs.captured) > 1  # several batch and width buckets were used
