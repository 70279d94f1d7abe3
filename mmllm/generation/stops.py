"""Stop strings found incrementally: each new token decodes a few tokens, never the whole text.

A fast (Rust) tokenizer streams through ``tokenizers.decoders.DecodeStream``, which buffers tokens
until they form whole UTF-8 characters. A slow tokenizer decodes a short window instead: the
text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]`` is the new piece (the window
restarts after every emitted piece, so it stays a few tokens long).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Detokenises one row's tokens as they arrive and reports the first stop string.

    Args:
        tokenizer: an HF tokenizer (fast ones stream through their ``backend_tokenizer``).
        stop: strings that end the row; a match may span several tokens.
        skip_special_tokens: drop special tokens from the text, as ``decode`` does.

    Attributes:
        text: the text decoded so far.
        cut: index in ``text`` of the first stop string once one appeared, else None.
    """

    def __init__(self, tokenizer, stop: Sequence[str], *, skip_special_tokens: bool = True) -> None:
        self.stop = [s for s in stop if s]
        if not self.stop:
            raise ValueError("StopStrings needs at least one non-empty stop string")
        self.longest = max(len(s) for s in self.stop)
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.text, self.cut = "", None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream, self._backend = DecodeStream(skip_special_tokens=skip_special_tokens), backend
        else:
            self._stream, self._ids, self._prefix, self._read = None, [], 0, 0

    def push(self, token: int) -> bool:
        """Adds one token; returns True when the text now contains a stop string."""
        if self.cut is not None:
            return True
        piece = self._piece(int(token))
        if not piece:
            return False
        # Only a match that ends in the new piece is new: search the tail that could hold one.
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        tail = self.text[start:]
        hits = [tail.find(s) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.cut = start + min(hits)
        return self.cut is not None

    def _piece(self, token: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token) or ""
        self._ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip)
        before = decode(self._ids[self._prefix:self._read])
        now = decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]
