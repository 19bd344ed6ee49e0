"""A candidate mask that remembers the pool its columns refer to (the identity policy's pool is live)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class CandidateMask(np.ndarray):
    """A boolean (B, K) mask that remembers the pool (``models``) its columns refer to."""

    models: list[str]

    def __array_finalize__(self, obj) -> None:  # keep the pool through views and copies
        self.models = getattr(obj, "models", None)


def as_candidate_mask(mask: np.ndarray, models: Sequence[str]) -> CandidateMask:
    """``mask`` as a :class:`CandidateMask` over ``models``."""
    out = np.asarray(mask, dtype=bool).view(CandidateMask)
    out.models = list(models)
    return out
