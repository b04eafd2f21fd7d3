"""Generated token ids to text, incrementally: multi-byte characters, EOS and stop sequences."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns new token ids into the text that is safe to send, as they arrive.

    Each token adds a piece of text, decoded over a short window as streaming servers do; a token
    that ends inside a multi-byte character adds "" and its bytes come with the next one. The text
    ends at EOS or where the earliest stop sequence starts; text that may still turn out to be the
    start of a stop sequence is held back. Feeding the ids all at once or one by one gives the same
    text, finish reason and token count.
    """

    def __init__(self, tokenizer: Any, eos_id: int | None, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.stops = stops
        self.ids: list[int] = []
        self.pieces: list[str] = []  # the text each token added
        self.text = ""  # "".join(pieces)
        self.sent = 0  # characters of text already handed out
        self.finish_reason: str | None = None  # set once the text is complete: "stop" or "length"
        self.completion_tokens = 0  # tokens generated up to the end of the text, EOS included
        self._window = (0, 0)  # ids[prefix:read]: the already decoded context of the next piece

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, new_ids: list[int]) -> str:
        """Take newly generated ids; return the text they release (ids after the end are ignored)."""
        if self.finished:
            return ""
        for token in new_ids:
            if token == self.eos_id:
                return self._end(eos=True)
            self.ids.append(token)
            self._add_piece(last=False)
        cut, hold = self._scan()
        if cut is not None and cut <= hold:  # no earlier stop sequence can still complete
            return self._release(cut, "stop")
        return self._release(hold)

    def released_tokens(self) -> int:
        """Tokens whose text has been handed out in full (all of them, EOS included, once finished)."""
        if self.finished:
            return self.completion_tokens
        length, count = 0, 0
        for piece in self.pieces:
            if length + len(piece) > self.sent:
                break
            length += len(piece)
            count += 1
        return count

    def close(self) -> str:
        """Generation ended without EOS (the token budget ran out): return the rest of the text."""
        return "" if self.finished else self._end(eos=False)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _add_piece(self, last: bool) -> None:
        """The piece of the newest token; ``last`` lets it end in an incomplete character."""
        prefix, read = self._window
        before = self._decode(self.ids[prefix:read])
        after = self._decode(self.ids[prefix:])
        if len(after) > len(before) and (last or not after.endswith("\ufffd")) and after.startswith(before):
            piece = after[len(before) :]
            self._window = (read, len(self.ids))
        else:
            piece = ""
        if last:  # the newest token's piece is decided again, now that no token follows it
            self.pieces[-1] = piece
        else:
            self.pieces.append(piece)
        self.text += piece

    def _end(self, eos: bool) -> str:
        if self.ids and not self.pieces[-1]:
            self._add_piece(last=True)
        self.completion_tokens = len(self.ids) + eos
        cut, _ = self._scan()
        if cut is not None:
            return self._release(cut, "stop")
        return self._release(len(self.text), "stop" if eos else "length")

    def _scan(self) -> tuple[int | None, int]:
        """Where the earliest complete stop sequence starts (None: none does), and where the
        earliest stop sequence that the next tokens could still complete starts (len(text): none)."""
        start = self.sent  # text already sent holds no stop sequence, so none starts before here
        found = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
        hold = len(self.text)
        for stop in self.stops:
            longest = min(len(stop) - 1, len(self.text) - start)
            for size in range(longest, 0, -1):
                if self.text.endswith(stop[:size]):
                    hold = min(hold, len(self.text) - size)
                    break
        return min(found, default=None), hold

    def _release(self, end: int, finish_reason: str | None = None) -> str:
        """Hand out text[sent:end]; with a finish reason the text ends at ``end``."""
        delta = self.text[self.sent : end]
        self.sent = end
        if finish_reason is not None:
            if end < len(self.text):  # cut by a stop sequence: count tokens up to the one holding the cut
                self.completion_tokens = self._tokens_before(end)
            self.finish_reason = finish_reason
        return delta

    def _tokens_before(self, cut: int) -> int:
        """How many tokens it takes to reach character ``cut`` of the text."""
        length = 0
        for count, piece in enumerate(self.pieces, start=1):
            if length + len(piece) >= cut:
                return count
            length += len(piece)
        return len(self.pieces)
