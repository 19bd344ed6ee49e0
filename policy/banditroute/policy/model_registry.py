"""The pool of routable models: identity (IRT ability posterior) and live price per model.

The registry is what makes the identity policy work over ANY set of
models: the policy's weights are shared across models, and everything
model-specific lives here. Adding an entry makes a model routable at once;
changing a price changes routing at once; neither touches the weights.

Price. ``price`` is the model's expected USD cost of ONE call (answering one
request), the same unit as the ``<model>|total_cost`` columns of the routing
data. For a model fitted from logged data it defaults to the mean logged
cost per call; an operator onboarding a model sets it from the provider's
price list (e.g. per-token prices x typical prompt + answer length). The
policy sees it as min(price / tau, 1), the same normalisation as the
reward. It is a per-call estimate, not per-prompt: the policy does not
know a prompt's length in tokens.

Persistence. One JSON document, written through :mod:`banditroute.core.storage`
(local folder or S3), atomically: every change validates first and then
writes the whole document once, so a failed call leaves neither the memory
nor the stored copy half-changed. Another process's changes are picked up
with :meth:`ModelRegistry.refresh` (or automatically every
``auto_refresh_s`` seconds when the policy routes).

Document::

    {"format": 1, "dim": 4, "version": 7, "updated_at": 1.7e9,
     "models": [{"name": "gpt-4", "price": 0.005, "mu": [..], "sigma": [..],
                 "n_observations": 2218, "source": "irt", "added_at": 1.7e9,
                 "active": true}, ...]}
"""

from __future__ import annotations

import copy
import math
import os
import posixpath
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np

REGISTRY_FORMAT = 1
REGISTRY_FILE = "registry.json"


class RegistryError(ValueError):
    """A registry change or document is invalid (nothing was changed)."""


class UnknownModelError(KeyError, ValueError):
    """A model name that the registry does not hold (or holds retired)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "unknown model"


def validate_price(name: str, price: Any) -> float:
    """A price must be a finite number >= 0 (USD per call)."""
    if price is None:
        raise RegistryError(f"model {name!r}: missing price (USD per call)")
    if isinstance(price, bool):
        raise RegistryError(f"model {name!r}: price must be a number, got {price!r}")
    try:
        value = float(price)
    except (TypeError, ValueError):
        raise RegistryError(f"model {name!r}: price must be a number, got {price!r}") from None
    if not math.isfinite(value):
        raise RegistryError(f"model {name!r}: price must be finite, got {price!r}")
    if value < 0:
        raise RegistryError(f"model {name!r}: price must be >= 0 USD per call, got {value}")
    return value


def check_prices(prices: Mapping[str, Any], prefix: str = "prices") -> dict[str, float]:
    """A config's ``{model: USD per call}``: numbers only (no text), finite, >= 0; ValueError naming ``<prefix>.<model>``."""
    out: dict[str, float] = {}
    for name, price in prices.items():
        try:
            if isinstance(price, bool) or not isinstance(price, (int, float)):
                raise RegistryError("not a number")
            out[str(name)] = validate_price(str(name), price)
        except RegistryError:
            raise ValueError(f"{prefix}.{name}: must be a finite number >= 0 (USD per call), got {price!r}") from None
    return out


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"model name must be a non-empty string, got {name!r}")
    if name != name.strip():
        raise RegistryError(f"model name {name!r} has leading/trailing whitespace")
    if "|" in name:
        raise RegistryError(f"model name {name!r} must not contain '|' (reserved by the data layout)")
    return name


@dataclass
class ModelEntry:
    """One routable model."""

    name: str
    """Model name as the upstream knows it."""
    price: float
    """Expected USD cost of one call (>= 0); live configuration."""
    mu: list[float]
    """Posterior mean of the model's IRT ability (identity) vector."""
    sigma: list[float]
    """Posterior std of each ability coordinate (> 0)."""
    n_observations: int = 0
    """Scored outcomes the identity was fitted from (quiz size for onboarded models)."""
    source: str = "irt"
    """Where the identity came from: 'irt' (joint fit on logged data) or 'quiz' (onboarding)."""
    added_at: float = 0.0
    """Unix time the model was registered."""
    active: bool = True
    """Routable; retired models stay in the document but are not offered."""

    def check(self, dim: int) -> None:
        """Raise RegistryError unless every field is valid for identities of ``dim`` dimensions."""
        validate_name(self.name)
        self.price = validate_price(self.name, self.price)
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.shape != (dim,) or sigma.shape != (dim,):
            raise RegistryError(
                f"model {self.name!r}: identity must have {dim} dimensions, got mu {mu.shape} and sigma {sigma.shape}"
            )
        if not np.isfinite(mu).all():
            raise RegistryError(f"model {self.name!r}: identity mean must be finite")
        if not (np.isfinite(sigma).all() and (sigma > 0).all()):
            raise RegistryError(f"model {self.name!r}: identity std must be finite and > 0")
        if self.n_observations < 0:
            raise RegistryError(f"model {self.name!r}: n_observations must be >= 0")


