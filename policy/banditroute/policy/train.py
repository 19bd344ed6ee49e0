"""Offline training of the BaRP policy under bandit feedback only.

The trainer never sees the full outcome table. It talks to a
``BanditEnvironment`` that reveals, for each (prompt, preference, chosen
model), the reward of that one model, exactly the feedback the router gets
in production. Actions are decided as a Router replica decides them
(``policy.decide.decide`` within the same exploration bounds), and every
pull is logged with its propensity, so the training run itself is a logged
bandit data set of the production exploration.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from banditroute.core.data import RoutingData
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.decide import decide
from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.exploration import DEFAULT_EXPLORATION_CEILING, DEFAULT_EXPLORATION_FLOOR, ExplorationBounds, check_bounds
from banditroute.policy.losses import reinforce_loss, value_loss
from banditroute.policy.reward import DEFAULT_TAU_QUANTILE, fit_tau, reward, sample_w_cost
from banditroute.core.progress import progress_bar

TRAIN_MASKED_LOGIT = -1e9
"""Finite stand-in for the -inf logit of a model not offered, in the loss: losses.entropy computes
where(p > 0, p * logp, 0), whose gradient is NaN at logp = -inf."""


@dataclass
class BanditLoopConfig:
    """The bandit training loop's settings, shared by every policy kind's training config."""

    epochs: int = 200
    """Passes over the training prompts; each pass draws fresh preferences and actions."""
    batch_size: int = 128
    """Prompts per gradient step."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    weight_decay: float = 1e-5
    """Adam weight decay."""
    entropy_coef_start: float = 0.2
    """Entropy bonus at the start (keeps exploring while the policy is uninformed)."""
    entropy_coef_end: float = 0.005
    """Entropy bonus at the end (decays linearly)."""
    value_coef: float = 0.5
    """Weight of the baseline's squared error in the total loss."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    tau_quantile: float = DEFAULT_TAU_QUANTILE
    """tau = this quantile of per-call cost in the training data."""
    seed: int = 0
    """Seeds preferences, actions and initial weights."""
    max_pulls: int = 0
    """Stop after this many pulls (decisions with feedback), however many epochs that takes; 0 = epochs x prompts."""
    exploration_floor: float = DEFAULT_EXPLORATION_FLOOR
    """Explore-mode floor on each candidate's sampling probability (as the Router replicas apply it)."""
    exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING
    """Explore-mode ceiling on each candidate's sampling probability (as the Router replicas apply it)."""

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("train.epochs and train.batch_size must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError("train.learning_rate must be > 0")
        if self.max_pulls < 0:
            raise ValueError("train.max_pulls must be >= 0")
        if not 0 < self.tau_quantile <= 1:
            raise ValueError("train.tau_quantile must be in (0, 1]")
        check_bounds(self.exploration_floor, self.exploration_ceiling, "train.")

    @property
    def exploration_bounds(self) -> ExplorationBounds:
        return ExplorationBounds(self.exploration_floor, self.exploration_ceiling)


@dataclass
class TrainConfig(BanditLoopConfig):
    """Bandit training of the BaRP policy."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Network shape."""


class BanditEnvironment:
    """Reveals the reward of the chosen model only, and logs every pull."""

    def __init__(self, data: RoutingData, tau: float):
        self._scores = data.scores_filled
        self._costs = data.costs
        self.tau = tau
        self.pulls: list[dict[str, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._scores)

    def pull(
        self,
        rows: np.ndarray,
        actions: np.ndarray,
        w_cost: np.ndarray,
        propensities: np.ndarray,
        cost_scale: np.ndarray | None = None,
    ) -> np.ndarray:
        """Reward of model ``actions[i]`` on prompt ``rows[i]`` under ``w_cost[i]``.

        ``cost_scale[i]`` (optional) multiplies the logged cost: a training
        policy that perturbs prices (price augmentation) pays the perturbed price.
        """
        score = self._scores[rows, actions]
        cost = self._costs[rows, actions]
        if cost_scale is not None:
            cost = cost * np.asarray(cost_scale, dtype=np.float64)
        r = reward(score, cost, w_cost, self.tau)
        self.pulls.append(
            {"row": rows, "w_cost": w_cost, "action": actions, "propensity": propensities, "score": score, "cost": cost, "reward": r}
        )
        return r

    def log_frame(self) -> pd.DataFrame:
        if not self.pulls:
            return pd.DataFrame(columns=["row", "w_cost", "action", "propensity", "score", "cost", "reward"])
        return pd.DataFrame({k: np.concatenate([p[k] for p in self.pulls]) for k in self.pulls[0]})


@contextmanager
def torch_threads(n: int | None, device: str | torch.device = "cpu") -> Iterator[None]:
    """Cap torch's intra-op threads at ``n`` while training on CPU (None: leave torch's setting).

    The policy's matrices are small, so one thread is about as fast as many on an
    idle machine and far faster when other processes share the cores (measured
    on 2 busy cores: 5 RouterBench epochs in 0.5 s with 1 thread, 4.1 s with 2).
    """
    previous = torch.get_num_threads()
    limit = n is not None and torch.device(device).type == "cpu" and 0 < n < previous
    if limit:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if limit:
            torch.set_num_threads(previous)


StepFn = Callable[[np.ndarray, np.ndarray, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, np.ndarray | None]"]


def bandit_training_loop(
    module: torch.nn.Module,
    step: StepFn,
    env: BanditEnvironment,
    config: BanditLoopConfig,
    rng: np.random.Generator,
    generator: torch.Generator,
    device: str = "cpu",
    desc: str = "training (bandit feedback)",
    cpu_threads: int | None = 1,
) -> list[dict[str, float]]:
    """The REINFORCE + baseline + entropy loop shared by every bandit-trained policy.

    Per batch of prompts: draw preferences, call ``step(rows, w, w_t)`` for
    (logits over the environment's models (B, K), -inf for a model not
    offered, value (B,), optional per-(row, model) cost scale (B, K)), decide
    one model per row as a Router replica explores (``policy.decide.decide``
    within ``config``'s exploration bounds), reveal ONLY its reward, and take
    one Adam step on ``module``. The policy gradient is weighted by
    pi(a) / mu(a) (softmax over the bounded propensity it was sampled with), so
    the bounds do not bias it. Returns per-epoch metrics. On CPU, torch runs
    on ``cpu_threads`` threads meanwhile (see :func:`torch_threads`).
    """
    bounds = config.exploration_bounds
    optimiser = torch.optim.Adam(
        [p for p in module.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    history: list[dict[str, float]] = []
    n = len(env)
    budget = config.max_pulls or config.epochs * n
    n_epochs = -(-budget // n)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total_steps = (n_epochs - 1) * steps_per_epoch + -(-(budget - (n_epochs - 1) * n) // config.batch_size)
    step_no = 0
    with torch_threads(cpu_threads, device), progress_bar(total=n_epochs, desc=desc) as bar:
        for epoch in range(n_epochs):
            module.train()
            order = rng.permutation(n)[: budget - epoch * n]
            epoch_reward, epoch_entropy = 0.0, 0.0
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                w = sample_w_cost(rng, len(rows))
                w_t = torch.as_tensor(w, dtype=torch.float32, device=device)
                logits, value, cost_scale = step(rows, w, w_t)
                with torch.no_grad():
                    host_logits = logits.detach().cpu()
                    decided = decide(host_logits, True, bounds, generator)
                    pi = torch.softmax(host_logits.float(), dim=-1).gather(1, decided.actions.unsqueeze(1)).squeeze(1)
                    iw = pi / decided.propensities
                actions = decided.actions
                a_np = actions.numpy()
                scale = None if cost_scale is None else np.asarray(cost_scale)[np.arange(len(rows)), a_np]
                r = env.pull(rows, a_np, w, decided.propensities.numpy(), cost_scale=scale)
                r_t = torch.as_tensor(r, dtype=torch.float32, device=device)
                frac = step_no / max(1, total_steps - 1)
                entropy_coef = config.entropy_coef_start + frac * (config.entropy_coef_end - config.entropy_coef_start)
                loss_logits = logits.masked_fill(torch.isneginf(logits), TRAIN_MASKED_LOGIT)
                pg_loss, stats = reinforce_loss(loss_logits, actions.to(device), r_t, value, entropy_coef, iw.to(device))
                loss = pg_loss + config.value_coef * value_loss(value, r_t)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
                optimiser.step()
                epoch_reward += float(r.sum())
                epoch_entropy += float(stats["entropy"]) * len(rows)
                step_no += 1
            history.append({"epoch": epoch, "mean_reward": epoch_reward / len(order), "entropy": epoch_entropy / len(order)})
            bar.update(1)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"reward {epoch_reward / len(order):.3f}")
    module.eval()
    return history


def train_bandit_policy(
    data: RoutingData,
    embeddings: np.ndarray,
    config: TrainConfig,
    encoder_config: EncoderConfig,
    encoder_id: str,
    device: str = "cpu",
) -> tuple[BarpPolicy, BanditEnvironment, list[dict[str, float]]]:
    """Train a policy with REINFORCE + baseline + entropy on bandit feedback.

    Returns the policy, the environment (its pull log holds every logged
    decision with its propensity) and per-epoch metrics.
    """
    config.validate()
    if len(data) != len(embeddings):
        raise ValueError(f"{len(data)} prompts but {len(embeddings)} embeddings")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    tau = fit_tau(data.costs, config.tau_quantile)
    meta = PolicyMeta(
        models=list(data.models),
        tau=tau,
        embed_dim=int(embeddings.shape[1]),
        encoder=encoder_config,
        encoder_id=encoder_id,
        network=config.network,
    )
    policy = BarpPolicy(meta, device=device)
    net = policy.network
    env = BanditEnvironment(data, tau)
    emb_all = torch.as_tensor(embeddings, dtype=torch.float32, device=device)

    def step(rows: np.ndarray, w: np.ndarray, w_t: torch.Tensor):
        logits, value = net(emb_all[rows], w_t)
        return logits, value, None

    history = bandit_training_loop(net, step, env, config, rng, generator, device)
    n = len(data)
    net.eval()
    meta.training = {
        "config": _plain(config),
        "data_fingerprint": data.fingerprint(),
        "n_prompts": n,
        "final_mean_reward": history[-1]["mean_reward"],
        "pulls": int(sum(len(p["row"]) for p in env.pulls)),
    }
    return policy, env, history


def _plain(obj: Any) -> Any:
    from banditroute.core.config import to_dict

    return to_dict(obj)
