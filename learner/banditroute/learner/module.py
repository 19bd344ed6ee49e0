"""The BaRP policy as an RLlib RLModule (new API stack, ``TorchRLModule``).

The network is the one the offline trainer and the router replicas use
(:class:`banditroute.policy.barp.BarpNetwork`); this class only gives it
RLlib's three entry points and state API, so an RLlib ``TorchLearner`` can
train it:

- ``forward_exploration``: sample a model within the exploration bounds and
  return its probability, exactly as a replica decides and logs it
  (``policy.decide.decide``; bounds from ``model_config``, serving defaults);
- ``forward_inference``: greedy argmax (propensity 1), the same function;
- ``forward_train``: masked logits and the value head, with gradients.

``get_state()``/``set_state()`` speak the SAME weights format as
``BarpPolicy.state()["weights"]`` (BarpNetwork parameter names, numpy
arrays), so a learner state can be published to the parameter server and
loaded by any replica without renaming keys.

Batch columns (numpy or torch): ``obs`` (B, d) float32 prompt embeddings,
``w_cost`` (B,), optional ``mask`` (B, K) bool candidate mask.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Dict

import numpy as np
import torch

from banditroute.policy.barp import BarpNetwork, NetworkConfig, PolicyMeta
from banditroute.policy.decide import DEFAULT_BOUNDS, DecidedTensors, decide
from banditroute.policy.exploration import ExplorationBounds

# RLlib's RLModule.__init__ always builds a legacy RLModuleConfig and logs a
# deprecation warning for it, even for modules written the new way.
logging.getLogger("ray.rllib.core.rl_module.rl_module").setLevel(logging.ERROR)

import gymnasium as gym  # noqa: E402  (after the logger tweak, RLlib imports gymnasium anyway)
from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule  # noqa: E402

W_COST = "w_cost"
MASK = "mask"
PROPENSITIES = "propensities"
PROBS = "probs"


def _tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype, device=device)


class BarpRLModule(TorchRLModule):
    """RLModule wrapper of BarpNetwork.

    ``model_config``: embed_dim, n_models, network (dict), and optionally
    exploration_floor / exploration_ceiling (default: the serving defaults).
    """

    def setup(self) -> None:
        cfg = self.model_config or {}
        network = cfg.get("network") or {}
        if isinstance(network, dict):
            network = NetworkConfig(**network)
        self.net = BarpNetwork(int(cfg["embed_dim"]), int(cfg["n_models"]), network)
        self.bounds = ExplorationBounds(
            float(cfg.get("exploration_floor", DEFAULT_BOUNDS.floor)), float(cfg.get("exploration_ceiling", DEFAULT_BOUNDS.ceiling))
        )

    # --- construction -------------------------------------------------------

    @classmethod
    def from_meta(cls, meta: PolicyMeta, bounds: ExplorationBounds = DEFAULT_BOUNDS) -> "BarpRLModule":
        """A module shaped for a policy's models and embedding width (random weights), exploring within ``bounds``."""
        return cls(
            observation_space=gym.spaces.Box(-np.inf, np.inf, (meta.embed_dim,), np.float32),
            action_space=gym.spaces.Discrete(len(meta.models)),
            inference_only=False,
            model_config={
                "embed_dim": meta.embed_dim,
                "n_models": len(meta.models),
                "network": asdict(meta.network),
                "exploration_floor": bounds.floor,
                "exploration_ceiling": bounds.ceiling,
            },
        )

    # --- forward passes -----------------------------------------------------

    def _inputs(self, batch: Dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        device = next(self.net.parameters()).device
        emb = _tensor(batch[Columns.OBS], torch.float32, device)
        w = _tensor(batch[W_COST], torch.float32, device).reshape(-1)
        mask = batch.get(MASK)
        return emb, w, None if mask is None else _tensor(mask, torch.bool, device)

    def _forward_train(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        logits, value = self.net(*self._inputs(batch))
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.VF_PREDS: value}

    def _forward_decide(self, batch: Dict[str, Any], explore: bool, generator: torch.Generator | None) -> Dict[str, Any]:
        with torch.no_grad():
            emb, w, mask = self._inputs(batch)
            logits, _ = self.net(emb, w, mask)
            decided: DecidedTensors = decide(logits, explore, self.bounds, generator, mask)
        return {
            Columns.ACTION_DIST_INPUTS: logits,
            Columns.ACTIONS: decided.actions,
            Columns.ACTION_PROB: decided.propensities,
            PROBS: decided.probabilities,
        }

    def _forward_inference(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        return self._forward_decide(batch, False, None)

    def _forward_exploration(self, batch: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        return self._forward_decide(batch, True, kwargs.get("generator"))

    # --- state: the BarpNetwork weights format ------------------------------

    def get_state(self, components=None, *, not_components=None, inference_only: bool = False, **kwargs) -> Dict[str, Any]:
        """BarpNetwork state dict as numpy arrays (same keys as BarpPolicy.state()['weights'])."""
        return {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}

    def set_state(self, state: Dict[str, Any]) -> None:
        self.net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
