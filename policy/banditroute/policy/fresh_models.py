"""Conservative traffic for freshly onboarded models: a probability band until enough evidence.

A model onboarded from a 10-50 prompt quiz has a noisy identity, wrong in
both directions (docs/any_model_set.md: Yi-34B underrated and never routed
to, qwen2.5-7b / nemotron-51b overrated and routed to far too often). Acting
on E[p] under that posterior either ignores the model or over-trusts it.

The rule: while a model is *fresh* (fewer than ``min_observations`` scored
outcomes behind its identity: quiz answers plus the bandit rewards an online
identity learner folds in), its probability in every request where it is
offered is kept inside ``[floor, cap]``:

* the **floor** means it is never ignored: it keeps getting a small share of
  the traffic, whose rewards are what refines its identity;
* the **cap** means it is never over-trusted: however good the quiz made it
  look, it cannot take more than ``cap`` of a request's probability.

It acts on the logits, before ``decide()``, so the logged propensity of every
decision is the probability it was really sampled with (off-policy
estimates stay unbiased). Inside the band the policy's own preference is
untouched. With probability p_k = e^l_k / (e^l_k + S_k) (S_k the sum over the
other offered candidates), p_k in [lo, hi] <=> l_k in [log(S_k lo / (1 - lo)),
log(S_k hi / (1 - hi))]: :func:`band_logits` clips each fresh column to that
interval, against the other candidates' ORIGINAL logits (with several fresh
models each is banded against the rest; they do not chase each other).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FreshModelConfig:
    """The probability band of freshly onboarded models (identity policy)."""

    enabled: bool = True
    """Band fresh models' probabilities; False = act on their identity like any other model's."""
    min_observations: int = 100
    """A model is fresh while its identity rests on fewer scored outcomes than this (quiz answers + folded-in rewards)."""
    floor: float = 0.03
    """Least probability of a fresh model in a request that offers it (never ignored); <= 1/K with K candidates."""
    cap: float = 0.25
    """Largest probability of a fresh model in a request that offers it (never over-trusted)."""

    def validate(self) -> None:
        if self.min_observations < 0:
            raise ValueError("fresh_models.min_observations: must be >= 0")
        if not (0.0 <= self.floor < self.cap <= 1.0):
            raise ValueError(f"fresh_models: need 0 <= floor < cap <= 1, got floor {self.floor}, cap {self.cap}")


def fresh_columns(n_observations, config: FreshModelConfig) -> list[bool]:
    """Per model (in pool order): fresh or not, from the number of outcomes its identity rests on."""
    if not config.enabled:
        return [False] * len(n_observations)
    return [int(n) < config.min_observations for n in n_observations]


def band_logits(logits: torch.Tensor, fresh: torch.Tensor, floor: float, cap: float) -> torch.Tensor:
    """``logits`` (B, K; -inf where not offered) with each fresh column's softmax probability moved into
    [floor, cap] (floor lowered to 1/K_offered when the row offers fewer than 1/floor candidates, cap
    raised to that too); non-fresh columns, rows where the fresh model is not offered and rows where
    it is the only candidate are unchanged. ``fresh``: (K,) bool.
    """
    if not bool(fresh.any()):
        return logits
    offered = torch.isfinite(logits)
    n_offered = offered.sum(dim=1, keepdim=True).clamp(min=1).to(logits.dtype)
    lo = torch.clamp(torch.full_like(n_offered, floor), max=1.0 / n_offered)
    hi = torch.clamp(torch.full_like(n_offered, cap), min=1.0 / n_offered)
    lo = torch.minimum(lo, hi * 0.999999)  # keep the band non-empty
    out = logits.clone()
    for k in torch.nonzero(fresh).flatten().tolist():
        others = logits.clone()
        others[:, k] = float("-inf")
        log_s = torch.logsumexp(others, dim=1)  # log of the other offered candidates' exp-sum (ORIGINAL logits)
        rows = offered[:, k] & torch.isfinite(log_s)
        if not bool(rows.any()):
            continue
        low = log_s[rows] + torch.log(lo[rows, 0] / (1.0 - lo[rows, 0]))
        high = log_s[rows] + torch.log(hi[rows, 0] / (1.0 - hi[rows, 0]))
        out[rows, k] = torch.minimum(torch.maximum(logits[rows, k], low), high)
    return out
