"""The online learner's configuration, apart from the learner itself.

``banditroute.learner.learner`` imports RLlib; the application builder,
the cluster config and Serve replicas only need these settings, so they
live here (``learner.learner`` re-exports ``LearnerConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from banditroute.learner.checkpoint import DEFAULT_CHECKPOINT_PREFIX
from banditroute.learner.promotion import PromotionConfig
from banditroute.learner.log_cursor import LogCursorConfig

ONLINE_KINDS = ("barp", "value", "identity")
"""Policy kinds the online learner trains (``learner.registry.LEARNER_KINDS`` holds one learner class per kind)."""


@dataclass
class ValueLearnerConfig:
    """What only the value learner (kind ``value``) uses; learning rate, grad clip and replay are LearnerConfig's."""

    gradient_steps: int = 2
    """Adam steps per update, each on ``replay_sample`` pulls drawn from the replay of all pulls so far."""
    replay_sample: int = 256
    """Pulls per Adam step, drawn uniformly from the replay (all of them while fewer); with ``gradient_steps``,
    how hard each update fits the replay: updates come every ~0.1 s with a few events each, so more overfits."""
    weight_decay: float = 1e-3
    """Adam weight decay (the offline trainer's default, picked on an inner RouterBench split)."""
    cost_loss_weight: float = 1.0
    """Weight of the cost heads' loss against the score heads'."""
    bootstrap: bool = True
    """Weight each pull Poisson(1) per head (online bootstrap: the heads' spread drives Thompson exploration)."""

    def validate(self) -> None:
        if self.gradient_steps < 1 or self.replay_sample < 1:
            raise ValueError("learner.value.gradient_steps and learner.value.replay_sample must be >= 1")
        if self.weight_decay < 0 or self.cost_loss_weight < 0:
            raise ValueError("learner.value.weight_decay and learner.value.cost_loss_weight must be >= 0")


@dataclass
class IdentityLearnerConfig:
    """What only the identity learner (kind ``identity``, learner/identity_learner.py) uses; learning rate, loss
    weights, importance clip, grad clip, replay and gradient steps are LearnerConfig's."""

    refine_identities: bool = True
    """Refit each model's identity (IRT posterior, item maps frozen) from its scored outcomes in the feedback."""
    refit_every: int = 20
    """Updates between identity refits (each refit costs ~0.1-1 s; only models with new outcomes are refitted)."""
    max_observations_per_model: int = 2000
    """Most recent outcomes per model kept for refits (the count in n_observations keeps growing)."""
    max_models: int = 64
    """Distinct model names the replay can hold (its candidate masks have this many columns)."""

    def validate(self) -> None:
        if self.refit_every < 1 or self.max_observations_per_model < 1 or self.max_models < 1:
            raise ValueError("learner.identity.refit_every, max_observations_per_model and max_models must be >= 1")


@dataclass
class LearnerConfig:
    """Online learner: loss weights, optimisation, replay and checkpoints."""

    learning_rate: float = 1e-3
    """Adam learning rate (RLlib's optimizer)."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (keeps the router exploring)."""
    value_coef: float = 0.5
    """Weight of the value baseline's squared error in the total loss."""
    importance_clip: float = 5.0
    """Clip for the importance weights pi/mu (bounds the off-policy variance)."""
    grad_clip: float = 1.0
    """Max global gradient norm (RLlib grad_clip, by global norm)."""
    replay_capacity: int = 20_000
    """Most recent training rows kept for replay (0 disables replay)."""
    replay_sample: int = 256
    """Replayed rows added to every update's fresh events."""
    gradient_steps: int = 1
    """Gradient steps per update (RLlib num_epochs over the update batch)."""
    checkpoint_every: int = 100
    """Write a checkpoint every N updates (and always on shutdown); 0 = only on shutdown."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept in storage (older ones are pruned)."""
    checkpoint_prefix: str = DEFAULT_CHECKPOINT_PREFIX
    """Storage key prefix of the checkpoints."""
    seed: int = 0
    """Seeds replay sampling and torch."""
    torch_threads: int = 1
    """torch intra-op threads in the learner actor (0 = torch's default; the small MLP needs one)."""
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    """The promotion gate: which versions replicas get (learner.promotion; see learner/promotion.py)."""
    log_cursor: LogCursorConfig = field(default_factory=LogCursorConfig)
    """The cursor over the committed event log that trains on what pushes missed (learner.log_cursor; see learner/log_cursor.py)."""
    rebase_after_held_checks: int = 5
    """After this many gate checks in a row that HOLD the candidate on evidence (not for want of it), the
    candidate restarts from the serving weights (fresh optimizer), so it cannot drift ever further below
    what is served; 0 = never."""
    value: ValueLearnerConfig = field(default_factory=ValueLearnerConfig)
    """Settings of the value learner (kind ``value``)."""
    identity: IdentityLearnerConfig = field(default_factory=IdentityLearnerConfig)
    """Settings of the identity learner (kind ``identity``)."""

    def __post_init__(self) -> None:
        from banditroute.core.config import from_dict

        if isinstance(self.promotion, dict):  # LearnerConfig(**plain_dict) as well as from_dict
            self.promotion = from_dict(PromotionConfig, self.promotion, prefix="learner.promotion")
        if isinstance(self.log_cursor, dict):
            from banditroute.core.config import from_dict

            self.log_cursor = from_dict(LogCursorConfig, self.log_cursor, prefix="learner.log_cursor")
        if isinstance(self.value, dict):
            self.value = from_dict(ValueLearnerConfig, self.value, prefix="learner.value")
        if isinstance(self.identity, dict):
            self.identity = from_dict(IdentityLearnerConfig, self.identity, prefix="learner.identity")

    def validate(self) -> None:
        if self.torch_threads < 0:
            raise ValueError("learner.torch_threads must be >= 0")
        if self.learning_rate <= 0:
            raise ValueError("learner.learning_rate must be > 0")
        if self.entropy_coef < 0:
            raise ValueError("learner.entropy_coef must be >= 0")
        if self.value_coef < 0:
            raise ValueError("learner.value_coef must be >= 0")
        if self.importance_clip <= 0:
            raise ValueError("learner.importance_clip must be > 0")
        if self.grad_clip <= 0:
            raise ValueError("learner.grad_clip must be > 0")
        if self.replay_capacity < 0 or self.replay_sample < 0:
            raise ValueError("learner.replay_capacity and learner.replay_sample must be >= 0")
        if self.gradient_steps < 1:
            raise ValueError("learner.gradient_steps must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError("learner.checkpoint_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError("learner.keep_checkpoints must be >= 1")
        if not self.checkpoint_prefix.strip("/"):
            raise ValueError("learner.checkpoint_prefix must not be empty")
        if self.rebase_after_held_checks < 0:
            raise ValueError("learner.rebase_after_held_checks must be >= 0")
        self.promotion.validate()
        self.log_cursor.validate()
        self.value.validate()
        self.identity.validate()
