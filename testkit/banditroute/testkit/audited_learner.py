"""A learner actor that writes down what it trains on: the evidence for "trained once per learner lifetime".

:class:`AuditedLearnerActor` is :class:`~banditroute.learner.actor.LearnerActor`
plus one JSON line per learner update (the decision ids the learner's
``update`` was given, after the intake's filter and the hold-out split) and
one per checkpoint written, in ``<audit_dir>/lifetime-<pid>-<random>.jsonl``
(one file per process, i.e. per learner lifetime). A fault test reads the
files after killing the actor (see tests/test_learner_durability.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from banditroute.learner.actor import LearnerActor


class AuditedLearnerActor(LearnerActor):
    def __init__(self, config: Any, storage: Any, initial_state: Any, parameter_server_name: Any, namespace: Any,
                 audit_dir: str):
        self._audit_path = Path(audit_dir) / f"lifetime-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._audit_lock = threading.Lock()
        self._audit({"started": time.time()})
        super().__init__(config, storage, initial_state, parameter_server_name, namespace)

    def _audit(self, record: dict[str, Any]) -> None:
        with self._audit_lock, self._audit_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "learner":  # wrap the learner as soon as it exists: the log cursor's first pass starts in __init__
            inner = value.update

            def update(events: Any, *args: Any, **kwargs: Any) -> Any:
                ids = events.column("decision_id").to_pylist() if hasattr(events, "column") and len(events) else []
                metrics = inner(events, *args, **kwargs)
                self._audit({"trained": ids})
                return metrics

            value.update = update
        super().__setattr__(name, value)

    def _checkpoint(self) -> str | None:
        uri = super()._checkpoint()
        self._audit({"checkpoint": uri, "version": self.learner.policy_version})
        return uri

    def audit_path(self) -> str:
        return str(self._audit_path)
