"""The ModelRunner's pooled, batched steps give the model's own logits."""

import pytest
import torch

from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from tests.helpers import max_err, tiny_model, tokens

SEG = 5


class PooledSequence:
    """Drives one sequence through the runner, allocating blocks naively."""

    def __init__(self, runner, slot, next_block):
        self.runner, self.slot, self.table, self.pos = runner, slot, [], 0
        self.next_block = next_block
        runner.init_slot(slot, None)

    def blocks_for(self, n_tokens):
        ends = [p for p in range(self.pos, self.pos + n_tokens) if (p + 1) % SEG == 0]
        return [self.next_block() for _ in ends]


@pytest.mark.parametrize("arch,memory,aggregation,boundary", [
    ("mcserve", "gla", "grm", "carry"), ("mcserve", "delta", "ssc", "reset"), ("mcserve", "linear", "residual", "carry"),
    ("mcserve", "gla", "soup", "reset"), ("mcserve", "delta", "none", "carry"), ("mcserve", "gla", "none", "reset"),
    ("mamba2", "gla", "grm", "carry"), ("gated_deltanet", "delta", "soup", "reset")])
# bf16: the loud random test model amplifies rounding; on the bundled model the difference is
# ~2e-3 (test_bf16_storage_on_the_bundled_model).
@pytest.mark.parametrize("ckpt_dtype,tol", [("fp32", 1e-4), ("bf16", 0.5)])
# padded: the Triton kernels (interpreter on the CPU) in the static step as a CUDA graph replays
# it, with spare rows (the spare slot) and a wider block table than needed. (The unpadded Triton
# path is covered end to end in test_engine.)
@pytest.mark.parametrize("path", ["torch", "padded"])
@torch.no_grad()
def test_batched_decode_over_pools_equals_model(arch, memory, aggregation, boundary, ckpt_dtype, tol, path):
    if path == "padded" and ckpt_dtype == "bf16":
        pytest.skip("the kernels' bf16 storage is covered by the kernel tests")
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation, boundary=boundary)
    runner = ModelRunner(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, num_device_blocks=40,
                                             num_host_blocks=8, ckpt_dtype=ckpt_dtype,
                                             kernels="torch" if path == "torch" else "triton"))

    def decode(*args):
        if path == "torch":
            return runner.decode(*args)
        batch = runner.decode_batch(*args, rows=len(args[0]) + 2, width=max(map(len, args[1])) + 3)
        return runner.decode_static(**batch)[:len(args[0])]

    counter = iter(range(1, 40))  # block 0 stays unused so padding has a clean target
    toks = tokens(3, 30, seed=4)
    prompt_lens = [3, 11, 7]      # sequences at different positions and block counts
    reference = model(toks)

    seqs = [PooledSequence(runner, slot, lambda: next(counter)) for slot in range(3)]
    for s, n in zip(seqs, prompt_lens):
        new = s.blocks_for(n)
        logits = runner.prefill([s.slot], [s.table], [0], [toks[seqs.index(s), :n].tolist()], [new])[0]
        s.table += new
        s.pos = n
        assert max_err(logits, reference[seqs.index(s), n - 1]) < tol
    for _ in range(12):
        new = [s.blocks_for(1) for s in seqs]
        logits = decode([s.slot for s in seqs], [list(s.table) for s in seqs], [s.pos for s in seqs],
                        [toks[b, s.pos].item() for b, s in enumerate(seqs)], [n[0] if n else None for n in new])
        for b, s in enumerate(seqs):
            s.table += new[b]
            assert max_err(logits[b], reference[b, s.pos]) < tol, (b, s.pos)
            s.pos += 1


@torch.no_grad()
def test_prefix_restart_from_a_block_and_swap_round_trip():
    model = tiny_model(memory="gla", aggregation="grm")
    runner = ModelRunner(model, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64,
                                             num_device_blocks=10, num_host_blocks=10))
    toks = tokens(1, 17, seed=2)[0].tolist()
    reference = model(torch.tensor([toks]))[0]
    runner.init_slot(0, None)
    runner.prefill([0], [[]], [0], [toks[:10]], [[1, 2]])  # two segments -> blocks 1, 2
    # A second sequence restarts at the boundary after block 2 and reads the rest.
    runner.init_slot(1, 2)
    assert max_err(runner.prefill([1], [[1, 2]], [10], [toks[10:]], [[3]])[0], reference[-1]) < 1e-4
    # Swap blocks out and back in through the host tier: bit-exact.
    before = runner.read_blocks([1, 2, 3])
    runner.copy_blocks([(1, 5), (2, 6), (3, 7)], "device", "host")
    runner.write_blocks([1, 2, 3], {k: torch.zeros_like(v) for k, v in before.items()})
    runner.copy_blocks([(5, 1), (6, 2), (7, 3)], "host", "device")
    after = runner.read_blocks([1, 2, 3])
    assert all(torch.equal(before[k], after[k]) for k in before)