@dataclass
class PoolView:
    """A consistent read of the registry: what one routing batch decides with."""

    version: int
    """Registry version the view was read at (recorded with the decisions it decided)."""
    names: list[str]
    """Model names (column order of the arrays)."""
    mu: np.ndarray
    """(K, dim) identity means."""
    sigma: np.ndarray
    """(K, dim) identity stds."""
    price: np.ndarray
    """(K,) USD per call."""
    n_observations: list[int]
    """Scored outcomes behind each identity (fresh-model rule)."""


def _storage_location(path: str | os.PathLike, storage_config=None):
    """(Storage, key) for a registry document path or URI (``s3://b/p/registry.json``)."""
    from banditroute.core.storage import StorageConfig, open_storage

    text = str(path)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        root, key = posixpath.split(text)
    elif parsed.scheme == "file":
        root, key = posixpath.split(text)
    else:
        p = Path(text).expanduser()
        root, key = str(p.parent.resolve()), p.name
    if not key:
        raise RegistryError(f"{path}: a registry path must name a file (e.g. .../{REGISTRY_FILE})")
    if storage_config is not None:
        cfg = copy.copy(storage_config)
        cfg.uri = root
        return open_storage(cfg), key
    return open_storage(StorageConfig(uri=root)), key


class ModelRegistry:
    """Thread-safe pool of models; persisted (optional) as one JSON document via Storage."""

    def __init__(
        self,
        dim: int,
        entries: Iterable[ModelEntry] = (),
        path: str | os.PathLike | None = None,
        storage_config=None,
        auto_refresh_s: float | None = None,
        version: int = 0,
    ):
        if dim < 1:
            raise RegistryError("registry dim must be >= 1")
        self.dim = int(dim)
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        for entry in entries:
            entry.check(self.dim)
            if entry.name in self._entries:
                raise RegistryError(f"model {entry.name!r} listed twice")
            self._entries[entry.name] = entry
        self.version = int(version)
        self.path = None if path is None else str(path)
        self._storage_config = storage_config
        self.auto_refresh_s = auto_refresh_s
        self._last_refresh = time.monotonic()
        self._stored_version: int | None = None

    # --- reading --------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        """Names of the routable (active) models, in registration order."""
        with self._lock:
            return [n for n, e in self._entries.items() if e.active]

    @property
    def all_models(self) -> list[str]:
        """Every registered name, retired ones included."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries and self._entries[name].active  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.models)

    def get(self, name: str) -> ModelEntry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.active:
                raise UnknownModelError(f"unknown model {name!r}; routable models: {self.models}")
            return copy.deepcopy(entry)

    def snapshot(self, names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(names, mu (K, dim), sigma (K, dim), price (K,)) read under ONE lock: a consistent view."""
        with self._lock:
            names = self.models if names is None else list(names)
            entries = []
            for n in names:
                e = self._entries.get(n)
                if e is None or not e.active:
                    raise UnknownModelError(f"unknown model {n!r}; routable models: {self.models}")
                entries.append(e)
            mu = np.array([e.mu for e in entries], dtype=np.float32).reshape(len(entries), self.dim)
            sigma = np.array([e.sigma for e in entries], dtype=np.float32).reshape(len(entries), self.dim)
            price = np.array([e.price for e in entries], dtype=np.float64)
            return names, mu, sigma, price

    def view(self, names: Sequence[str] | None = None) -> "PoolView":
        """:meth:`snapshot` plus the registry version and each model's n_observations, under ONE lock."""
        with self._lock:
            names, mu, sigma, price = self.snapshot(names)
            n_obs = [self._entries[n].n_observations for n in names]
            return PoolView(self.version, names, mu, sigma, price, n_obs)

    def prices(self) -> dict[str, float]:
        with self._lock:
            return {n: e.price for n, e in self._entries.items() if e.active}

    # --- changes (validate everything, then mutate, then persist) ----------------

    def add(
        self,
        name: str,
        price: float,
        mu: Sequence[float],
        sigma: Sequence[float],
        n_observations: int = 0,
        source: str = "quiz",
        replace: bool = False,
    ) -> ModelEntry:
        """Register a model (routable immediately). Existing names need ``replace=True``."""
        entry = ModelEntry(
            name=validate_name(name),
            price=validate_price(name, price),
            mu=[float(v) for v in np.asarray(mu, dtype=np.float64).ravel()],
            sigma=[float(v) for v in np.asarray(sigma, dtype=np.float64).ravel()],
            n_observations=int(n_observations),
            source=source,
            added_at=time.time(),
        )
        entry.check(self.dim)
        with self._lock:
            existing = self._entries.get(name)
            if existing is not None and existing.active and not replace:
                raise RegistryError(f"model {name!r} is already registered (use replace to overwrite its identity)")
            self._commit(lambda entries: entries.__setitem__(name, entry))
        return copy.deepcopy(entry)

    def set_price(self, name: str, price: float) -> None:
        """Change one model's price (USD per call); routing changes at the next decision."""
        self.set_prices({name: price})

    def set_prices(self, prices: Mapping[str, float]) -> None:
        """Change several prices at once: all or nothing."""
        with self._lock:
            checked = {}
            for name, price in prices.items():
                if name not in self._entries or not self._entries[name].active:
                    raise UnknownModelError(f"unknown model {name!r}; routable models: {self.models}")
                checked[name] = validate_price(name, price)

            def apply(entries: dict[str, ModelEntry]) -> None:
                for name, price in checked.items():
                    entries[name].price = price

            self._commit(apply)

    def apply_price_config(self, path: str | os.PathLike) -> dict[str, float]:
        """Set prices from a YAML/JSON file ``{prices: {model: usd_per_call}}`` (or a flat mapping)."""
        import yaml

        text = Path(path).expanduser().read_text()
        data = yaml.safe_load(text) or {}
        if isinstance(data, dict) and "prices" in data:
            data = data["prices"]
        if not isinstance(data, dict) or not data:
            raise RegistryError(f"{path}: expected a mapping 'prices: {{model: usd_per_call}}'")
        self.set_prices(data)
        return {str(k): float(v) for k, v in data.items()}

    def retire(self, name: str) -> None:
        """Stop routing to a model (kept in the document, re-add with replace=True)."""
        with self._lock:
            if name not in self:
                raise UnknownModelError(f"unknown model {name!r}; routable models: {self.models}")

            def apply(entries: dict[str, ModelEntry]) -> None:
                entries[name].active = False

            self._commit(apply)

    def update_identities(self, updates: Mapping[str, tuple[Sequence[float], Sequence[float], int, float]]) -> list[str]:
        """Refined identities ``{name: (mu, sigma, n_observations, added_at)}`` (the online identity learner).

        Re-reads the stored document first (an admin change made meanwhile is
        kept), then applies only to models still active whose ``added_at``
        is the one the refit started from: a model re-onboarded or retired
        meanwhile keeps what the operator gave it. Returns the names updated
        (one new version for all of them; none: nothing written).
        """
        checked: dict[str, ModelEntry] = {}
        for name, (mu, sigma, n_obs, _) in updates.items():
            probe = ModelEntry(name=name, price=0.0, mu=[float(v) for v in np.ravel(mu)],
                               sigma=[float(v) for v in np.ravel(sigma)], n_observations=int(n_obs))
            probe.check(self.dim)
            checked[name] = probe
        with self._lock:
            if self.path is not None:
                self.refresh()
            names = [n for n, (_, _, _, added_at) in updates.items()
                     if n in self._entries and self._entries[n].active and self._entries[n].added_at == added_at]
            if not names:
                return []

            def apply(entries: dict[str, ModelEntry]) -> None:
                for n in names:
                    entries[n].mu, entries[n].sigma = checked[n].mu, checked[n].sigma
                    entries[n].n_observations = checked[n].n_observations

            self._commit(apply)
            return names

    def _commit(self, change) -> None:
        """Apply ``change`` to a copy, persist it, then swap it in (all or nothing).

        A persisted registry first re-reads the stored document: several processes write it (the pool
        admin of each ingress replica, the online identity learner), and a change computed against an
        older document must land ON TOP of the newer one, not replace it (a slow onboarding quiz would
        otherwise undo identities written meanwhile, and a writer whose own copy has the same version
        number as another's write would never see that write)."""
        with self._lock:
            if self.path is not None:
                try:
                    self.refresh()
                except FileNotFoundError:
                    pass
            new_entries = copy.deepcopy(self._entries)
            change(new_entries)
            new_version = self.version + 1
            if self.path is not None:
                self._write(new_entries, new_version)
            self._entries = new_entries
            self.version = new_version

    # --- persistence --------------------------------------------------------------

    def to_dict(self, entries: Mapping[str, ModelEntry] | None = None, version: int | None = None) -> dict[str, Any]:
        with self._lock:
            entries = self._entries if entries is None else entries
            return {
                "format": REGISTRY_FORMAT,
                "dim": self.dim,
                "version": self.version if version is None else version,
                "updated_at": time.time(),
                "models": [asdict(e) for e in entries.values()],
            }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **kwargs: Any) -> "ModelRegistry":
        if not isinstance(data, Mapping) or "models" not in data or "dim" not in data:
            raise RegistryError("registry document must have 'dim' and 'models'")
        if int(data.get("format", REGISTRY_FORMAT)) != REGISTRY_FORMAT:
            raise RegistryError(f"registry format {data.get('format')}, this version reads {REGISTRY_FORMAT}")
        from banditroute.core.config import ConfigError, from_dict

        entries = []
        for i, raw in enumerate(data["models"]):
            try:
                entries.append(from_dict(ModelEntry, raw, prefix=f"models[{i}]"))
            except ConfigError as exc:
                raise RegistryError(str(exc)) from None
        return cls(int(data["dim"]), entries, version=int(data.get("version", 0)), **kwargs)

    def _write(self, entries: Mapping[str, ModelEntry], version: int) -> None:
        storage, key = _storage_location(self.path, self._storage_config)
        storage.write_json(key, self.to_dict(entries, version))
        self._stored_version = version

    def save(self, path: str | os.PathLike | None = None) -> str:
        """Write the document to ``path`` (and keep persisting there); returns the path."""
        with self._lock:
            if path is not None:
                self.path = str(path)
            if self.path is None:
                raise RegistryError("registry has no path to save to")
            self._write(self._entries, self.version)
            return self.path

    @classmethod
    def load(
        cls, path: str | os.PathLike, storage_config=None, auto_refresh_s: float | None = None
    ) -> "ModelRegistry":
        storage, key = _storage_location(path, storage_config)
        data = storage.read_json(key)
        reg = cls.from_dict(data, path=str(path), storage_config=storage_config, auto_refresh_s=auto_refresh_s)
        reg._stored_version = reg.version
        return reg

    def refresh(self) -> bool:
        """Re-read the stored document when another writer changed it; True if it changed."""
        if self.path is None:
            return False
        storage, key = _storage_location(self.path, self._storage_config)
        data = storage.read_json(key)
        fresh = type(self).from_dict(data)
        if fresh.dim != self.dim:
            raise RegistryError(f"{self.path}: stored registry has dim {fresh.dim}, this one {self.dim}")
        with self._lock:
            self._last_refresh = time.monotonic()
            if fresh.version == self.version:
                return False
            self._entries = fresh._entries
            self.version = fresh.version
            self._stored_version = fresh.version
            return True

    def maybe_refresh(self) -> bool:
        """:meth:`refresh` when ``auto_refresh_s`` has passed since the last one (never raises)."""
        if self.auto_refresh_s is None or self.path is None:
            return False
        if time.monotonic() - self._last_refresh < self.auto_refresh_s:
            return False
        try:
            return self.refresh()
        except Exception:  # a storage hiccup must not fail a routing decision; retry next time
            self._last_refresh = time.monotonic()
            return False

    def copy(self) -> "ModelRegistry":
        """A detached in-memory copy (no path)."""
        with self._lock:
            return ModelRegistry(self.dim, copy.deepcopy(list(self._entries.values())), version=self.version)
