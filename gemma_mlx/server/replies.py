"""The token ids of the replies a model gave, by their text, so that a client that sends them
back is read as the model wrote them.

Clients resend a conversation as text. Tokenizing a reply's text again need not give the ids
the model generated (a word split otherwise at a boundary), and then the prefix cache matches
only up to that point and the rest is prefilled again. `Chat` replays its own replies as their
ids; the server does the same for the replies it remembers: a chat turn whose text is a reply
it gave, or a raw prompt that continues a completion it gave (the prompt and its reply).
Bounded, least recently used first out; only texts whose ids decode back to them exactly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

REPLIES_KEPT = 256


class ReplyMemory:
    def __init__(self, size: int = REPLIES_KEPT):
        self.size = size
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, text: str, ids: Sequence[int]) -> None:
        if not text:
            return
        with self._lock:
            self._ids[text] = list(ids)
            self._ids.move_to_end(text)
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)

    def recall(self, text: str) -> list[int] | None:
        """The ids of exactly this text."""
        with self._lock:
            ids = self._ids.get(text)
            if ids is not None:
                self._ids.move_to_end(text)
            return None if ids is None else list(ids)

    def longest_prefix(self, text: str) -> tuple[str, list[int]] | None:
        """The longest remembered text that `text` starts with, and its ids."""
        with self._lock:
            best = max((k for k in self._ids if text.startswith(k)), key=len, default=None)
            if best is None:
                return None
            self._ids.move_to_end(best)
            return best, list(self._ids[best])


def continued(memory: ReplyMemory, text: str, encode: Callable[[str], list[int]]
              ) -> list[int] | None:
    """The ids of a raw prompt that continues a remembered prompt and reply: theirs, then the
    new text's. None when it continues none."""
    found = memory.longest_prefix(text)
    if found is None:
        return None
    known, ids = found
    rest = text[len(known):]
    return ids + (encode(rest) if rest else [])
