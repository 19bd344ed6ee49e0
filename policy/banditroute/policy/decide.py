"""One decision rule: masked logits -> (action, propensity, probabilities), explore or greedy.

Serving (``serve.core.RouterCore``), the offline bandit trainers
(``policy.train.bandit_training_loop``, used by the BaRP and the identity
trainer), the RLModule (``learner.module.BarpRLModule``) and every policy's
``decide`` call :func:`decide`, so training explores exactly like production:

* explore rows sample from the softmax projected into the exploration bounds
  (``policy.exploration.bound_probabilities``), and their propensity is the
  probability of the chosen model under THAT distribution (what was really
  sampled from, so importance weights pi / mu are right);
* greedy rows take the argmax of the plain softmax, propensity 1, and report
  the plain softmax.

Candidates are the finite logits unless a mask says otherwise: masked-out
models (logit -inf) keep probability exactly 0 and are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from banditroute.policy.exploration import ExplorationBounds, bound_probabilities

DEFAULT_BOUNDS = ExplorationBounds()
"""The serving defaults (floor 1%, ceiling 98%)."""


class DecidedTensors(NamedTuple):
    """A batch's decisions as tensors on the logits' device."""

    actions: torch.Tensor
    """(B,) int64 chosen model index."""
    propensities: torch.Tensor
    """(B,) probability the chosen model was picked with (1 for greedy rows)."""
    probabilities: torch.Tensor
    """(B, K) the distribution each row was decided from: bounded softmax (explore) or softmax (greedy)."""


def decide(
    logits: torch.Tensor,
    explore: bool | torch.Tensor,
    bounds: ExplorationBounds = DEFAULT_BOUNDS,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> DecidedTensors:
    """Decide every row of ``logits`` (B, K): sample (explore) or argmax (greedy).

    ``explore`` is one mode for the batch (bool) or a (B,) bool tensor, one
    per row. ``mask`` (B, K) bool marks the candidates (default: the finite
    logits). Sampling draws from ``generator`` (torch's global one when None);
    an all-greedy batch draws nothing.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    n = probs.shape[0]
    if isinstance(explore, bool):
        if not explore:
            return DecidedTensors(probs.argmax(dim=-1), torch.ones(n, dtype=probs.dtype, device=probs.device), probs)
        rows = torch.ones(n, dtype=torch.bool, device=probs.device)
    else:
        rows = explore.to(device=probs.device, dtype=torch.bool).reshape(n)
    candidates = torch.isfinite(logits) if mask is None else mask.to(device=probs.device, dtype=torch.bool)
    bounded = bound_probabilities(probs, candidates, bounds.floor, bounds.ceiling)
    probs = torch.where(rows.unsqueeze(1), bounded, probs)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    actions = torch.where(rows, sampled, probs.argmax(dim=-1))
    chosen = probs.gather(1, actions.unsqueeze(1)).squeeze(1)
    return DecidedTensors(actions, torch.where(rows, chosen, torch.ones_like(chosen)), probs)


@dataclass
class Decisions:
    """Routing decisions for a batch, on the host: chosen model index and its propensity."""

    actions: np.ndarray
    """Chosen model index per row, shape (B,)."""
    propensities: np.ndarray
    """Probability with which each chosen model was picked in this mode, shape (B,)."""
    probabilities: np.ndarray
    """The distribution each row was decided from (0 for non-candidates), shape (B, K)."""

    @staticmethod
    def host_columns(decided: DecidedTensors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(actions, propensities, probabilities) as numpy after ONE device->host copy."""
        stacked = torch.cat(
            [decided.actions.unsqueeze(1).float(), decided.propensities.unsqueeze(1), decided.probabilities], dim=1
        ).cpu().numpy()
        return stacked[:, 0].astype(np.int64), stacked[:, 1], stacked[:, 2:]

    @classmethod
    def from_tensors(cls, decided: DecidedTensors) -> "Decisions":
        return cls(*cls.host_columns(decided))
