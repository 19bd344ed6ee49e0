"""A small untrained identity policy (hashing encoder, 2-d identities) for pool and scenario tests.

Untrained, its logits are the IRT plug-in router's (the reward-prior term), so
routing still follows identity and price; the item maps are random but fixed
by ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.identity_policy import IdentityMeta, IdentityNetworkConfig, IdentityPolicy
from banditroute.policy.irt import IrtConfig
from banditroute.policy.model_registry import ModelEntry, ModelRegistry

POOL = {  # name: (mu, price USD/call)
    "small": ([-1.0, -0.5], 0.0002),
    "medium": ([0.0, 0.3], 0.001),
    "large": ([1.5, 1.2], 0.006),
}


def tiny_identity_policy(seed: int = 0, pool: dict | None = None, n_observations: int = 1000) -> IdentityPolicy:
    """An IdentityPolicy over ``pool`` ({name: (mu, price)}) with a hashing encoder of width 64."""
    torch.manual_seed(seed)
    pool = POOL if pool is None else pool
    irt = IrtConfig(dim=2, steps=50, identity_steps=60)
    meta = IdentityMeta(models=list(pool), tau=0.005, embed_dim=64, identity_dim=2,
                        encoder=EncoderConfig(name="hashing", dim=64), encoder_id="",
                        network=IdentityNetworkConfig(hidden_dim=16, prompt_dim=8, preference_dim=4, attention_heads=2),
                        irt=irt)
    entries = [ModelEntry(name, price, list(mu), [0.3, 0.3], n_observations=n_observations)
               for name, (mu, price) in pool.items()]
    return IdentityPolicy(meta, ModelRegistry(2, entries))


def tiny_identity_checkpoint(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """:func:`tiny_identity_policy` saved as a checkpoint folder (registry.json beside the weights)."""
    folder = Path(folder)
    tiny_identity_policy(seed, **kwargs).save(folder)
    return folder


def quiz_rows(n: int = 12, seed: int = 0) -> list[dict]:
    """``n`` quiz answers ``{"prompt", "score"}`` (a model that gets ~70 % right)."""
    rng = np.random.default_rng(seed)
    return [{"prompt": f"quiz question {i}: what is {i} plus {i + 1}?", "score": float(rng.random() < 0.7)}
            for i in range(n)]
