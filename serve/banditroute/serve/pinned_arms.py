"""Experiment arms that pin a policy version: loading their policies, and deciding their rows of a batch.

An arm with ``checkpoint`` (policy/experiments.py ``ArmConfig``) is decided by
the policy of that checkpoint instead of the served one. A replica loads each
pinned policy once (:func:`load_pinned_arms`: the same encoder and the same
pool as the served policy, else a ValueError naming the arm's ``checkpoint``
field). In ``RouterCore.route_batch`` the rows a pinned arm enrols (the same
``enrolled_arm`` rule as ``apply_overrides``, keyed by ``user`` else the
decision id, which is minted before the forward for that reason) get a second
policy forward on the SAME embeddings the served policy saw; their action,
propensity and probabilities are replaced, and their decision logs the pinned
policy's version. So the arm's log is its own logging policy's, and OPE over
it stays correct.

An identity policy's live pool can move away from the pinned policy's model
list; a pinned policy scores only the models it was trained on, so the arm
then stops enrolling (``pinnable``), which the experiment report shows as
fewer decisions in that arm.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from banditroute.policy.base import RoutingPolicy
from banditroute.policy.checkpoint import load_policy_at, policy_from_state
from banditroute.policy.experiments import ExperimentConfig, arm_field, enrolled_arm
from banditroute.serve.protocol import RouteRequest

ArmKey = tuple[str, str]
"""(experiment name, arm name)."""


class PinnedArms:
    """The pinned arms' policies on one replica, keyed by (experiment, arm)."""

    def __init__(self, policies: Mapping[ArmKey, RoutingPolicy] | None = None):
        self.policies: dict[ArmKey, RoutingPolicy] = dict(policies or {})
        """Pinned policy per (experiment, arm); loaded once, never swapped (that is what pinning means)."""

    def __bool__(self) -> bool:
        return bool(self.policies)

    def versions(self) -> dict[str, int]:
        """``{"experiment/arm": policy_version}`` (for the admin API and logs)."""
        return {f"{e}/{a}": p.policy_version for (e, a), p in self.policies.items()}

    def pinnable(self, pool: Sequence[str]) -> Callable[[str, str], bool]:
        """Whether a pinned arm may enrol a request of a batch over ``pool``: its policy is loaded and scores
        exactly that pool (same models, same order: the candidate mask's columns)."""
        usable = {k for k, p in self.policies.items() if list(p.models) == list(pool)}
        return lambda experiment, arm: (experiment, arm) in usable

    def decide(self, core: Any, experiments: Sequence[ExperimentConfig], reqs: Sequence[RouteRequest],
               decision_ids: Sequence[str], candidates: Sequence[Sequence[str]], pool: Sequence[str],
               host: np.ndarray, out: np.ndarray) -> list[RoutingPolicy | None]:
        """Re-decide the rows a pinned arm enrols, in place in ``out`` (the packed [action, propensity,
        probabilities..., embedding...] rows of the served policy's forward over ``host``'s inputs); returns the
        policy that decided each row (None: the served one). Shadow rows are never enrolled (as in apply_overrides)."""
        chosen: list[RoutingPolicy | None] = [None] * len(reqs)
        if not self.policies or not experiments:
            return chosen
        pinnable = self.pinnable(pool)
        groups: dict[ArmKey, list[int]] = {}
        for row, req in enumerate(reqs):
            if req.shadow_model:
                continue
            hit = enrolled_arm(experiments, req.user or decision_ids[row], candidates[row], pinnable)
            if hit is not None and hit[1].checkpoint is not None:
                groups.setdefault((hit[0].name, hit[1].name), []).append(row)
        k = len(pool)
        for key, rows in groups.items():
            policy = self.policies[key]
            emb = torch.from_numpy(np.ascontiguousarray(out[rows, 2 + k:])).to(core.device)
            out[rows, : 2 + k] = core.decide_embedded(policy, emb, np.ascontiguousarray(host[rows]))[:, : 2 + k]
            for row in rows:
                chosen[row] = policy
        return chosen


def load_pinned_arms(experiments: Sequence[ExperimentConfig], storage: Any, core: Any) -> PinnedArms:
    """Load every pinned arm's policy for ``core`` (a RouterCore): a checkpoint folder, or a storage URI read with
    ``storage`` (a StorageConfig). Errors name ``experiments.<name>.arms[i].checkpoint``: a missing or unreadable
    checkpoint, another encoder or width than the serving encoder, or another pool than the served policy's."""
    policies: dict[ArmKey, RoutingPolicy] = {}
    for exp in experiments:
        for arm in exp.arms:
            if arm.checkpoint is None:
                continue
            where = f"{arm_field(exp, arm)}.checkpoint"
            try:
                policy = load_policy_at(arm.checkpoint, storage, where)
            except ValueError:
                raise
            except Exception as exc:  # a storage error (no such key, no access): say which arm
                raise ValueError(f"{where}: cannot load {arm.checkpoint}: {exc}") from exc
            if core.device.type != "cpu":
                policy = policy_from_state(policy.state(), device=core.device)
            core._check_compatible(policy.encoder_id, policy.embed_dim, where)
            if list(policy.models) != list(core.models):
                raise ValueError(f"{where}: the pinned policy scores {list(policy.models)} but the served pool is "
                                 f"{list(core.models)}; pin a checkpoint trained on the same pool")
            policy.network.eval()
            policies[(exp.name, arm.name)] = policy
    return PinnedArms(policies)
