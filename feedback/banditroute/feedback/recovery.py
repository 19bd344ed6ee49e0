"""Rebuilding the join state after a restart, from the durable logs and the local spool.

The event log tells which decisions finished (rewarded/defaulted); the
decision log of the last window gives the decisions still pending. Both
reads are bounded by time (the log is partitioned by hour). Spooled parts
count like logged ones (they were acknowledged). When storage cannot be
read, the spool alone is restored and :attr:`JoinRecovery.pending` stays
set until :meth:`JoinRecovery.finish` succeeds; meanwhile the service
answers 'unavailable' (not 'unknown') for ids it does not know, so a retried
reward can never be accepted twice.
"""

from __future__ import annotations

import logging

from banditroute.core.records import DECISION_SCHEMA, DecisionRecord, decisions_from_table
from banditroute.core.storage import StorageUnavailable
from banditroute.feedback.durable import SpoolingWriter
from banditroute.feedback.join import JoinConfig, RewardJoiner
from banditroute.feedback.log import DECISIONS_PREFIX, EVENTS_PREFIX, EventLog
from banditroute.feedback.spool import LocalSpool

logger = logging.getLogger(__name__)

# Slack between a decision's time and the write time of the decision-log part holding it.
DECISION_LOG_SLACK_S = 120.0

# decision id -> how it finished ("rewarded" / "defaulted"), and the decisions that may still be pending.
JoinState = tuple[dict[str, str], list[DecisionRecord]]


def logged_state(log: EventLog, join: JoinConfig, now: float) -> JoinState:
    """Finished ids and recent decisions from the durable logs (reads only the parts that can still matter)."""
    finished_tbl = log.read_events(
        since=now - join.window_s - join.remember_s - DECISION_LOG_SLACK_S, columns=["decision_id", "join_status"]
    )
    finished = dict(zip(finished_tbl.column("decision_id").to_pylist(), finished_tbl.column("join_status").to_pylist()))
    decisions = decisions_from_table(log.read_decisions(since=now - join.window_s - DECISION_LOG_SLACK_S))
    return finished, decisions


def spooled_state(spool: LocalSpool | None) -> JoinState:
    """Finished ids and decisions from parts still waiting in the local spool."""
    if spool is None:
        return {}, []
    events = spool.read_table(EVENTS_PREFIX, ["decision_id", "join_status"])
    finished = {} if events is None else dict(zip(events.column("decision_id").to_pylist(), events.column("join_status").to_pylist()))
    decisions_tbl = spool.read_table(DECISIONS_PREFIX)
    decisions = [] if decisions_tbl is None else decisions_from_table(decisions_tbl.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA))
    return finished, decisions


class JoinRecovery:
    """Restores a :class:`RewardJoiner` from the logs and the spool; finishes later if storage was down."""

    def __init__(self, joiner: RewardJoiner, join: JoinConfig, writer: SpoolingWriter):
        self.joiner = joiner
        self.join = join
        self.writer = writer
        # True while the log part could not be read: rewards for ids not known yet must wait, not be 'unknown'.
        self.pending = False
        self.recovered: dict[str, int] = {}

    def recover(self, now: float) -> dict[str, int]:
        """Rebuild join state (blocking; call before serving). With a spool, a storage outage is not an error."""
        finished, decisions = spooled_state(self.writer.spool)
        try:
            log_finished, log_decisions = logged_state(self.writer.log, self.join, now)
        except StorageUnavailable as exc:
            if self.writer.spool is None:
                raise
            self.writer.note_storage_error(exc)
            self.pending = True
            restored = self.joiner.restore(decisions, finished, now)
            self.recovered = {"finished": len(finished), "decisions_read": len(decisions), "pending": restored,
                              "storage_unavailable": 1}
            logger.warning("feedback recovery: storage unavailable (%s); restored the spool only, will retry", exc)
            return self.recovered
        finished = {**log_finished, **finished}
        decisions = log_decisions + decisions
        restored = self.joiner.restore(decisions, finished, now)
        self.pending = False
        self.recovered = {"finished": len(finished), "decisions_read": len(decisions), "pending": restored}
        return self.recovered

    def finish(self, now: float) -> bool:
        """Retry the log part of an interrupted recovery (blocking); True once done."""
        if not self.pending:
            return True
        try:
            finished, decisions = logged_state(self.writer.log, self.join, now)
        except OSError as exc:  # StorageUnavailable, or a bucket/folder that is not there (yet)
            self.writer.note_storage_error(exc)
            return False
        spooled_finished, spooled_decisions = spooled_state(self.writer.spool)
        restored = self.joiner.restore(decisions + spooled_decisions, {**finished, **spooled_finished}, now)
        self.recovered = {"finished": len(finished) + len(spooled_finished),
                          "decisions_read": len(decisions) + len(spooled_decisions),
                          "pending": self.recovered.get("pending", 0) + restored, "late_recovery": 1}
        self.pending = False
        logger.info("feedback recovery finished after a storage outage: %s", self.recovered)
        return True
