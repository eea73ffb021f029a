"""What holding freed memory (engine/host_memory.py) is worth: plain decode tokens/s at batch 32
on the bundled model, with glibc's default malloc thresholds and with them held, each in fresh
processes taken in turn, and the minor page faults of every run.

    python -m benchmarks.host_memory [--pairs 3] [--runs 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys


def measure(mode: str, runs: int, tokens: int) -> dict:
    import engine.llm_engine as llm_engine
    if mode == "default":
        llm_engine.hold_freed_memory = lambda: False
    import models
    from benchmarks.structured_decode import run
    from engine.config import EngineConfig
    from engine.params import SamplingParams

    model = models.load(models.default_model_path())
    tok = model.tokenizer
    engine = llm_engine.LLMEngine(model, EngineConfig(max_num_seqs=32, num_device_blocks=1024, num_host_blocks=0))
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True, stop_token_ids=tuple(tok.eos_ids))
    prompts = [tok.encode(f"Call me Ishmael. Some years ago ({i})") for i in range(32)]
    run(engine, prompts[:1], [params])  # warm-up
    speeds, faults = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        speeds.append(run(engine, prompts, [params] * len(prompts))[0])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"mode": mode, "tok_s": round(statistics.median(speeds), 1), "minor_faults": faults}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--child", choices=["default", "held"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.runs, args.tokens)))
        return
    for _ in range(args.pairs):
        for mode in ("default", "held"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.host_memory", "--child", mode, "--runs",
                                  str(args.runs), "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
