"""Joining rewards to decisions: pure logic, no Ray, no I/O (unit-tested directly).

Every decision id moves through at most these states::

    (unknown) --add_decision--> PENDING --reward in window--> COMMITTING --commit--> REWARDED
                                   |                             |
                                   |                             +--abort (log write failed)--> PENDING
                                   +--window expires--> COMMITTING(defaulted) --commit--> DEFAULTED
                                   +--window expires, on_expiry="drop"--> DROPPED

- the FIRST reward within the window wins; a later reward for a decision
  that was already rewarded (or whose reward is being written) is a
  duplicate: counted and ignored;
- a reward for a decision whose window has closed (defaulted or dropped) is
  late: counted, handed back to be logged for audits, never trained on;
- a reward for an id that was never seen (or was forgotten after
  ``remember_s``) is unknown: the HTTP layer answers 404;
- a decision with no reward in its window gets the default reward
  (``on_expiry="default"``) or is dropped (``on_expiry="drop"``).

The window is measured from the decision's own ``time`` (so decisions
recovered after a restart keep their original deadlines).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Iterable, Literal

from banditroute.core.records import DecisionRecord, JoinedEvent, RewardRecord


@dataclass
class JoinConfig:
    """How rewards are joined to decisions."""

    window_s: float = 300.0
    """Seconds after a decision within which its reward is accepted."""
    on_expiry: Literal["default", "drop"] = "drop"
    """What happens to a decision with no reward in its window: 'default' (log and train on default_score) or 'drop'."""
    default_score: float = 0.0
    """Score given to a decision whose window expired, with on_expiry='default'."""
    remember_s: float = 3600.0
    """Seconds a finished decision id is remembered, to tell duplicates and late rewards from unknown ids."""
    max_pending: int = 1_000_000
    """Most decisions awaiting a reward; beyond it the oldest expire early (counted as pending_overflow)."""
    max_remembered: int = 2_000_000
    """Most finished decision ids remembered (oldest forgotten first)."""
    prices: dict[str, float] = field(default_factory=dict)
    """Expected USD per call by model: the cost used when neither the reward nor the upstream reported one (else 0)."""

    def validate(self) -> None:
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ValueError("join.window_s must be a positive number of seconds")
        if self.on_expiry not in ("default", "drop"):
            raise ValueError(f"join.on_expiry must be 'default' or 'drop', got {self.on_expiry!r}")
        if not 0.0 <= self.default_score <= 1.0:
            raise ValueError("join.default_score must be in [0, 1]")
        if self.remember_s < 0:
            raise ValueError("join.remember_s must be >= 0")
        if self.max_pending < 1 or self.max_remembered < 1:
            raise ValueError("join.max_pending and join.max_remembered must be >= 1")
        from banditroute.policy.model_registry import check_prices

        check_prices(self.prices, "join.prices")

    def default_cost(self, decision: DecisionRecord) -> float:
        """Cost of a decision whose reward names none: the upstream's report, else the model's price, else 0."""
        if decision.upstream_cost is not None:
            return float(decision.upstream_cost)
        return float(self.prices.get(decision.chosen_model, 0.0))


class RewardStatus(str, Enum):
    ACCEPTED = "accepted"
    """Joined; the event must now be made durable (then commit, or abort on failure)."""
    DUPLICATE = "duplicate"
    """A reward for this decision was already accepted; this one is ignored."""
    LATE = "late"
    """The decision's window closed before this reward came; logged, not trained on."""
    UNKNOWN = "unknown"
    """No such decision (never recorded, or forgotten)."""


class Finished(str, Enum):
    REWARDED = "rewarded"
    DEFAULTED = "defaulted"
    DROPPED = "dropped"


