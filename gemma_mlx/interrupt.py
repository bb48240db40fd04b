"""Ctrl-C as a request to stop, independent of when it lands.

Python's own SIGINT handling raises KeyboardInterrupt wherever the main thread happens to be, and
one raised inside a generator's close or an object's finalizer is printed and dropped: a reply
could then run on to its end. So once a reply streams, Ctrl-C only sets a flag that the engine
reads at every token (a second Ctrl-C also raises, for a step that never returns). Before
(loading, prefill) it raises at once as usual, and sets the flag too, which the engine reads
between prefill chunks and at the first token: an interrupt swallowed on the way still stops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Interrupt:
    """A SIGINT handler and the stop flag it sets; call it as a `should_stop`."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._streaming = False

    def __call__(self) -> bool:
        return self._requested.is_set()

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed (and maybe swallowed) so far."""
        if self():
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        """Handle SIGINT in this block (main thread only, as Python's signal module requires)."""
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def streaming(self) -> None:
        """A reply streams now: from here on the first Ctrl-C only sets the flag."""
        self._streaming = True

    def _handle(self, signum: int, frame: Any) -> None:
        repeated = self._requested.is_set()
        self._requested.set()
        if repeated or not self._streaming:
            raise KeyboardInterrupt
