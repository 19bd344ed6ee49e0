"""Keep the candidate from drifting below what is served: re-base it on the serving weights after failed checks.

Issue 13: in a 10,000-decision run the gate served v450 to the end while the
candidate went on to v4669, and v4669 scored BELOW v450 offline: a candidate
the gate keeps rejecting has moved away from what is served, and training it
further moved it further. :class:`DriftGuard` counts the gate checks in a row
that held the candidate ON EVIDENCE (a check held for want of held-out
events says nothing about drift); after ``limit`` of them the learner actor
restarts the candidate from the serving weights with a fresh optimizer
(``LearnerBase.rebase``; the replay is kept), so the candidate is never more
than ``limit`` checks' worth of training away from a policy that passed.
"""

from __future__ import annotations


class DriftGuard:
    """Counts evidence-based holds in a row; says when to re-base (``limit`` 0: never)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.held_in_a_row = 0
        self.rebases = 0

    def promoted(self) -> None:
        self.held_in_a_row = 0

    def held(self, on_evidence: bool) -> bool:
        """Record a held check; True when the candidate should be re-based now (the count restarts)."""
        if not on_evidence:
            return False
        self.held_in_a_row += 1
        if not self.limit or self.held_in_a_row < self.limit:
            return False
        self.held_in_a_row = 0
        self.rebases += 1
        return True