@dataclass
class JoinCounters:
    """Everything the join has seen, as monotonic counters (plus two gauges).

    ``rewards_accepted`` counts joins; ``events_committed`` counts events made
    durable (rewarded + defaulted); a join whose write failed is counted in
    ``commit_failures`` and may be accepted again when the client retries.
    """

    decisions_received: int = 0
    decisions_duplicate: int = 0
    rewards_received: int = 0
    rewards_accepted: int = 0
    rewards_duplicate: int = 0
    rewards_late: int = 0
    rewards_unknown: int = 0
    rewards_invalid: int = 0
    expired_defaulted: int = 0
    expired_dropped: int = 0
    pending_overflow: int = 0
    events_committed: int = 0
    commit_failures: int = 0
    pending: int = 0
    """Gauge: decisions awaiting a reward."""
    committing: int = 0
    """Gauge: joined events whose durable write is in flight."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class RewardOutcome:
    status: RewardStatus
    event: JoinedEvent | None = None
    """The joined event for ACCEPTED."""
    finished_as: Finished | None = None
    """For DUPLICATE/LATE: how the decision had finished (None while its write is in flight)."""
    in_flight: bool = False
    """DUPLICATE of a reward whose durable write has not completed yet."""


class RewardValidationError(ValueError):
    """A reward is malformed; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def validate_reward(reward: RewardRecord) -> None:
    """Check a RewardRecord's fields (raise RewardValidationError naming the field)."""
    if not isinstance(reward.decision_id, str) or not reward.decision_id:
        raise RewardValidationError("decision_id", "must be a non-empty string")
    score = reward.score
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise RewardValidationError("score", "must be a finite number")
    if not 0.0 <= float(score) <= 1.0:
        raise RewardValidationError("score", f"must be in [0, 1], got {score}")
    cost = reward.cost
    if cost is not None:
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost):
            raise RewardValidationError("cost", "must be a finite number")
        if cost < 0:
            raise RewardValidationError("cost", f"must be >= 0, got {cost}")


