"""A serving benchmark in the manner of `vllm bench serve`, against a running mcserve on loopback.

    python -m loadtests.bench_serve --num-prompts 64 --input-len 256 --output-len 64 --max-concurrency 8
    python -m loadtests.bench_serve --request-rate 4 --duration 60
    python -m loadtests.bench_serve --multi-turn --conversations 4 --turns 4

Synthetic prompts of a set length (random words, counted by the server's own usage report), new on
every run unless `--seed` is given, so that the server has not seen them (`--warm` sends the set
once untimed first, to measure a warm prefix cache on purpose). The share of prompt tokens the
server read from its cache (`usage.prompt_tokens_details.cached_tokens`) is reported. They are
sent as streaming chat completions with `ignore_eos`, so every request generates exactly
`--output-len` tokens (`--sessions`: each names a new session, which the server saves).
Arrivals follow a Poisson process at `--request-rate` (default: all at once),
bounded by `--max-concurrency`, `--num-prompts` and `--duration`. Reported: TTFT, TPOT, ITL and
end-to-end latency (mean, median, p99), request and token throughput, failures; `--json-out`
writes them. `--multi-turn` runs C conversations of T turns twice, resuming each conversation by
session and resending the whole history without one, and reports the TTFT ratio per turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government "
         "number night point home water room mother area money story fact month lot right study book "
         "eye job word business issue side kind head house service friend father power hour game line").split()


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def synthetic_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def stream_chat(client: httpx.AsyncClient, args, messages: list[dict], session_id: str | None,
                      output_len: int) -> tuple[RequestResult, str]:
    body = {"model": args.model, "messages": messages, "max_tokens": output_len, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if session_id:
        body["session_id"] = session_id
    start = time.perf_counter()
    result, text, last = RequestResult(ok=False), [], None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result, ""
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    result.prompt_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                    result.cached_tokens = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
                for choice in chunk.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        text.append(content)
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result, "".join(text)


def summary(values: list[float]) -> dict:
    if not values:
        return {"mean_ms": None, "median_ms": None, "p99_ms": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean_ms": statistics.fmean(values) * 1e3, "median_ms": statistics.median(values) * 1e3,
            "p99_ms": p99 * 1e3}


def report(results: list[RequestResult], elapsed: float) -> dict:
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    in_tokens = sum(r.prompt_tokens for r in good)
    return {
        "completed": len(good), "failed": len(results) - len(good),
        "cached_prompt_share": sum(r.cached_tokens for r in good) / in_tokens if in_tokens else 0.0,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": elapsed,
        "request_throughput": len(good) / elapsed,
        "output_token_throughput": out_tokens / elapsed,
        "total_token_throughput": (in_tokens + out_tokens) / elapsed,
        "mean_prompt_tokens": in_tokens / len(good) if good else 0,
        "ttft": summary([r.ttft for r in good]),
        "tpot": summary([t for r in good if (t := r.tpot) is not None]),
        "itl": summary([x for r in good for x in r.itl]),
        "e2e": summary([r.e2e for r in good]),
    }


async def run_load(args) -> dict:
    rng = random.Random(args.seed)
    prompts = [synthetic_text(rng, args.input_len) for _ in range(args.num_prompts)]
    if args.warm:  # the same set once, untimed: what follows reads a warm prefix cache, on purpose
        await send_all(args, prompts, random.Random(args.seed), "warm")
    return await send_all(args, prompts, rng, "timed")


async def send_all(args, prompts: list[str], rng: random.Random, label: str) -> dict:
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    results: list[RequestResult] = []
    deadline = time.perf_counter() + args.duration if args.duration else None

    tag = f"{int(time.time())}-{args.seed}-{label}"
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout) as client:
        async def one(i: int, prompt: str):
            async with limit:
                if deadline and time.perf_counter() > deadline:
                    return
                session = f"load-{tag}-{i}" if args.sessions else None
                result, _ = await stream_chat(client, args, [{"role": "user", "content": prompt}], session,
                                              args.output_len)
                results.append(result)

        start = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(prompts):
            if deadline and time.perf_counter() > deadline:
                break
            tasks.append(asyncio.create_task(one(i, prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return report(results, elapsed)


async def run_conversations(args, use_sessions: bool, tag: str) -> list[list[RequestResult]]:
    """C conversations in parallel, T turns each; per turn, the results of all conversations."""
    # Each mode gets its own text, so neither reads the other's cached prefix blocks.
    rng = random.Random(f"{args.seed}-{use_sessions}")
    per_turn: list[list[RequestResult]] = [[] for _ in range(args.turns)]
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout) as client:
        async def conversation(c: int):
            history: list[dict] = []
            session = f"bench-{tag}-{args.seed}-{c}" if use_sessions else None
            for turn in range(args.turns):
                history.append({"role": "user", "content": synthetic_text(rng, args.input_len)})
                result, text = await stream_chat(client, args, history, session, args.output_len)
                per_turn[turn].append(result)
                history.append({"role": "assistant", "content": text})
        await asyncio.gather(*[conversation(c) for c in range(args.conversations)])
    return per_turn


async def run_multi_turn(args) -> dict:
    tag = f"{int(time.time())}"
    resumed = await run_conversations(args, True, tag)
    resent = await run_conversations(args, False, tag)
    turns = []
    for t, (a, b) in enumerate(zip(resumed, resent), start=1):
        ttft_a = statistics.fmean(r.ttft for r in a if r.ok) if any(r.ok for r in a) else None
        ttft_b = statistics.fmean(r.ttft for r in b if r.ok) if any(r.ok for r in b) else None
        ok = [r for r in a if r.ok]  # every request of a turn may fail (a crashed server)
        turns.append({"turn": t, "prompt_tokens": statistics.fmean(r.prompt_tokens for r in ok) if ok else None,
                      "cached_tokens_with_session": statistics.fmean(r.cached_tokens for r in ok) if ok else None,
                      "ttft_ms_session": ttft_a * 1e3 if ttft_a else None,
                      "ttft_ms_resend": ttft_b * 1e3 if ttft_b else None,
                      "speedup": ttft_b / ttft_a if ttft_a and ttft_b else None,
                      "failed": sum(not r.ok for r in a + b)})
    return {"conversations": args.conversations, "turns": turns}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"bench_serve: refusing {url}: this benchmark runs against loopback only")


async def detect_model(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return (await client.get("/v1/models")).json()["data"][0]["id"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="default: the server's first model")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128, help="words of synthetic prompt (~tokens)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson")
    parser.add_argument("--max-concurrency", type=int, default=0)
    parser.add_argument("--duration", type=float, default=0, help="stop sending after this many seconds")
    parser.add_argument("--sessions", action="store_true", help="each request of the load names a new "
                        "session, so every response also saves one")
    parser.add_argument("--multi-turn", action="store_true")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, help="repeat a prompt set (default: a new one every run)")
    parser.add_argument("--warm", action="store_true", help="send the prompt set once, untimed, before the "
                        "timed run: measures a warm prefix cache (reported as warm)")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    check_loopback(args.base_url)
    try:
        args.model = args.model or asyncio.run(detect_model(args.base_url))
    except httpx.HTTPError as e:
        raise SystemExit(f"bench_serve: no server at {args.base_url} ({e})") from None
    result = asyncio.run(run_multi_turn(args) if args.multi_turn else run_load(args))
    result["config"] = {k: (str(v) if v == float("inf") else v) for k, v in vars(args).items() if k != "json_out"}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
