"""Names of banditroute's long-lived Ray actors: one definition for every component.

The feedback actor, the learner and the parameter server find each other (and
Serve replicas and drivers find them) by name in one Ray namespace, so the
names live here in core rather than in whichever component creates the actor.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE = "banditroute"
"""Ray namespace of every banditroute actor, so Serve replicas (which run in
Serve's own namespace) and drivers find them by name."""

DEFAULT_PREFIX = "banditroute"
"""Actor-name prefix of a loop when none is configured; several loops share a cluster with distinct prefixes."""


@dataclass(frozen=True)
class ActorNames:
    """The three actor names of one online loop."""

    feedback: str
    """The feedback actor: joins decisions with rewards, writes the event log."""
    learner: str
    """The learner actor: trains on joined events, publishes weights."""
    parameter_server: str
    """The parameter server: newest weights; replicas long-poll it."""

    @classmethod
    def for_prefix(cls, prefix: str = DEFAULT_PREFIX) -> "ActorNames":
        if not prefix:
            raise ValueError("the actor-name prefix must not be empty")
        return cls(feedback=f"{prefix}-feedback", learner=f"{prefix}-learner", parameter_server=f"{prefix}-parameter-server")

    def as_dict(self) -> dict[str, str]:
        return {"feedback": self.feedback, "learner": self.learner, "parameter_server": self.parameter_server}


DEFAULT_NAMES = ActorNames.for_prefix(DEFAULT_PREFIX)
FEEDBACK_ACTOR_NAME = DEFAULT_NAMES.feedback
LEARNER_ACTOR_NAME = DEFAULT_NAMES.learner
PARAMETER_SERVER_NAME = DEFAULT_NAMES.parameter_server