@torch.no_grad()
def test_bf16_storage_on_the_bundled_model():
    import models
    model = models.load(models.default_model_path())
    toks = tokens(1, 64 * 12 + 5, seed=8, vocab=4096)[0].tolist()
    last = {}
    for dtype in ("fp32", "bf16"):
        runner = ModelRunner(model, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, num_device_blocks=16,
                                                 num_host_blocks=0, ckpt_dtype=dtype))
        runner.init_slot(0, None)
        blocks = list(range(1, 13))
        runner.prefill([0], [[]], [0], [toks[:-1]], [blocks])
        last[dtype] = runner.decode([0], [blocks], [len(toks) - 1], [toks[-1]], [None])[0]
    assert max_err(last["fp32"], last["bf16"]) < 0.02
    assert last["fp32"].argmax() == last["bf16"].argmax()


PACKED = [("mcserve", "gla", "grm", "carry", 5), ("mcserve", "delta", "ssc", "reset", 5),
          ("mcserve", "linear", "residual", "carry", 5), ("mcserve", "gla", "soup", "reset", 5),
          ("mcserve", "delta", "none", "carry", 5), ("mamba2", "gla", "grm", "carry", 5),
          ("gated_deltanet", "delta", "soup", "reset", 5),
          # two chunks of 40 per segment: rows end their segments at different chunks
          ("mcserve", "gla", "ssc", "reset", 80), ("mcserve", "delta", "residual", "carry", 80)]


# (what each sequence read in earlier steps, what it reads in the packed step), in segments S
SCENARIOS = {"spread": (lambda S: [0, 3, 2 * S + 1, S + S // 2], lambda S: [2 * S + 3, 1, S - 2, 3 * S]),
             # short rows: one ends a segment, the others' grids reach past the longest row
             "short": (lambda S: [S - 1, 0, 2, 2 * S - 2], lambda S: [1, 1, 2, 3])}


@pytest.mark.parametrize("arch,memory,aggregation,boundary,segment", PACKED)
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("scenario", SCENARIOS)
@torch.no_grad()
def test_packed_prefill_equals_the_model(arch, memory, aggregation, boundary, segment, kernels, scenario):
    """One forward reads four sequences' chunks, each at its own position, length and number of
    checkpoints; every row's logits, and the state it decodes on from, are the model's own."""
    model = tiny_model(arch=arch, memory=memory, aggregation=aggregation, boundary=boundary, segment_size=segment)
    runner = ModelRunner(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, num_device_blocks=60,
                                             num_host_blocks=0, kernels=kernels))
    S = segment
    read_before, packed = (f(S) for f in SCENARIOS[scenario])
    toks = tokens(4, max(a + b for a, b in zip(read_before, packed)) + 2, seed=5)
    reference = model(toks)
    counter = iter(range(1, 60))
    new_blocks = lambda start, n: [next(counter) for p in range(start, start + n) if (p + 1) % S == 0]
    tables = [[] for _ in range(4)]
    for b, n in enumerate(read_before):
        runner.init_slot(b, None)
        if n:
            tables[b] = new_blocks(0, n)
            runner.prefill([b], [[]], [0], [toks[b, :n].tolist()], [tables[b]])

    news = [new_blocks(a, n) for a, n in zip(read_before, packed)]
    logits = runner.prefill([0, 1, 2, 3], [list(t) for t in tables], read_before,
                            [toks[b, a:a + n].tolist() for b, (a, n) in enumerate(zip(read_before, packed))], news)
    positions = [a + n for a, n in zip(read_before, packed)]
    for b in range(4):
        assert max_err(logits[b], reference[b, positions[b] - 1]) < 1e-4, b
        tables[b] += news[b]
    for _ in range(2):  # the slots and the new checkpoints carry on exactly
        ends = [new_blocks(p, 1) for p in positions]
        out = runner.decode([0, 1, 2, 3], [list(t) for t in tables], positions,
                            [toks[b, p].item() for b, p in enumerate(positions)], [e[0] if e else None for e in ends])
        for b in range(4):
            assert max_err(out[b], reference[b, positions[b]]) < 1e-4, (b, positions[b])
            tables[b] += ends[b]
            positions[b] += 1


@pytest.mark.parametrize("decode_threads,expected", [(1, 1), (0, 2)])
def test_decode_runs_on_its_own_thread_count(decode_threads, expected):
    """The CPU decode step runs on `decode_threads` torch threads; prefill and everything after
    keep torch's own count."""
    model = tiny_model()
    runner = ModelRunner(model, EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, num_device_blocks=8,
                                             num_host_blocks=0, decode_threads=decode_threads))
    seen = []
    math = runner.decode_math
    runner.decode_math = lambda *args: (seen.append(torch.get_num_threads()), math(*args))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner.init_slot(0, None)
        runner.prefill([0], [[]], [0], [[1, 2, 3]], [[]])
        runner.decode([0], [[]], [3], [4], [None])
        assert seen == [expected] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
