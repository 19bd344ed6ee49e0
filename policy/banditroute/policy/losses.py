"""Loss functions of the bandit policy (pure torch, no Ray, unit-tested).

All of them see only bandit feedback: the reward of the ONE model that was
chosen, its log-probability under the current policy and, for off-policy
data, the probability it had under the policy that chose it (propensity).
"""

from __future__ import annotations

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over each row of masked logits (-inf entries contribute 0)."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # Zero the -inf log-probabilities BEFORE multiplying: 0 * -inf is NaN, and
    # its gradient would poison every update that uses a candidate mask.
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)


def reinforce_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    baseline: torch.Tensor,
    entropy_coef: float,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE with a baseline and entropy regularisation.

    loss = -mean(iw * (r - b) * log pi(a|x,w)) - entropy_coef * mean(H(pi(.|x,w)))

    ``baseline`` is detached here: it reduces variance, it is not trained by
    this term. ``importance_weights`` (pi / behaviour propensity, clipped)
    make the gradient unbiased for data collected by an older policy; None
    means on-policy (all weights 1).
    """
    logp = torch.log_softmax(logits, dim=-1)
    logp_action = logp.gather(1, actions.long().unsqueeze(1)).squeeze(1)
    advantage = rewards - baseline.detach()
    if importance_weights is not None:
        advantage = advantage * importance_weights.detach()
    policy_loss = -(advantage * logp_action).mean()
    mean_entropy = entropy(logits).mean()
    loss = policy_loss - entropy_coef * mean_entropy
    return loss, {"policy_loss": policy_loss.detach(), "entropy": mean_entropy.detach()}


def value_loss(predicted: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Squared error of the learned baseline V(x, w) against the observed reward."""
    return torch.nn.functional.mse_loss(predicted, rewards)


def clipped_importance_weights(
    current_prob: torch.Tensor, behaviour_prob: torch.Tensor, clip: float
) -> torch.Tensor:
    """min(pi(a) / mu(a), clip): importance weights with bounded variance."""
    return torch.clamp(current_prob / behaviour_prob.clamp(min=1e-6), max=clip)
