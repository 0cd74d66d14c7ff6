"""TextStream: a request's generated ids -> text deltas, in time linear in the output.

Each push decodes only a short window of ids -- the ids of the previous push (so a tokenizer that joins
tokens, e.g. a leading space, sees its left context) plus the new ones -- and takes the text past the window's
left part (the incremental detokenization of TGI and vLLM). A multi-byte character split across tokens is never
split across deltas: while the window's text ends in U+FFFD (an incomplete byte sequence) the window is not
moved on, and the text before the U+FFFD is emitted. Stop strings are cut: text that might be the start of one
is held back, and once one appears the text ends before it and `stopped` is set. With `include_stop` (vLLM's
include_stop_str_in_output) the text ends after the stop string instead, and nothing needs holding back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_WINDOW_IDS = 64  # a window that never completes a character (invalid bytes) moves on, U+FFFD and all


class TextStream:
    def __init__(self, detokenize: Callable[[list[int]], str], stop: Sequence[str] = (),
                 include_stop: bool = False) -> None:
        self._detokenize = detokenize
        self._include_stop = include_stop
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window is ids[_prefix_offset:]; ids before _read_offset are its left context
        self._read_offset = 0
        self._prefix_len = 0  # len(decode(ids[_prefix_offset:_read_offset]))
        self._taken = 0  # chars of the window's new text already moved to _pending
        self._pending = ""  # decoded text not emitted yet (held back: it may start a stop string)
        self._emitted: list[str] = []
        self._tail = ""  # the last characters emitted, enough to find a stop string straddling the boundary
        self.stopped = False

    @property
    def text(self) -> str:
        """All the text emitted so far."""
        return "".join(self._emitted)

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the text that is now safe to emit."""
        assert not self.stopped, "push after a stop string"
        self._ids.extend(ids)
        self._pending += self._decode_new(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of the request: everything not emitted yet, held-back text included."""
        if self.stopped:
            return ""
        self._pending += self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> str:
        """Text the window gained since the last call (never an incomplete character unless `final`)."""
        window = self._detokenize(self._ids[self._prefix_offset:])
        new = window[self._prefix_len:]
        complete = not new.endswith("\ufffd")
        if not (complete or final or len(self._ids) - self._prefix_offset > MAX_WINDOW_IDS):
            ok = new.rstrip("\ufffd")
            out, self._taken = ok[self._taken:], max(self._taken, len(ok))
            return out
        out = new[self._taken:]
        # move the window on: the ids just decoded become the left context of the next push
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_len = len(self._detokenize(self._ids[self._prefix_offset:self._read_offset]))
        self._taken = 0
        return out

    def _release(self, final: bool) -> str:
        text = self._pending
        found = self._find_stop(text)
        if found is not None:
            self.stopped = True
            return self._emit(text[:found[1] if self._include_stop else found[0]], "")
        if final:
            return self._emit(text, "")
        hold = 0 if self._include_stop else self._stop_prefix_len(text)
        return self._emit(text[:len(text) - hold], text[len(text) - hold:])

    def _emit(self, out: str, keep: str) -> str:
        self._pending = keep
        if out:
            self._emitted.append(out)
            self._tail = (self._tail + out)[-self._longest_stop:] if self._longest_stop else ""
        return out

    def _find_stop(self, text: str) -> tuple[int, int] | None:
        """(start, end) in `text` of the earliest stop string (one may begin in the emitted tail: start 0)."""
        if not self._stop:
            return None
        joined = self._tail + text
        hits = [(i, i + len(s)) for s, i in ((s, joined.find(s)) for s in self._stop) if i >= 0]
        if not hits:
            return None
        # with include_stop the text ends where a stop string first completes (the earliest end)
        start, end = min(hits, key=lambda h: (h[1], h[0])) if self._include_stop else min(hits)
        return max(0, start - len(self._tail)), max(0, end - len(self._tail))

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
