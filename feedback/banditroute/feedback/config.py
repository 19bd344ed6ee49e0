"""The feedback actor's configuration (the ``feedback:`` section of the app config)."""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from banditroute.feedback.join import JoinConfig


@dataclass
class FeedbackConfig:
    """The feedback actor: join, durable log writes, batches to the learner."""

    join: JoinConfig = field(default_factory=JoinConfig)
    """Reward window, expiry policy and memory bounds of the join."""
    event_flush_wait_s: float = 0.0
    """Group commit: extra seconds the event writer waits to gather rewards (0: whatever arrived while the previous write ran)."""
    decision_flush_wait_s: float = 0.0
    """Group commit: extra seconds the decision writer waits to gather decisions (0: whatever arrived meanwhile)."""
    max_rows_per_part: int = 20_000
    """Most rows in one Parquet part file."""
    learner_batch_size: int = 32
    """A batch goes to the learner once it has this many events ..."""
    learner_max_delay_s: float = 0.1
    """... or once its oldest event has waited this long (seconds)."""
    learner_max_batch: int = 2048
    """Most events in one learner update (a backlog is split)."""
    learner_max_backlog: int = 200_000
    """Most events queued for the learner; beyond it the oldest are skipped (they stay in the log)."""
    send_to_learner: bool = True
    """Hand committed events to the learner actor (off: log only)."""
    unknown_grace_s: float = 2.0
    """Seconds a reward for a not-yet-seen decision id waits for the decision record before 'unknown'."""
    sweep_interval_s: float = 1.0
    """Seconds between window-expiry sweeps."""
    recover_on_start: bool = True
    """Rebuild pending/finished decisions from the logs when the actor starts."""
    spool_dir: str | None = None
    """Local folder for log parts written while storage is unavailable (fsync'd, drained in order when it returns); None = <temp dir>/banditroute-spool/<hash of the log URI>, which a restarted actor on the same node finds again."""
    spool_max_events: int = 100_000
    """Most rows (events + decisions) waiting in the spool; beyond it rewards get 503 'event buffer full' and decision batches fail (0 = no spool: a write storage refuses answers 'unavailable')."""
    spool_drain_interval_s: float = 1.0
    """Seconds between tries to drain the spool to storage (and to finish a recovery that a storage outage interrupted)."""

    def validate(self) -> None:
        self.join.validate()
        for name in ("event_flush_wait_s", "decision_flush_wait_s", "learner_max_delay_s", "unknown_grace_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"feedback.{name} must be >= 0")
        if self.sweep_interval_s <= 0:
            raise ValueError("feedback.sweep_interval_s must be > 0")
        if not (self.spool_drain_interval_s > 0 and math.isfinite(self.spool_drain_interval_s)):
            raise ValueError("feedback.spool_drain_interval_s must be > 0")
        if self.spool_max_events < 0:
            raise ValueError("feedback.spool_max_events must be >= 0")
        if self.spool_dir is not None and not str(self.spool_dir).strip():
            raise ValueError("feedback.spool_dir must be a folder path or null")
        for name in ("max_rows_per_part", "learner_batch_size", "learner_max_batch", "learner_max_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"feedback.{name} must be >= 1")

    def spool_dir_for(self, log_uri: str) -> str:
        """``spool_dir``, or <temp dir>/banditroute-spool/<hash of the log URI>: stable across restarts on one node, one per log."""
        if self.spool_dir:
            return self.spool_dir
        digest = hashlib.sha256(log_uri.encode("utf-8")).hexdigest()[:16]
        return str(Path(tempfile.gettempdir()) / "banditroute-spool" / digest)
