"""Rebuilding the join state after a restart, from the durable logs and the spool.

The event log tells which decisions finished (rewarded/defaulted); the
decision log of the last window gives the decisions still pending; the
late-reward log gives the ids that already have their one late row. All
reads are bounded by time (the log is partitioned by hour). Spooled parts
count like logged ones (they were acknowledged); the spool is on shared
storage, so an actor restarted on another node sees them too.

When the log cannot be read, the spool alone is restored and
:attr:`JoinRecovery.pending` stays set until :meth:`JoinRecovery.finish`
succeeds; meanwhile the service answers 'unavailable' (not 'unknown') for
ids it does not know, so a retried reward can never be accepted twice. When
the SPOOL cannot be read, even a decision known from the log may have an
acknowledged reward waiting there, so every reward waits
(:attr:`JoinRecovery.blocks_all`).
"""

from __future__ import annotations

import logging

from banditroute.core.records import DECISION_SCHEMA, DecisionRecord, decisions_from_table
from banditroute.core.storage import StorageUnavailable
from banditroute.feedback.durable import SpoolingWriter
from banditroute.feedback.join import JoinConfig, RewardJoiner
from banditroute.feedback.late import LateLedger
from banditroute.feedback.log import DECISIONS_PREFIX, EVENTS_PREFIX, LATE_PREFIX, LATE_SCHEMA, EventLog
from banditroute.feedback.spool import Spool

logger = logging.getLogger(__name__)

# Slack between a decision's time and the write time of the decision-log part holding it.
DECISION_LOG_SLACK_S = 120.0

# decision id -> how it finished ("rewarded" / "defaulted"), and the decisions that may still be pending.
JoinState = tuple[dict[str, str], list[DecisionRecord]]


def remembered_since(join: JoinConfig, now: float) -> float:
    """Oldest write time of a part that can still matter to the join (older ids are forgotten anyway)."""
    return now - join.window_s - join.remember_s - DECISION_LOG_SLACK_S


def logged_state(log: EventLog, join: JoinConfig, now: float) -> JoinState:
    """Finished ids and recent decisions from the durable logs (reads only the parts that can still matter)."""
    finished_tbl = log.read_events(since=remembered_since(join, now), columns=["decision_id", "join_status"])
    finished = dict(zip(finished_tbl.column("decision_id").to_pylist(), finished_tbl.column("join_status").to_pylist()))
    decisions = decisions_from_table(log.read_decisions(since=now - join.window_s - DECISION_LOG_SLACK_S))
    return finished, decisions


def logged_late_ids(log: EventLog, join: JoinConfig, now: float) -> list[str]:
    """Ids that already have a late row in the log (recent enough to be remembered)."""
    return log.read(LATE_PREFIX, LATE_SCHEMA, since=remembered_since(join, now), columns=["decision_id"]).column(
        "decision_id").to_pylist()


def spooled_late_ids(spool: Spool | None) -> list[str]:
    late = None if spool is None else spool.read_table(LATE_PREFIX, ["decision_id"])
    return [] if late is None else late.column("decision_id").to_pylist()


def spooled_state(spool: Spool | None) -> JoinState:
    """Finished ids and decisions from parts still waiting in the spool."""
    if spool is None:
        return {}, []
    events = spool.read_table(EVENTS_PREFIX, ["decision_id", "join_status"])
    finished = {} if events is None else dict(zip(events.column("decision_id").to_pylist(), events.column("join_status").to_pylist()))
    decisions_tbl = spool.read_table(DECISIONS_PREFIX)
    decisions = [] if decisions_tbl is None else decisions_from_table(decisions_tbl.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA))
    return finished, decisions


class JoinRecovery:
    """Restores a :class:`RewardJoiner` (and the late-row ledger) from the logs and the spool; finishes later if storage was down."""

    def __init__(self, joiner: RewardJoiner, join: JoinConfig, writer: SpoolingWriter, late: LateLedger | None = None):
        self.joiner = joiner
        self.join = join
        self.writer = writer
        self.late = late
        # True while the log part could not be read: rewards for ids not known yet must wait, not be 'unknown'.
        self.pending = False
        # True while the spool could not be read: ANY reward may already be acknowledged there, so all wait.
        self.blocks_all = False
        self.recovered: dict[str, int] = {}

    def _read_spool(self) -> tuple[JoinState, list[str]] | None:
        try:
            return spooled_state(self.writer.spool), spooled_late_ids(self.writer.spool)
        except StorageUnavailable as exc:
            self.writer.note_storage_error(exc)
            return None

    def recover(self, now: float) -> dict[str, int]:
        """Rebuild join state (blocking; call before serving). With a spool, a storage outage is not an error."""
        spooled = self._read_spool()
        try:
            log_finished, log_decisions = logged_state(self.writer.log, self.join, now)
            log_late = logged_late_ids(self.writer.log, self.join, now)
        except StorageUnavailable as exc:
            if self.writer.spool is None:
                raise
            self.writer.note_storage_error(exc)
            log_finished, log_decisions, log_late = None, [], []
        if spooled is None and self.writer.spool is not None:
            # Nothing is restored: a decision known only from the log may have its reward in the unread spool.
            self.pending = self.blocks_all = True
            self.recovered = {"finished": 0, "decisions_read": 0, "pending": 0, "spool_unavailable": 1}
            logger.warning("feedback recovery: the spool at %s is unreadable; every reward waits until it is",
                           self.writer.spool.location)
            return self.recovered
        (finished, decisions), late = spooled if spooled is not None else (({}, []), [])
        self._restore_late(log_late + late, now)
        if log_finished is None:
            self.pending = True
            restored = self.joiner.restore(decisions, finished, now)
            self.recovered = {"finished": len(finished), "decisions_read": len(decisions), "pending": restored,
                              "storage_unavailable": 1}
            logger.warning("feedback recovery: storage unavailable; restored the spool only, will retry")
            return self.recovered
        finished = {**log_finished, **finished}
        decisions = log_decisions + decisions
        restored = self.joiner.restore(decisions, finished, now)
        self.pending = self.blocks_all = False
        self.recovered = {"finished": len(finished), "decisions_read": len(decisions), "pending": restored}
        return self.recovered

    def _restore_late(self, ids: list[str], now: float) -> None:
        if self.late is not None and ids:
            self.late.restore(ids, now)

    def finish(self, now: float) -> bool:
        """Retry the log part (and the spool part) of an interrupted recovery (blocking); True once done."""
        if not self.pending:
            return True
        try:
            finished, decisions = logged_state(self.writer.log, self.join, now)
            late = logged_late_ids(self.writer.log, self.join, now)
            (spooled_finished, spooled_decisions), spooled_late = (
                spooled_state(self.writer.spool), spooled_late_ids(self.writer.spool))
        except OSError as exc:  # StorageUnavailable, or a bucket/folder that is not there (yet)
            self.writer.note_storage_error(exc)
            return False
        self._restore_late(late + spooled_late, now)
        restored = self.joiner.restore(decisions + spooled_decisions, {**finished, **spooled_finished}, now)
        self.recovered = {"finished": len(finished) + len(spooled_finished),
                          "decisions_read": len(decisions) + len(spooled_decisions),
                          "pending": self.recovered.get("pending", 0) + restored, "late_recovery": 1}
        self.pending = self.blocks_all = False
        logger.info("feedback recovery finished after a storage outage: %s", self.recovered)
        return True