class RewardJoiner:
    """The join state machine. All methods take ``now`` explicitly (testable without clocks)."""

    def __init__(self, config: JoinConfig | None = None):
        self.config = config or JoinConfig()
        self.config.validate()
        self.counters = JoinCounters()
        self._pending: dict[str, DecisionRecord] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, id), lazily cleaned
        self._committing: dict[str, JoinedEvent] = {}
        self._finished: OrderedDict[str, tuple[Finished, float]] = OrderedDict()

    # --- decisions ----------------------------------------------------------

    def add_decision(self, decision: DecisionRecord, now: float | None = None) -> bool:
        """Start waiting for this decision's reward. False if the id is already known."""
        self.counters.decisions_received += 1
        did = decision.decision_id
        if did in self._pending or did in self._committing or did in self._finished:
            self.counters.decisions_duplicate += 1
            return False
        self._pending[did] = decision
        heapq.heappush(self._deadlines, (decision.time + self.config.window_s, did))
        if len(self._pending) > self.config.max_pending:
            self._evict_oldest_pending(now if now is not None else decision.time)
        self._gauges()
        return True

    def add_decisions(self, decisions: Iterable[DecisionRecord], now: float | None = None) -> int:
        return sum(self.add_decision(d, now) for d in decisions)

    def _evict_oldest_pending(self, now: float) -> None:
        while len(self._pending) > self.config.max_pending and self._deadlines:
            _, did = heapq.heappop(self._deadlines)
            if did in self._pending:
                del self._pending[did]
                self.counters.pending_overflow += 1
                self._finish(did, Finished.DROPPED, now)

    # --- rewards ------------------------------------------------------------

    def submit_reward(self, reward: RewardRecord, now: float) -> RewardOutcome:
        """Classify one reward; ACCEPTED moves the decision to COMMITTING with the joined event."""
        self.counters.rewards_received += 1
        try:
            validate_reward(reward)
        except RewardValidationError:
            self.counters.rewards_invalid += 1
            raise
        did = reward.decision_id
        if did in self._committing:
            if self._committing[did].join_status == Finished.DEFAULTED.value:
                self.counters.rewards_late += 1
                return RewardOutcome(RewardStatus.LATE, in_flight=True)
            self.counters.rewards_duplicate += 1
            return RewardOutcome(RewardStatus.DUPLICATE, in_flight=True)
        decision = self._pending.get(did)
        if decision is not None:
            if now > decision.time + self.config.window_s:
                # Expired but not swept yet: close it the way the sweep would have.
                self._expire_one(did, now)
                self.counters.rewards_late += 1
                return RewardOutcome(RewardStatus.LATE, finished_as=self._finished_status(did))
            cost = reward.cost
            if cost is None:
                cost = self.config.default_cost(decision)
            event = JoinedEvent(decision, float(reward.score), float(cost), float(reward.time), Finished.REWARDED.value)
            del self._pending[did]
            self._committing[did] = event
            self.counters.rewards_accepted += 1
            self._gauges()
            return RewardOutcome(RewardStatus.ACCEPTED, event=event)
        finished = self._finished_status(did)
        if finished is Finished.REWARDED:
            self.counters.rewards_duplicate += 1
            return RewardOutcome(RewardStatus.DUPLICATE, finished_as=finished)
        if finished is not None:
            self.counters.rewards_late += 1
            return RewardOutcome(RewardStatus.LATE, finished_as=finished)
        self.counters.rewards_unknown += 1
        return RewardOutcome(RewardStatus.UNKNOWN)

    def is_pending(self, decision_id: str) -> bool:
        return decision_id in self._pending

    def knows(self, decision_id: str) -> bool:
        return decision_id in self._pending or decision_id in self._committing or decision_id in self._finished

    # --- durability handshake --------------------------------------------------

    def commit(self, decision_id: str, now: float) -> None:
        """The event for ``decision_id`` is durable: the decision is finished."""
        event = self._committing.pop(decision_id, None)
        if event is None:
            return
        status = Finished.DEFAULTED if event.join_status == Finished.DEFAULTED.value else Finished.REWARDED
        self.counters.events_committed += 1
        self._finish(decision_id, status, now)
        self._gauges()

    def abort(self, decision_id: str) -> None:
        """The durable write failed: the decision waits for a reward again (a retry can succeed)."""
        event = self._committing.pop(decision_id, None)
        if event is None:
            return
        self.counters.commit_failures += 1
        self._pending[decision_id] = event.decision
        heapq.heappush(self._deadlines, (event.decision.time + self.config.window_s, decision_id))
        self._gauges()

    # --- window -------------------------------------------------------------

    def expire(self, now: float) -> list[JoinedEvent]:
        """Close every decision whose window has passed; returns the defaulted events to log.

        Defaulted events are COMMITTING until the caller commits them (after
        the durable write) or aborts them.
        """
        out = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, did = heapq.heappop(self._deadlines)
            event = self._expire_one(did, now)
            if event is not None:
                out.append(event)
        self._forget(now)
        self._gauges()
        return out

    def _expire_one(self, did: str, now: float) -> JoinedEvent | None:
        decision = self._pending.pop(did, None)
        if decision is None:
            return None  # stale heap entry (rewarded, or re-queued after an abort)
        if self.config.on_expiry == "drop":
            self.counters.expired_dropped += 1
            self._finish(did, Finished.DROPPED, now)
            return None
        cost = self.config.default_cost(decision)
        event = JoinedEvent(
            decision, float(self.config.default_score), float(cost), decision.time + self.config.window_s,
            Finished.DEFAULTED.value,
        )
        self._committing[did] = event
        self.counters.expired_defaulted += 1
        return event

    def next_deadline(self) -> float | None:
        """Earliest pending deadline (may be stale; a sweep at that time is harmless)."""
        return self._deadlines[0][0] if self._deadlines else None

    # --- bookkeeping ----------------------------------------------------------

    def _finish(self, did: str, status: Finished, now: float) -> None:
        self._finished[did] = (status, now)
        self._finished.move_to_end(did)
        while len(self._finished) > self.config.max_remembered:
            self._finished.popitem(last=False)

    def _finished_status(self, did: str) -> Finished | None:
        entry = self._finished.get(did)
        return None if entry is None else entry[0]

    def _forget(self, now: float) -> None:
        horizon = now - self.config.remember_s
        while self._finished:
            did, (_, at) = next(iter(self._finished.items()))
            if at >= horizon:
                break
            self._finished.popitem(last=False)

    def _gauges(self) -> None:
        self.counters.pending = len(self._pending)
        self.counters.committing = len(self._committing)

    # --- recovery -------------------------------------------------------------

    def restore(
        self,
        decisions: Iterable[DecisionRecord],
        finished: dict[str, str],
        now: float,
    ) -> int:
        """Rebuild state after a restart from the durable logs.

        ``finished`` maps decision ids found in the event log to their
        join_status ('rewarded'/'defaulted'); every other logged decision is
        pending again (or expires at the next sweep if its window has passed).
        Returns the number of decisions pending again. Counters are not
        restored (they count what this incarnation saw).
        """
        for did, status in finished.items():
            self._finish(did, Finished(status), now)
        restored = 0
        for decision in decisions:
            did = decision.decision_id
            if did in self._finished or did in self._pending or did in self._committing:
                continue
            self._pending[did] = decision
            heapq.heappush(self._deadlines, (decision.time + self.config.window_s, did))
            restored += 1
        self._gauges()
        return restored
