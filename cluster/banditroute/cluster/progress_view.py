"""The progress view of `banditroute up`: a refreshing block on a terminal, one plain line per update otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from banditroute.cluster.traffic import TrafficState


class ProgressView:
    """A refreshing block on a terminal; one plain line per update otherwise."""

    def __init__(self, state: TrafficState, max_decisions: int, stream=None):
        self.state = state
        self.max_decisions = max_decisions
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lines = 0
        self._last_t = time.monotonic()
        self._last_n = 0

    def update(self, version: int, replica_versions: dict[str, int], learner: dict[str, Any] | None, feedback: dict[str, Any] | None) -> None:
        s = self.state
        now = time.monotonic()
        rate = (s.decisions - self._last_n) / max(1e-9, now - self._last_t)
        self._last_t, self._last_n = now, s.decisions
        total = f"/{self.max_decisions}" if self.max_decisions else ""
        replicas = sorted(replica_versions.values())
        rep_text = f"replicas v{replicas[0]}..v{replicas[-1]}" if replicas else "replicas -"
        share = s.share(s.window)
        updates = learner.get("updates", 0) if learner else 0
        if not self.tty:
            top = ", ".join(f"{m.split('/')[-1]} {p:.0%}" for m, p in list(share.items())[:4])
            print(
                f"[up {now - s.started:6.1f}s] decisions {s.decisions}{total} ({rate:.1f}/s), running reward {s.running_reward:+.4f}, "
                f"policy v{version} ({rep_text}, {updates} updates), acked {s.rewards_acknowledged}, "
                f"errors {s.route_errors + s.feedback_errors}; traffic: {top}",
                file=self.stream, flush=True,
            )
            return
        lines = [
            f"banditroute up  {now - s.started:7.1f}s   decisions {s.decisions}{total}   {rate:6.1f} decisions/s",
            f"running reward (last {min(s.window, s.decisions)}) {s.running_reward:+.4f}   mean so far {np.mean(s.rewards) if s.rewards else float('nan'):+.4f}",
            f"policy v{version}   {rep_text}   learner updates {updates}   rewards acked {s.rewards_acknowledged}   "
            f"errors {s.route_errors + s.feedback_errors}",
        ]
        if feedback:
            lines.append(
                f"feedback: pending {feedback.get('pending', 0)}  duplicate {feedback.get('rewards_duplicate', 0)}  "
                f"late {feedback.get('rewards_late', 0)}  unknown {feedback.get('rewards_unknown', 0)}  "
                f"queued for learner {feedback.get('queued_for_learner', 0)}"
            )
        lines.append("traffic share (recent):")
        for model, p in list(share.items())[:12]:
            lines.append(f"  {model[:38]:38s} {p:6.1%} {'#' * int(round(p * 40))}")
        out = ""
        if self._lines:
            out += f"\x1b[{self._lines}F"
        out += "".join(f"\x1b[2K{line}\n" for line in lines)
        if len(lines) < self._lines:
            out += "".join("\x1b[2K\n" for _ in range(self._lines - len(lines)))
            out += f"\x1b[{self._lines - len(lines)}F"
        self.stream.write(out)
        self.stream.flush()
        self._lines = len(lines)
