"""What --compile-decode (torch.compile of the decode step) is worth: decode tokens/s of the
bundled model at a few batch sizes, eager against compiled, engines side by side in one process
(ABBA order, the speed-up is the median over adjacent pairs).

    python -m benchmarks.compiled_decode [--batches 1,8,32] [--tokens 128] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import models
from benchmarks.structured_decode import run
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    model = models.load(models.default_model_path())
    tok = model.tokenizer
    config = dict(max_num_seqs=32, num_device_blocks=1024, num_host_blocks=0)
    started = time.perf_counter()
    engines = {"eager": LLMEngine(model, EngineConfig(**config)),
               "compiled": LLMEngine(model, EngineConfig(**config, compile_decode=True))}
    print(f"bundled model; engines built in {time.perf_counter() - started:.1f} s (compiling included)", flush=True)
    params = SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=0, ignore_eos=True,
                            stop_token_ids=tuple(tok.eos_ids))
    text = "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse"
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tok.encode(f"{text} ({i})") for i in range(batch)]
        for engine in engines.values():
            run(engine, prompts, [params] * batch)  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(args.repeats):
            for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                runs[name].append(round(run(engines[name], prompts, [params] * batch)[0], 1))
        speedup = statistics.median(c / e for e, c in zip(runs["eager"], runs["compiled"]))
        print(json.dumps({"batch": batch, "eager_tok_s": statistics.median(runs["eager"]),
                          "compiled_tok_s": statistics.median(runs["compiled"]), "speedup": round(speedup, 2),
                          "runs": runs}), flush=True)


if __name__ == "__main__":
    main()
