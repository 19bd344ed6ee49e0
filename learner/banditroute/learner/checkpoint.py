"""Versioned policy checkpoints in storage (local folder or S3), newest one recoverable.

Layout under the checkpoint root (``<storage>/checkpoints`` by default)::

    v000000000042/policy.pt        policy weights, any kind the learner trains (torch.save of the state dict)
    v000000000042/meta.json        the kind's meta (kind, models, tau, encoder, policy_version ...)
    v000000000042/optimizer.pt     optimizer state (optional; resuming keeps Adam's moments);
                                   tensors and plain values only, read with torch.load(weights_only=True)
    v000000000042/manifest.json    written LAST: a checkpoint without it is incomplete

The weights' version has one home, meta.json (what every policy loader
reads); the folder name is the index it is listed by, written from the same
number, and loading checks the two agree. (Manifests written before this
also repeat the version as ``policy_version``; it is ignored.)

The manifest says whether the checkpoint's weights were PROMOTED
(served to replicas; ``promoted``, absent = true for checkpoints written
before the promotion gate) and, for weights an operator pinned, the version
they were pinned from (``pinned_from``). A ``role: serving`` checkpoint holds
served weights only (no optimizer state). ``promotion.json`` at the root
holds the pin state, so a restarted learner keeps a pin.

Each file is written atomically by :mod:`banditroute.core.storage`; the manifest
is the commit point of the whole checkpoint, so a crash mid-checkpoint
leaves an incomplete folder that readers skip. ``policy.pt`` + ``meta.json``
is exactly what ``policy.checkpoint.load_policy`` reads (by the ``kind`` in meta.json), so any checkpoint folder
(downloaded from S3 or local) is also a policy checkpoint for `banditroute
serve --policy` and `banditroute ope --policy`.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from banditroute.policy.base import META_FILE, WEIGHTS_FILE, RoutingPolicy
from banditroute.policy.checkpoint import load_policy
from banditroute.core.storage import Storage

MANIFEST_FILE = "manifest.json"
PROMOTION_STATE_FILE = "promotion.json"
LEARNER_STATE_FILE = "optimizer.pt"
LEGACY_PICKLE_STATE_FILE = "learner.pkl"
"""Optimizer state of checkpoints written before optimizer.pt: a pickle, never read (unpickling data from a
bucket runs whatever code it holds); such a checkpoint resumes with a fresh optimizer."""
DEFAULT_CHECKPOINT_PREFIX = "checkpoints"
logger = logging.getLogger(__name__)
_DIR_RE = re.compile(r"^v(\d{12})$")


def checkpoint_dir(version: int) -> str:
    return f"v{int(version):012d}"


def list_checkpoints(storage: Storage) -> list[int]:
    """Versions of the COMPLETE checkpoints under ``storage`` (ascending)."""
    versions = []
    for key in storage.list():
        parts = key.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_FILE:
            m = _DIR_RE.match(parts[0])
            if m:
                versions.append(int(m.group(1)))
    return sorted(versions)


def save_checkpoint(
    storage: Storage,
    policy: RoutingPolicy,
    learner_state: bytes | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
    protect: Sequence[int] = (),
) -> str:
    """Write the policy (and optimizer state) as checkpoint ``v<version>``; returns its URI."""
    version = policy.policy_version
    folder = checkpoint_dir(version)
    with tempfile.TemporaryDirectory(prefix="banditroute-ckpt-") as tmp:
        policy.save(tmp)
        for name in (WEIGHTS_FILE, META_FILE):
            storage.write_bytes(f"{folder}/{name}", (Path(tmp) / name).read_bytes())
    files = [WEIGHTS_FILE, META_FILE]
    if learner_state is not None:
        storage.write_bytes(f"{folder}/{LEARNER_STATE_FILE}", learner_state)
        files.append(LEARNER_STATE_FILE)
    manifest = {"created_at": time.time(), "files": files, **(extra or {})}
    storage.write_json(f"{folder}/{MANIFEST_FILE}", manifest)
    if keep is not None and keep > 0:
        prune_checkpoints(storage, keep, protect)
    return storage.uri_for(folder)


def prune_checkpoints(storage: Storage, keep: int, protect: Sequence[int] = ()) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints (and incomplete older folders).

    Versions in ``protect`` (e.g. the weights replicas serve) are kept too.
    """
    complete = list_checkpoints(storage)
    if len(complete) <= keep:
        return []
    cutoff = complete[-keep]
    keep_also = {int(v) for v in protect}
    removed = []
    for key in storage.list():
        m = _DIR_RE.match(key.split("/")[0])
        if m and int(m.group(1)) < cutoff and int(m.group(1)) not in keep_also:
            storage.delete(key, missing_ok=True)
            removed.append(int(m.group(1)))
    return sorted(set(removed))


def read_manifest(storage: Storage, version: int) -> dict[str, Any]:
    return storage.read_json(f"{checkpoint_dir(version)}/{MANIFEST_FILE}")


def newest_promoted_checkpoint(storage: Storage) -> int | None:
    """Version of the newest complete checkpoint whose weights were served (None if none)."""
    for version in reversed(list_checkpoints(storage)):
        try:
            if read_manifest(storage, version).get("promoted", True):
                return version
        except FileNotFoundError:  # pruned meanwhile
            continue
    return None


def read_promotion_state(storage: Storage) -> dict[str, Any]:
    """The persisted pin state ({} when none was written)."""
    try:
        return storage.read_json(PROMOTION_STATE_FILE)
    except FileNotFoundError:
        return {}


def write_promotion_state(storage: Storage, state: dict[str, Any]) -> None:
    storage.write_json(PROMOTION_STATE_FILE, state)


def load_checkpoint(storage: Storage, version: int, device: str = "cpu") -> tuple[RoutingPolicy, bytes | None, dict[str, Any]]:
    """(policy, optimizer state bytes or None, manifest) of checkpoint ``version``.

    The policy serves the version its meta.json records; ValueError when that
    is not ``version`` (a folder holding other weights than its name says).
    """
    folder = checkpoint_dir(version)
    manifest = storage.read_json(f"{folder}/{MANIFEST_FILE}")
    with tempfile.TemporaryDirectory(prefix="banditroute-ckpt-") as tmp:
        for name in (WEIGHTS_FILE, META_FILE):
            (Path(tmp) / name).write_bytes(storage.read_bytes(f"{folder}/{name}"))
        policy = load_policy(tmp, device=device)
    if policy.policy_version != int(version):
        raise ValueError(f"{storage.uri_for(folder)}: meta.json holds v{policy.policy_version}, not v{int(version)}")
    learner_state = None
    files = manifest.get("files", [])
    if LEARNER_STATE_FILE in files:
        learner_state = storage.read_bytes(f"{folder}/{LEARNER_STATE_FILE}")
    elif LEGACY_PICKLE_STATE_FILE in files:
        logger.warning("%s: optimizer state is a legacy pickle (%s), not loaded; the optimizer starts fresh",
                       storage.uri_for(folder), LEGACY_PICKLE_STATE_FILE)
    return policy, learner_state, manifest


def load_latest_checkpoint(
    storage: Storage, device: str = "cpu", promoted_only: bool = False
) -> tuple[RoutingPolicy, bytes | None, dict[str, Any]] | None:
    """The newest complete checkpoint (``promoted_only``: the newest whose weights were served), or None."""
    if promoted_only:
        version = newest_promoted_checkpoint(storage)
        return None if version is None else load_checkpoint(storage, version, device=device)
    versions = list_checkpoints(storage)
    if not versions:
        return None
    return load_checkpoint(storage, versions[-1], device=device)
