"""The prefix cache across requests: a bounded pool of sessions (KV caches), reused by prefix.

Clients resend the whole conversation with every request. The pool hands each request the
session whose cache holds the longest prefix of its prompt (same ids, same pictures), so only
the new tokens are prefilled. A session whose cache would have to be cut back is taken when it
holds at least half of the prompt (a retry, an edited message) or when no new one fits; else a
new session starts, so concurrent conversations keep their own. Bounded by count and by bytes,
least recently used first out. Only the worker thread touches it.
"""

from __future__ import annotations

from gemma_mlx.prompt import Prompt
from gemma_mlx.session import FeatureCache, Session


class SessionPool:
    def __init__(self, model, max_sessions: int = 4, max_bytes: int = 4 << 30,
                 kv_bits: int | None = None, draft_model=None, num_draft_tokens: int = 3):
        self.model = model
        self.draft_model = draft_model
        self.max_sessions = max(1, max_sessions)
        self.max_bytes = max_bytes
        self._options = dict(kv_bits=kv_bits, draft_model=draft_model,
                             num_draft_tokens=num_draft_tokens)
        self.features = FeatureCache(model)  # shared: a picture is encoded once for all
        self._idle: list[Session] = []  # least recently used first
        self.in_use = 0

    def checkout(self, prompt: Prompt) -> tuple[Session, int]:
        """The session to run `prompt` on, and how many of its tokens it already holds."""
        best, common = None, 0
        for session in self._idle:
            n = session.common_prefix(prompt)
            if best is None or n > common:
                best, common = session, n
        # Worth cutting back another conversation's cache: it is all there (a follow-up), or
        # it holds most of this prompt (a retry, an edited last message).
        worth = best is not None and common > 0 and (common == len(best.ids)
                                                     or 2 * common >= len(prompt.ids))
        room = len(self._idle) + self.in_use < self.max_sessions
        if best is None or (room and not worth):
            best, common = Session(self.model, features=self.features, **self._options), 0
        else:
            self._idle.remove(best)
        self.in_use += 1
        return best, common

    def checkin(self, session: Session) -> None:
        """The request is done: keep its cache, within the bounds."""
        self.in_use -= 1
        self._idle.append(session)
        while self._idle and (len(self._idle) + self.in_use > self.max_sessions
                              or self.nbytes > self.max_bytes):
            self._idle.pop(0).reset()

    def clear(self) -> None:
        """Drop every idle session's cache (the model is going)."""
        for session in self._idle:
            session.reset()
        self._idle.clear()

    @property
    def nbytes(self) -> int:
        return sum(session.nbytes for session in self._idle)

    @property
    def sessions(self) -> int:
        return len(self._idle) + self.in_use
