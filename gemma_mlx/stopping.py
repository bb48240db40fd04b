"""Stop strings over a stream of text: a reply ends where one of them first appears.

Text arrives in pieces that may split a stop string, so the tail that could still become one
is held back until the next piece decides. The stop string itself is never shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BadRequest

MAX_STOP_STRINGS = 8


class StopStrings:
    def __init__(self, stops: Sequence[str] = ()):
        stops = [s for s in stops if s]
        if len(stops) > MAX_STOP_STRINGS:
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings (got {len(stops)})")
        self.stops = stops
        self._held = ""
        self.hit = False  # a stop string appeared: the reply ends here

    def feed(self, text: str) -> str:
        """The part of the text so far that is safe to show."""
        if self.hit or not self.stops:
            return "" if self.hit else text
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self._held = True, ""
            return held[:cut]
        keep = max((n for s in self.stops for n in range(1, len(s)) if held.endswith(s[:n])),
                   default=0)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def flush(self) -> str:
        """At the end of the reply: what was held back (it did not become a stop string)."""
        held, self._held = self._held, ""
        return "" if self.hit else held
