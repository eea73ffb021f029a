"""llguidance against xgrammar on this engine's tokenizers: how long a JSON schema takes to compile,
what one decode step's token masks cost at a batch of 32 (filling them, then applying them to
the logits), walking each matcher through the same schema-valid document, and whether what they
allow is valid: random walks, each token drawn uniformly from the allowed ones (a model that
knows nothing), decoded and checked with json.loads and jsonschema.

    python -m benchmarks.grammar_engines [--tokenizer tokenizer.json] [--batch 32] [--repeats 3]

The bundled model's tokenizer is the default; any Hugging Face tokenizer.json (byte-level BPE)
works, e.g. GPT-2's 50,257 tokens, to see the cost at a common vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["captain", "mate", "harpooneer", "cook"]},
        "ships": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "tons": {"type": "number"}},
            "required": ["name", "tons"], "additionalProperties": False}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "ships"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ahab", "age": 58, "role": "captain",
                       "ships": [{"name": "Pequod", "tons": 273.5}, {"name": "Rachel", "tons": 301}]},
                      separators=(",", ":"))


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer
    text = path.read_text()
    hf = Tokenizer.from_str(text)
    vocab = hf.get_vocab(with_added_tokens=True)
    by_id = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        by_id[i] = token
    return text, hf, by_id


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: list[str], eos: int):
        import llguidance
        import llguidance.torch as lt
        self.llg, self.lt = llguidance, lt
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json)
        self.vocab_size = self.tokenizer.vocab_size
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matchers(self, grammar, n: int):
        return [self.llg.LLMatcher(self.tokenizer, grammar) for _ in range(n)]

    def bitmask(self, n: int):
        return self.lt.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matchers, bitmask):
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def done(self, matcher) -> bool:
        return matcher.is_stopped() or matcher.is_accepting() and matcher.is_stopped()

    def consume(self, matchers, token: int):
        for m in matchers:
            assert m.consume_token(token), m.get_error()

    def apply(self, logits, bitmask):
        self.lt.apply_token_bitmask_inplace(logits, bitmask)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: list[str], eos: int):
        import xgrammar as xgr
        self.xgr = xgr
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=len(vocab), stop_token_ids=[eos])
        self.vocab_size = len(vocab)

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)  # a cold compile each time
        return compiler.compile_json_schema(json.dumps(schema))

    def matchers(self, grammar, n: int):
        return [self.xgr.GrammarMatcher(grammar) for _ in range(n)]

    def bitmask(self, n: int):
        return self.xgr.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matchers, bitmask):
        for i, m in enumerate(matchers):  # xgrammar's BatchGrammarMatcher would thread this
            m.fill_next_token_bitmask(bitmask, i)

    def consume(self, matchers, token: int):
        for m in matchers:
            assert m.accept_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def measure(engine, tokens: list[int], batch: int, repeats: int) -> dict:
    compile_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        grammar = engine.compile(SCHEMA)
        compile_s.append(time.perf_counter() - started)
    fill_s, apply_s = [], []
    logits = torch.randn(batch, engine.vocab_size)
    for _ in range(repeats):
        matchers, bitmask = engine.matchers(grammar, batch), engine.bitmask(batch)
        for token in tokens:
            started = time.perf_counter()
            engine.fill(matchers, bitmask)
            fill_s.append(time.perf_counter() - started)
            assert allowed(bitmask, 0, token), f"{engine.name} refused a token of a valid document"
            started = time.perf_counter()
            engine.apply(logits.clone(), bitmask)
            apply_s.append(time.perf_counter() - started)
            engine.consume(matchers, token)
    return {"engine": engine.name, "compile_ms": 1e3 * statistics.median(compile_s),
            "fill_ms_per_step": 1e3 * statistics.mean(fill_s), "fill_ms_p99": 1e3 * sorted(fill_s)[int(0.99 * len(fill_s))],
            "apply_ms_per_step": 1e3 * statistics.mean(apply_s), "steps": len(tokens)}


def random_walks(engine, hf, eos: int, walks: int, max_tokens: int = 400) -> dict:
    """Documents drawn token by token uniformly among the allowed tokens; how many end (the grammar
    complete within max_tokens), and how many of those are valid JSON matching the schema."""
    import jsonschema
    grammar = engine.compile(SCHEMA)
    gen = torch.Generator().manual_seed(0)
    ended = valid = 0
    for _ in range(walks):
        matcher, bitmask, ids = engine.matchers(grammar, 1)[0], engine.bitmask(1), []
        for _ in range(max_tokens):
            engine.fill([matcher], bitmask)
            bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
            choices = bits.view(-1)[:engine.vocab_size].nonzero().view(-1)
            token = int(choices[torch.randint(len(choices), (1,), generator=gen)])
            if token == eos:
                break
            engine.consume([matcher], token)
            ids.append(token)
            if engine.done(matcher):
                break
        else:
            continue
        ended += 1
        try:
            jsonschema.validate(json.loads(hf.decode(ids)), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return {"walks": walks, "ended": ended, "valid_json_and_schema": valid}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[1] / "models" / "weights" / "mc-gla-grm-small" / "tokenizer.json"
    parser.add_argument("--tokenizer", type=Path, default=default, help="a tokenizer.json (default: the bundled model's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--walks", type=int, default=20, help="random documents checked for validity")
    args = parser.parse_args(argv)
    text, hf, vocab = load_tokenizer(args.tokenizer)
    eos = hf.token_to_id("<|endoftext|>") or 0
    tokens = hf.encode(DOCUMENT).ids
    print(f"tokenizer {args.tokenizer} ({len(vocab)} tokens), document of {len(tokens)} tokens, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    for cls in (LLGuidance, XGrammar):
        engine = cls(text, vocab, eos)
        print(json.dumps({**measure(engine, tokens, args.batch, args.repeats),
                          **random_walks(engine, hf, eos, args.walks)}))


if __name__ == "__main__":
    main()
