"""Load any policy checkpoint: dispatch on the ``kind`` recorded in its meta.json.

``barp`` (the default when a checkpoint predates the field) is
:class:`banditroute.policy.barp.RoutingPolicy`, a fixed pool with one
output per model; ``identity`` is
:class:`banditroute.policy.identity_policy.IdentityPolicy`, any pool from
the model registry. Both expose the same serving interface.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

META_FILE = "meta.json"


def _load_barp(directory: Path, device: str | torch.device, **_: Any):
    from banditroute.policy.barp import RoutingPolicy

    return RoutingPolicy.load(directory, device=device)


def _load_identity(directory: Path, device: str | torch.device, **kwargs: Any):
    from banditroute.policy.identity_policy import IdentityPolicy

    return IdentityPolicy.load(directory, device=device, **kwargs)


POLICY_KINDS: dict[str, Callable[..., Any]] = {"barp": _load_barp, "identity": _load_identity}
"""Checkpoint loaders by meta.json ``kind``."""


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The ``kind`` of the checkpoint in folder ``path`` ('barp' when not recorded)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path}: not a policy checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
    kind = meta.get("kind", "barp") if isinstance(meta, dict) else None
    if kind not in POLICY_KINDS:
        raise ValueError(f"{path}: unknown policy kind {kind!r}; known: {sorted(POLICY_KINDS)}")
    return kind


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any):
    """Load the checkpoint in folder ``path`` as the policy class its ``kind`` names.

    Extra keyword arguments go to the loader that takes them (e.g.
    ``registry_refresh_s`` for identity policies).
    """
    path = Path(os.path.expanduser(str(path)))
    return POLICY_KINDS[checkpoint_kind(path)](path, device, **kwargs)


def fetch_policy_folder(location: str, storage: Any, into: Path, field: str = "policy") -> Path:
    """A local folder holding the checkpoint at ``location`` (downloaded into ``into`` when it is a storage URI).

    A storage URI is read with ``storage``'s endpoint and credentials (a
    StorageConfig: same bucket, same access); errors name ``field``.
    """
    from banditroute.policy.barp import WEIGHTS_FILE
    from banditroute.core.storage import StorageConfig, open_storage

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


def load_barp_policy(location: str, storage: Any = None, field: str = "policy"):
    """The BaRP RoutingPolicy at ``location`` (folder or storage URI, read with ``storage``'s access); errors name ``field``."""
    from banditroute.policy.barp import RoutingPolicy

    with tempfile.TemporaryDirectory(prefix="banditroute-policy-") as tmp:
        folder = fetch_policy_folder(location, storage, Path(tmp), field)
        kind = checkpoint_kind(folder)
        if kind != "barp":
            raise ValueError(f"{field}: a BaRP policy is needed here; {location} is {kind!r}")
        return RoutingPolicy.load(folder)
