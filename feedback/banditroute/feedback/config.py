"""The feedback actor's configuration (the ``feedback:`` section of the app config)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from banditroute.core.storage import StorageConfig
from banditroute.feedback.join import JoinConfig

# Key prefix of the default spool inside the log's storage root (beside events/, decisions/, late_rewards/).
SPOOL_PREFIX = "spool"


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
    spool_uri: str | None = None
    """Where log parts wait while the log's storage refuses writes (acknowledged once there, drained in order when it returns): a storage URI or path that EVERY node the feedback actor may run on reaches (a second bucket, a shared RWX mount), never a node's own disk; None = the log's storage under ``spool/`` (shared by construction; buffers single failed writes, not a whole outage)."""
    spool_endpoint_url: str | None = None
    """S3-compatible endpoint for an s3:// ``spool_uri`` (None: the log storage's); credentials and timeouts are the log storage's."""
    spool_dir: str | None = None
    """Deprecated name of ``spool_uri`` (a folder path, which must be shared by every node, not an emptyDir)."""
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
        for name in ("spool_uri", "spool_dir", "spool_endpoint_url"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ValueError(f"feedback.{name} must be a storage URI/path or null")
        if self.spool_uri is not None and self.spool_dir is not None:
            raise ValueError("feedback.spool_dir is the deprecated name of feedback.spool_uri: set only spool_uri")
        for name in ("max_rows_per_part", "learner_batch_size", "learner_max_batch", "learner_max_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"feedback.{name} must be >= 1")

    def spool_storage_for(self, log_storage: StorageConfig) -> StorageConfig:
        """The spool's storage: ``spool_uri`` (or the deprecated ``spool_dir``) with the log storage's credentials,
        else the log's own root under ``spool/``. Never node-local by default: see feedback/spool.py."""
        uri = self.spool_uri or self.spool_dir
        if not uri:
            return dataclasses.replace(log_storage, uri=log_storage.uri.rstrip("/") + "/" + SPOOL_PREFIX)
        return dataclasses.replace(log_storage, uri=str(uri), endpoint_url=self.spool_endpoint_url or log_storage.endpoint_url)
