"""What a routing policy is to the rest of the system, and the code every policy kind shares.

:class:`RoutingPolicy` is the one interface serving (``serve.core``), the
offline trainers, OPE and the learner program against. Two kinds implement
it: ``barp`` (:class:`banditroute.policy.barp.BarpPolicy`, one output per
model of a fixed pool) and ``identity``
(:class:`banditroute.policy.identity_policy.IdentityPolicy`, any pool of the
model registry); ``banditroute.policy.checkpoint.POLICY_KINDS`` maps the
``kind`` a checkpoint or weights snapshot records to its class.

:class:`PolicyBase` holds what the kinds share: the serving properties, the
one ``decide`` (``policy.decide.decide``), weights snapshots
(state/from_state/snapshot/load_weights) and checkpoints (save/load). A kind
supplies its meta dataclass, its network, ``logits`` and, where it carries
more than weights and meta (the identity policy's registry), the hooks
``_extra_state`` / ``_new_from_state`` / ``_save_extra`` / ``_new_from_checkpoint``.

Versions: a policy's ``policy_version`` is the version of the weights it
holds, read from what it loaded: the snapshot (``load_weights``; the
snapshot owns the version) or the checkpoint's meta.json. The learner that
trains the weights in place is the only other writer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from banditroute.core.config import from_dict, to_dict
from banditroute.core.records import NonFiniteWeightsError, WeightsSnapshot, non_finite_weights
from banditroute.policy.decide import DEFAULT_BOUNDS, Decisions, decide
from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.exploration import ExplorationBounds

CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "policy.pt"
META_FILE = "meta.json"
DEFAULT_KIND = "barp"
"""The kind of a checkpoint or state that records none (written before identity policies existed)."""


@runtime_checkable
class RoutingPolicy(Protocol):
    """A routing policy: scores the candidate models of a prompt under a cost preference."""

    kind: ClassVar[str]
    """Checkpoint kind ('barp', 'identity'); the key of ``policy.checkpoint.POLICY_KINDS``."""
    meta: Any
    """The kind's meta dataclass (written to meta.json)."""
    device: torch.device
    network: nn.Module

    @property
    def models(self) -> list[str]:
        """The routable pool now; logit k is models[k]."""
        ...

    @property
    def tau(self) -> float: ...

    @property
    def policy_version(self) -> int: ...

    @property
    def encoder(self) -> EncoderConfig:
        """The frozen encoder the policy was trained on."""
        ...

    @property
    def encoder_id(self) -> str: ...

    @property
    def embed_dim(self) -> int: ...

    def candidate_mask(self, candidates: Sequence[Sequence[str] | None] | None, batch: int) -> np.ndarray: ...

    def logits(self, embeddings: Any, w_cost: Any, mask: Any = None) -> torch.Tensor:
        """Masked logits (B, K) over ``models`` (-inf for non-candidates)."""
        ...

    def decide(
        self, embeddings: Any, w_cost: Any, mask: Any = None, explore: bool = False,
        generator: torch.Generator | None = None, bounds: ExplorationBounds = DEFAULT_BOUNDS,
    ) -> Decisions: ...

    def state(self) -> dict[str, Any]: ...

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "RoutingPolicy": ...

    @classmethod
    def from_snapshot(cls, snapshot: WeightsSnapshot, device: str | torch.device = "cpu") -> "RoutingPolicy": ...

    def snapshot(self, trained_through: float = 0.0, created_at: float | None = None) -> WeightsSnapshot: ...

    def load_weights(self, snapshot: WeightsSnapshot) -> None: ...

    def save(self, directory: str | os.PathLike) -> Path: ...

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> "RoutingPolicy": ...


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of the checkpoint in ``directory`` as a dict (FileNotFoundError / ValueError when it is not one)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists() or not (directory / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{directory}: not a policy checkpoint (needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a JSON object")
    return meta


def kind_of(meta: dict[str, Any]) -> str:
    """The kind a meta dict (meta.json or a state's meta) records."""
    return str(meta.get("kind", DEFAULT_KIND))


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _numpy_weights(network: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in network.state_dict().items()}


class PolicyBase:
    """Shared implementation of :class:`RoutingPolicy`; a kind sets ``kind``, ``meta_class`` and ``network``."""

    kind: ClassVar[str]
    meta_class: ClassVar[type]
    meta: Any
    device: torch.device
    network: nn.Module

    # --- what serving reads -------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return self.meta.models

    @property
    def tau(self) -> float:
        return self.meta.tau

    @property
    def policy_version(self) -> int:
        return self.meta.policy_version

    @property
    def encoder(self) -> EncoderConfig:
        return self.meta.encoder

    @property
    def encoder_id(self) -> str:
        return self.meta.encoder_id

    @property
    def embed_dim(self) -> int:
        return self.meta.embed_dim

    def candidate_mask(self, candidates: Sequence[Sequence[str] | None] | None, batch: int) -> np.ndarray:
        """Boolean (B, K) mask over the fixed pool from per-row lists of model names (None = every model);
        KeyError on an unknown name. A kind whose pool changes at run time (identity) overrides it."""
        mask = np.ones((batch, len(self.models)), dtype=bool)
        if candidates is None:
            return mask
        index = {m: k for k, m in enumerate(self.models)}
        for row, names in enumerate(candidates):
            if names is None:
                continue
            mask[row] = False
            for name in names:
                if name not in index:
                    raise KeyError(name)
                mask[row, index[name]] = True
        return mask

    def logits(self, embeddings: Any, w_cost: Any, mask: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def decide(
        self,
        embeddings: Any,
        w_cost: Any,
        mask: Any = None,
        explore: bool = False,
        generator: torch.Generator | None = None,
        bounds: ExplorationBounds = DEFAULT_BOUNDS,
    ) -> Decisions:
        """Route a batch: sample within ``bounds`` (explore) or argmax (greedy); one host copy at the end."""
        return Decisions.from_tensors(decide(self.logits(embeddings, w_cost, mask), explore, bounds, generator))

    # --- weights snapshots (learner -> parameter server -> replicas) -------------------

    def state(self) -> dict[str, Any]:
        """Picklable state: kind, numpy weights and meta (no torch tensors, no device)."""
        return {"kind": self.kind, "weights": _numpy_weights(self.network), "meta": to_dict(self.meta), **self._extra_state()}

    def snapshot(self, trained_through: float = 0.0, created_at: float | None = None) -> WeightsSnapshot:
        """These weights as a WeightsSnapshot of their version."""
        return WeightsSnapshot(
            policy_version=self.policy_version,
            state=self.state(),
            created_at=time.time() if created_at is None else float(created_at),
            trained_through=float(trained_through),
        )

    @classmethod
    def from_snapshot(cls, snapshot: WeightsSnapshot, device: str | torch.device = "cpu") -> "PolicyBase":
        """A policy holding ``snapshot``'s weights, serving its version."""
        state = snapshot.state
        if kind_of(state["meta"]) != cls.kind:
            raise ValueError(f"a {kind_of(state['meta'])!r} state, not {_a(cls.kind)} policy")
        policy = cls._new_from_state(from_dict(cls.meta_class, state["meta"]), state, device)
        policy.load_weights(snapshot)
        return policy

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "PolicyBase":
        """A policy from :meth:`state` (its version is the one its meta records)."""
        return cls.from_snapshot(WeightsSnapshot(int(state["meta"].get("policy_version", 0)), state), device)

    def load_weights(self, snapshot: WeightsSnapshot) -> None:
        """Swap in the snapshot's weights in place (same architecture) and serve its version.

        Non-finite weights are refused (NonFiniteWeightsError) and the current ones kept.
        """
        snapshot.check_finite()
        self._load_network_weights({k: torch.as_tensor(np.asarray(v)) for k, v in snapshot.state["weights"].items()})
        self.meta.policy_version = int(snapshot.policy_version)

    def _load_network_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(tensors)

    # --- checkpoints ----------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write ``directory/policy.pt`` and ``directory/meta.json`` (with policy_version), plus the kind's extras."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.meta.created_at = time.time()
        self._save_extra(directory, **kwargs)
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in self.network.state_dict().items()}, tmp)
        os.replace(tmp, directory / WEIGHTS_FILE)
        meta_tmp = directory / (META_FILE + ".tmp")
        meta_tmp.write_text(json.dumps(to_dict(self.meta), indent=2))
        os.replace(meta_tmp, directory / META_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", **options: Any) -> "PolicyBase":
        """Load the checkpoint in ``directory`` (its version from meta.json); ``options`` go to the kind's ``_new_from_checkpoint``."""
        directory = Path(directory)
        raw = read_meta(directory)
        if kind_of(raw) != cls.kind:
            raise ValueError(f"{directory}: a {kind_of(raw)!r} checkpoint, not {_a(cls.kind)} policy")
        meta = from_dict(cls.meta_class, raw)
        if meta.format != CHECKPOINT_FORMAT:
            raise ValueError(f"{directory}: checkpoint format {meta.format}, this version reads {CHECKPOINT_FORMAT}")
        weights = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        bad = non_finite_weights({k: v.float() for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point()})
        if bad:  # a cold start or --frozen serve from it would fail every routing batch
            raise NonFiniteWeightsError(f"{directory}: non-finite values in {bad[:5]}")
        policy = cls._new_from_checkpoint(meta, directory, device, **options)
        policy._load_network_weights(weights)
        return policy

    # --- what a kind adds ---------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        """State besides kind, weights and meta (picklable)."""
        return {}

    @classmethod
    def _new_from_state(cls, meta: Any, state: dict[str, Any], device: str | torch.device) -> "PolicyBase":
        """A policy of ``meta`` (weights not loaded yet) from the rest of :meth:`state`."""
        return cls(meta, device=device)  # type: ignore[call-arg]

    def _save_extra(self, directory: Path, **kwargs: Any) -> None:
        """Write what the checkpoint holds besides weights and meta."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.save: unexpected arguments {sorted(kwargs)}")

    @classmethod
    def _new_from_checkpoint(cls, meta: Any, directory: Path, device: str | torch.device, **options: Any) -> "PolicyBase":
        """A policy of ``meta`` (weights not loaded yet) from what the checkpoint holds besides weights and meta.

        Load options a kind has no use for are ignored: ``checkpoint.load_policy`` callers pass
        them without knowing the kind."""
        return cls(meta, device=device)  # type: ignore[call-arg]
