"""Decode first: how many prompt tokens a step may read while other sequences decode. No torch.

A step that reads prompts as well as decoding stretches the inter-token latency of every running
stream by the time the prompts take. `PrefillBudget` learns, from the durations of the engine's
steps, how long a decode-only step takes and how fast prompts are read, and allows a mixed
step as many prompt tokens as keep it within `stretch` decode-only steps. A burst of new
prompts is then read over several steps, each a bounded stall, instead of one long one; with
no stream decoding, the whole token budget is used as before.
"""

from __future__ import annotations

SMOOTHING = 0.2  # weight of the newest step in the running estimates


class PrefillBudget:
    def __init__(self, stretch: float, floor: int):
        """`stretch` >= 1: a mixed step may last this many decode-only steps (0: no bound);
        `floor`: tokens a step may always read, so that prompts progress (a segment)."""
        self.stretch, self.floor = stretch, floor
        self.decode_s: float | None = None       # a decode-only step
        self.tokens_per_s: float | None = None   # prompt tokens read per second, in mixed steps

    def observe(self, decoding: bool, prefill_tokens: int, seconds: float) -> None:
        """Learn from one step: did it decode, how many prompt tokens it read, how long it took."""
        if decoding and not prefill_tokens:
            self.decode_s = _smooth(self.decode_s, seconds)
        elif prefill_tokens and seconds > 0:
            prefill_s = seconds - (self.decode_s or 0.0) if decoding else seconds
            if prefill_s > 0:
                self.tokens_per_s = _smooth(self.tokens_per_s, prefill_tokens / prefill_s)

    def tokens(self) -> int | None:
        """Prompt tokens a step may read while sequences decode; None: no bound (yet)."""
        if not self.stretch or self.decode_s is None or self.tokens_per_s is None:
            return None
        allowed_s = (self.stretch - 1.0) * self.decode_s
        return max(self.floor, int(allowed_s * self.tokens_per_s))


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
