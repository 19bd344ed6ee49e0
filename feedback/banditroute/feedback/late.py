"""One late row per decision: the ids whose late reward is logged (or being logged).

A reward that comes after its decision's window closed is logged for audits
(``late_rewards/``), never trained on. Without a memory of what was logged,
every replay of a late token wrote another part (50 replays, 50 parts).
:class:`LateLedger` claims an id before its late row is written, releases
it if the write fails, and forgets ids after ``remember_s`` (when the join
forgets the decision too and answers 'unknown'). Recovery refills it from
the late-reward log and the spool, so the bound holds across restarts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable


class LateLedger:
    """Decision ids with a late row, oldest first, bounded in time and count (thread-safe)."""

    def __init__(self, remember_s: float, max_ids: int):
        if remember_s < 0 or max_ids < 1:
            raise ValueError("remember_s must be >= 0 and max_ids >= 1")
        self.remember_s = remember_s
        self.max_ids = max_ids
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.repeats = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, decision_id: str) -> bool:
        return decision_id in self._ids

    def _forget_old(self, now: float) -> None:
        while self._ids:
            oldest, at = next(iter(self._ids.items()))
            if at >= now - self.remember_s and len(self._ids) <= self.max_ids:
                break
            del self._ids[oldest]

    def claim(self, decision_id: str, now: float) -> bool:
        """True: the first late reward of this id (log it, then keep or :meth:`release`); False: already logged."""
        with self._lock:
            self._forget_old(now)
            if decision_id in self._ids:
                self.repeats += 1
                return False
            self._ids[decision_id] = now
            return True

    def release(self, decision_id: str) -> None:
        """The late row's write failed: a retry may log it."""
        with self._lock:
            self._ids.pop(decision_id, None)

    def restore(self, decision_ids: Iterable[str], now: float) -> int:
        """Ids already in the late-reward log (after a restart); returns how many are new here."""
        added = 0
        with self._lock:
            for did in decision_ids:
                if did not in self._ids:
                    self._ids[did] = now
                    added += 1
            self._forget_old(now)
        return added
