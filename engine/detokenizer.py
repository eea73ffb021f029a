"""Incremental detokenization with stop strings.

Text is decoded in a sliding window of token ids (as vLLM does), so each new token costs a few
tokens of decoding, and an incomplete UTF-8 character is held back until it completes. While a
stop string could still be forming, its possible prefix is held back too: a stop string is never
streamed, and the text stops right before it.
"""

from __future__ import annotations

from models.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""       # all decoded text so far
        self.emitted = 0     # characters of `text` already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Feed one token; returns the text that is now safe to emit ('' if none)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character, or a token with no text of its own
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The held-back text, once generation ended for another reason than a stop string."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
                final = True
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
