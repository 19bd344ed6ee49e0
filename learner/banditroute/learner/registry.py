"""Online learners by the policy kind they train: ``barp`` (RLlib off-policy REINFORCE), ``value`` and ``identity``.

The learner actor builds, resumes and rebases its learner through here, so it
holds no kind-specific code: the kind comes from the policy it starts from
(the newest checkpoint in storage, or the seed policy).
"""

from __future__ import annotations

from typing import Any

from banditroute.core.storage import Storage
from banditroute.learner.base import LearnerBase
from banditroute.learner.checkpoint import load_latest_checkpoint
from banditroute.learner.config import LearnerConfig
from banditroute.learner.identity_learner import IdentityLearner
from banditroute.learner.learner import OnlineLearner
from banditroute.learner.value_learner import ValueLearner

LEARNER_KINDS: dict[str, type[LearnerBase]] = {OnlineLearner.kind: OnlineLearner, ValueLearner.kind: ValueLearner,
                                               IdentityLearner.kind: IdentityLearner}
"""Learner class by the policy kind it trains (the same keys as ``learner.config.ONLINE_KINDS``)."""


def learner_class(kind: str, where: str = "policy") -> type[LearnerBase]:
    """The learner for policies of ``kind`` (ValueError naming ``where`` when none trains it online)."""
    try:
        return LEARNER_KINDS[kind]
    except KeyError:
        raise ValueError(f"{where}: the online learner trains {sorted(LEARNER_KINDS)} policies, not {kind!r}") from None


def make_learner(policy: Any, config: LearnerConfig | None = None, learner_state: bytes | None = None) -> LearnerBase:
    """A learner of ``policy``'s kind training it in place."""
    return learner_class(policy.kind)(policy, config, learner_state)


def resume_or_start_learner(storage: Storage | None, initial: Any, config: LearnerConfig | None = None) -> LearnerBase:
    """The newest checkpoint in ``storage`` if at least as new as ``initial``, else ``initial``; the learner of its kind."""
    found = load_latest_checkpoint(storage) if storage is not None else None
    if found is not None and (initial is None or found[0].policy_version >= initial.policy_version):
        kind = found[0].kind
    elif initial is not None:
        kind = initial.kind
    else:
        raise FileNotFoundError("no checkpoint in storage and no initial policy to start from")
    return learner_class(kind).resume_or_start(storage, initial, config)
