"""Policies by kind: the registry that checkpoint loading and weights snapshots go through.

Every checkpoint's meta.json, every ``policy.state()`` and so every
WeightsSnapshot records the policy's ``kind``; :data:`POLICY_KINDS` maps it
to the class (``barp`` when a checkpoint predates the field):

* ``barp``: :class:`banditroute.policy.barp.BarpPolicy`, a fixed pool with one output per model;
* ``identity``: :class:`banditroute.policy.identity_policy.IdentityPolicy`, any pool from the model registry;
* ``value``: :class:`banditroute.policy.value_policy.ValuePolicy`, a fixed pool, per-model predicted score and cost
  with Thompson exploration over bootstrap heads.

All implement :class:`banditroute.policy.base.RoutingPolicy`.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from banditroute.core.records import WeightsSnapshot
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.policy.barp import BarpPolicy
from banditroute.policy.base import META_FILE, WEIGHTS_FILE, RoutingPolicy, kind_of, read_meta
from banditroute.policy.identity_policy import IdentityPolicy
from banditroute.policy.value_policy import ValuePolicy

POLICY_KINDS: dict[str, type[RoutingPolicy]] = {
    BarpPolicy.kind: BarpPolicy, IdentityPolicy.kind: IdentityPolicy, ValuePolicy.kind: ValuePolicy,
}
"""Policy classes by the ``kind`` their checkpoints and states record."""


def policy_class(kind: str, where: str = "policy") -> type[RoutingPolicy]:
    """The class registered for ``kind`` (ValueError naming ``where`` otherwise)."""
    try:
        return POLICY_KINDS[kind]
    except KeyError:
        raise ValueError(f"{where}: unknown policy kind {kind!r}; known: {sorted(POLICY_KINDS)}") from None


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The ``kind`` of the checkpoint in folder ``path`` ('barp' when not recorded)."""
    kind = kind_of(read_meta(path))
    policy_class(kind, str(path))
    return kind


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> RoutingPolicy:
    """Load the checkpoint in folder ``path`` as the policy class its ``kind`` names.

    Extra keyword arguments go to that class's ``load`` (e.g.
    ``registry_refresh_s`` for identity policies; a kind ignores options it has no use for).
    """
    path = Path(os.path.expanduser(str(path)))
    return policy_class(checkpoint_kind(path), str(path)).load(path, device=device, **kwargs)


def policy_from_snapshot(snapshot: WeightsSnapshot, device: str | torch.device = "cpu") -> RoutingPolicy:
    """The policy a weights snapshot holds (any kind), serving the snapshot's version."""
    return policy_class(kind_of(snapshot.state["meta"]), "weights snapshot").from_snapshot(snapshot, device=device)


def policy_from_state(state: dict[str, Any], device: str | torch.device = "cpu") -> RoutingPolicy:
    """The policy of ``state()`` of any kind (its version: the one the state's meta records)."""
    return policy_class(kind_of(state["meta"]), "policy state").from_state(state, device=device)


def fetch_policy_folder(location: str, storage: Any, into: Path, field: str = "policy") -> Path:
    """A local folder holding the checkpoint at ``location`` (downloaded into ``into`` when it is a storage URI).

    A storage URI is read with ``storage``'s endpoint and credentials (a
    StorageConfig: same bucket, same access); errors name ``field``.
    """
    local = location[len("file://"):] if location.startswith("file://") else location
    if "://" not in local:
        path = Path(local).expanduser()
        if not (path / META_FILE).exists():
            raise ValueError(f"{field}: {location} is not a policy checkpoint folder (no {META_FILE})")
        return path
    cfg = copy.copy(storage) if storage is not None else StorageConfig()
    cfg.uri = location.rstrip("/")
    source = open_storage(cfg)
    for name in (WEIGHTS_FILE, META_FILE):
        (into / name).write_bytes(source.read_bytes(name))
    return into


def load_policy_at(location: str, storage: Any = None, field: str = "policy",
                   kinds: tuple[str, ...] | None = None) -> RoutingPolicy:
    """The policy at ``location`` (folder or storage URI, read with ``storage``'s access), of any registered kind.

    ``kinds`` restricts the kinds accepted here (e.g. those the online learner
    trains); errors name ``field``.
    """
    with tempfile.TemporaryDirectory(prefix="banditroute-policy-") as tmp:
        folder = fetch_policy_folder(location, storage, Path(tmp), field)
        kind = checkpoint_kind(folder)
        if kinds is not None and kind not in kinds:
            wanted = " or ".join(repr(k) for k in kinds)
            raise ValueError(f"{field}: a policy of kind {wanted} is needed here; {location} is {kind!r}")
        return policy_class(kind, field).load(folder)


def load_barp_policy(location: str, storage: Any = None, field: str = "policy") -> BarpPolicy:
    """The BaRP policy at ``location`` (folder or storage URI, read with ``storage``'s access); errors name ``field``."""
    with tempfile.TemporaryDirectory(prefix="banditroute-policy-") as tmp:
        folder = fetch_policy_folder(location, storage, Path(tmp), field)
        kind = checkpoint_kind(folder)
        if kind != BarpPolicy.kind:
            raise ValueError(f"{field}: a BaRP policy is needed here; {location} is {kind!r}")
        return BarpPolicy.load(folder)
