"""Bounded exploration: keep every candidate's sampling probability inside [floor, ceiling].

Explore decisions are sampled from the policy's softmax and their
probability is logged as the propensity mu that the learner and off-policy
evaluation divide by. A softmax that has become sharp gives some candidates
mu ~ 1e-6: such events carry importance weights of 1e6 (useless for OPE,
clipped away in training) and those candidates are never tried again. The
floor bounds every weight pi / mu by 1 / floor; the ceiling keeps at least
1 - ceiling of the explore traffic on the other candidates.

For a row with K candidates the bounds actually used are
``floor_eff = min(floor, 1/K)`` and ``ceiling_eff = max(ceiling, 1/K)``, so
they can always be met (K * floor_eff <= 1 <= K * ceiling_eff). The bounded
distribution is the Euclidean projection of p onto
{q : sum(q) = 1, floor_eff <= q_j <= ceiling_eff for candidates, q_j = 0 otherwise},
which has the form q_j = clip(p_j + lam, floor_eff, ceiling_eff) for one
shift ``lam`` per row. One shift for all candidates keeps their order
(p_i >= p_j implies q_i >= q_j); a row already inside the bounds is returned
unchanged; non-candidates stay exactly 0. ``lam`` is found exactly (no
iteration count): the sum is piecewise linear in lam with breakpoints
lo_j - p_j and hi_j - p_j, so it is evaluated at all 2K breakpoints and
interpolated on the segment that crosses 1. That is a fixed handful of
batched tensor ops, cheap on the GPU replica's decision path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: configs import the defaults and check_bounds
    import torch

DEFAULT_EXPLORATION_FLOOR = 0.01
"""Default floor: an explore decision's propensity is at least 1% (importance weights <= 100)."""
DEFAULT_EXPLORATION_CEILING = 0.98
"""Default ceiling: at least 2% of explore decisions try another candidate (binding when K is small)."""


def check_bounds(floor: float, ceiling: float, prefix: str = "") -> None:
    """ValueError naming the field unless 0 <= floor <= ceiling <= 1 and ceiling > 0."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"{prefix}exploration_floor must be in [0, 1], got {floor}")
    if not 0.0 < ceiling <= 1.0:
        raise ValueError(f"{prefix}exploration_ceiling must be in (0, 1], got {ceiling}")
    if floor > ceiling:
        raise ValueError(f"{prefix}exploration_floor ({floor}) must be <= {prefix}exploration_ceiling ({ceiling})")


@dataclass(frozen=True)
class ExplorationBounds:
    """The explore-mode bounds one decision applies (serving, the offline trainers and the RLModule alike)."""

    floor: float = DEFAULT_EXPLORATION_FLOOR
    """Smallest probability a candidate is sampled with (capped at 1/K for K candidates)."""
    ceiling: float = DEFAULT_EXPLORATION_CEILING
    """Largest probability a candidate is sampled with (raised to 1/K for K candidates)."""

    def __post_init__(self) -> None:
        check_bounds(self.floor, self.ceiling)

    @classmethod
    def off(cls) -> "ExplorationBounds":
        """No bounds: explore samples the plain softmax."""
        return cls(0.0, 1.0)


def bounds_active(floor: float, ceiling: float) -> bool:
    """False when the bounds cannot change any distribution (floor 0 and ceiling 1)."""
    return floor > 0.0 or ceiling < 1.0


def bound_probabilities(probs: torch.Tensor, mask: torch.Tensor, floor: float, ceiling: float) -> torch.Tensor:
    """Project each row of ``probs`` (B, K; 0 outside ``mask``) into the exploration bounds.

    ``mask`` (B, K) bool marks each row's candidates (a row with none is
    returned unchanged). Rows already inside the bounds come back bit-identical.
    """
    import torch

    if not bounds_active(floor, ceiling) or probs.numel() == 0:
        return probs
    p = torch.where(mask, probs, torch.zeros_like(probs))
    k = mask.sum(dim=1, keepdim=True).clamp(min=1).to(p.dtype)
    lo = torch.where(mask, torch.minimum(torch.full_like(k, floor), 1.0 / k), torch.zeros_like(p))
    hi = torch.where(mask, torch.maximum(torch.full_like(k, ceiling), 1.0 / k), torch.zeros_like(p))
    inside = ((p >= lo) & (p <= hi)).all(dim=1, keepdim=True) | ~mask.any(dim=1, keepdim=True)

    # sum_j clip(p_j + lam, lo_j, hi_j) at every breakpoint lam (B, 2K), breakpoints sorted.
    breaks, _ = torch.sort(torch.cat([lo - p, hi - p], dim=1), dim=1)
    totals = torch.clamp(p.unsqueeze(1) + breaks.unsqueeze(2), lo.unsqueeze(1), hi.unsqueeze(1)).sum(dim=2)
    # First breakpoint where the sum reaches 1 (exists: the largest gives sum(hi) >= 1).
    reach = totals >= 1.0
    j = torch.where(reach.any(dim=1), reach.float().argmax(dim=1), torch.full_like(reach[:, 0], breaks.shape[1] - 1, dtype=torch.long))
    jm = (j - 1).clamp(min=0)
    t1, g1 = breaks.gather(1, j.unsqueeze(1)), totals.gather(1, j.unsqueeze(1))
    t0, g0 = breaks.gather(1, jm.unsqueeze(1)), totals.gather(1, jm.unsqueeze(1))
    slope = g1 - g0
    frac = torch.where(slope > 0, (1.0 - g0) / torch.where(slope > 0, slope, torch.ones_like(slope)), torch.ones_like(slope))
    lam = torch.where(j.unsqueeze(1) > 0, t0 + frac.clamp(0.0, 1.0) * (t1 - t0), t1)
    bounded = torch.clamp(p + lam, lo, hi)
    return torch.where(inside, probs, bounded)
