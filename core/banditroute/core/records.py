"""The records that cross component boundaries, one definition each.

DecisionRecord: what a router replica decided (emitted for every request).
RewardRecord:   the outcome a client reports for one decision.
JoinedEvent:    a decision joined with its reward (what the learner trains on
                and what the durable event log holds).
WeightsSnapshot: a versioned set of policy weights (learner -> replicas); it
                owns the version (a policy takes its version from the snapshot
                it loaded).

Logged records have an Arrow schema so the event log is plain Parquet that
any tool can read. Decisions travel from the router to the log as ONE kind of
Arrow batch (DECISION_SCHEMA), built by ONE encoder: :func:`decisions_to_table`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import pyarrow as pa

JoinStatus = Literal["rewarded", "defaulted"]
RouteMode = Literal["explore", "greedy"]


def new_decision_id() -> str:
    return uuid.uuid4().hex


@dataclass
class DecisionRecord:
    """One routing decision, with everything the learner and OPE need."""

    decision_id: str
    """Unique id returned to the client; rewards refer to it."""
    time: float
    """Unix time of the decision."""
    embedding: list[float] | np.ndarray
    """Prompt embedding (so the learner never re-encodes prompts); a float32 array on the serving path."""
    w_cost: float
    """Preference on the simplex: weight of cost (w_quality = 1 - w_cost)."""
    candidates: list[str]
    """Models that were offered for this request."""
    chosen_model: str
    """The model the request was routed to."""
    probability: float
    """Probability with which chosen_model was picked (1.0 in greedy mode)."""
    policy_version: int
    """Version of the weights that decided."""
    mode: str = "explore"
    """'explore' (sampled) or 'greedy' (argmax)."""
    candidate_probabilities: list[float] = field(default_factory=list)
    """The policy's softmax over ``candidates`` (same order)."""
    encoder_id: str = ""
    """Which encoder produced ``embedding``."""
    prompt_sha256: str = ""
    """Hash of the prompt text (for audits and joins with upstream logs; the text is not kept)."""
    upstream_cost: float | None = None
    """Cost reported by the upstream when the router proxied the call (USD)."""
    served_model: str | None = None
    """Model that actually answered when it was not chosen_model (the upstream failed, the fallback answered); None = chosen_model.
    Its outcome says nothing about chosen_model, so the learner and OPE skip such events."""
    registry_version: int | None = None
    """Version of the model registry (pool, identities, prices) the decision was made with; None = a fixed-pool policy
    or a decision logged before the column existed."""
    override: str = ""
    """Who set chosen_model when the policy did not: '' (the policy decided), 'experiment' (a fixed-model arm),
    'shadow' (the request named the model). Then probability is 1 (the logging policy was that choice) and the
    policy's own choice is in router_model / router_probability."""
    router_model: str | None = None
    """The policy's own choice when an override served another model (shadow mode, fixed arms); None otherwise."""
    router_probability: float | None = None
    """Probability of router_model under the policy (explore mode: its sampling probability)."""
    experiment: str = ""
    """Experiment that enrolled this request ('' = none)."""
    arm: str = ""
    """Arm of ``experiment`` the request was assigned to."""
    tenant: str = ""
    """Tenant of the API key that sent the request ('' = no tenant)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RewardRecord:
    """The observed outcome of one decision."""

    decision_id: str
    """Decision this reward is for."""
    score: float
    """Quality score in [0, 1]."""
    cost: float | None = None
    """USD cost; None = use the upstream's reported cost (or 0)."""
    time: float = field(default_factory=time.time)
    """Unix time the reward was accepted."""


@dataclass
class JoinedEvent:
    """A decision and its reward: one row of the durable event log."""

    decision: DecisionRecord
    score: float
    """Quality score in [0, 1] (the default reward for 'defaulted')."""
    cost: float
    """USD cost used for the reward."""
    reward_time: float
    """When the reward was accepted (or the window closed, for 'defaulted')."""
    join_status: str = "rewarded"
    """'rewarded' or 'defaulted' (no reward within the window)."""

    def to_row(self) -> dict[str, Any]:
        row = self.decision.to_dict()
        row.update(score=self.score, cost=self.cost, reward_time=self.reward_time, join_status=self.join_status)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "JoinedEvent":
        decision = DecisionRecord(**_record_fields(row))
        return cls(decision, float(row["score"]), float(row["cost"]), float(row["reward_time"]), str(row["join_status"]))


DECISION_SCHEMA = pa.schema(
    [
        ("decision_id", pa.string()),
        ("time", pa.float64()),
        ("embedding", pa.list_(pa.float32())),
        ("w_cost", pa.float64()),
        ("candidates", pa.list_(pa.string())),
        ("chosen_model", pa.string()),
        ("probability", pa.float64()),
        ("policy_version", pa.int64()),
        ("mode", pa.string()),
        ("candidate_probabilities", pa.list_(pa.float64())),
        ("encoder_id", pa.string()),
        ("prompt_sha256", pa.string()),
        ("upstream_cost", pa.float64()),
        ("served_model", pa.string()),
        ("registry_version", pa.int64()),
        # Operations columns (issue 16); null in older logs, read back as their defaults (_record_fields).
        ("override", pa.string()),
        ("router_model", pa.string()),
        ("router_probability", pa.float64()),
        ("experiment", pa.string()),
        ("arm", pa.string()),
        ("tenant", pa.string()),
    ]
)

OPTIONAL_TEXT_COLUMNS = ("override", "experiment", "arm", "tenant")
"""Text columns added after the first logs: null in older parts, read back as ''."""

EVENT_SCHEMA = pa.schema(
    list(DECISION_SCHEMA)
    + [
        pa.field("score", pa.float64()),
        pa.field("cost", pa.float64()),
        pa.field("reward_time", pa.float64()),
        pa.field("join_status", pa.string()),
    ]
)


def _embedding_column(embeddings: Sequence[Any]) -> pa.Array:
    """list<float32> column from per-row vectors: one float32 buffer plus offsets (no per-value Python objects)."""
    rows = [np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate(rows) if rows else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float32()))


def decisions_to_table(records: Sequence[DecisionRecord]) -> pa.Table:
    """The Arrow batch (DECISION_SCHEMA) of ``records``: the one encoder of decisions, columnar.

    The router hands its sink this batch, the local decision log and the
    feedback service's log store it, and :func:`decisions_from_table` reads it back.
    """
    columns = {f.name: [getattr(r, f.name) for r in records] for f in DECISION_SCHEMA if f.name != "embedding"}
    arrays = {name: pa.array(values, DECISION_SCHEMA.field(name).type) for name, values in columns.items()}
    arrays["embedding"] = _embedding_column([r.embedding for r in records])
    return pa.Table.from_arrays([arrays[f.name] for f in DECISION_SCHEMA], schema=DECISION_SCHEMA)


def _record_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A decision row as DecisionRecord keyword arguments: columns it lacks (older logs) keep their defaults."""
    known = {f.name for f in fields(DecisionRecord)}
    out = {k: v for k, v in row.items() if k in known}
    for name in OPTIONAL_TEXT_COLUMNS:
        if out.get(name) is None:
            out[name] = ""
    return out


def decisions_from_table(table: pa.Table) -> list[DecisionRecord]:
    return [DecisionRecord(**_record_fields(row)) for row in table.to_pylist()]


def events_to_table(events: Sequence[JoinedEvent]) -> pa.Table:
    return pa.Table.from_pylist([e.to_row() for e in events], schema=EVENT_SCHEMA)


def events_from_table(table: pa.Table) -> list[JoinedEvent]:
    return [JoinedEvent.from_row(row) for row in table.to_pylist()]


@dataclass
class EventBatch:
    """Columnar view of joined events, what the learner and OPE consume."""

    embeddings: np.ndarray
    """(B, d) float32 prompt embeddings."""
    w_cost: np.ndarray
    """(B,) preference."""
    chosen_models: list[str]
    """Chosen model name per event."""
    propensities: np.ndarray
    """(B,) probability of the chosen model under the policy that decided."""
    scores: np.ndarray
    """(B,) observed quality."""
    costs: np.ndarray
    """(B,) observed USD cost."""
    candidates: list[list[str]]
    """Offered models per event."""
    policy_versions: np.ndarray
    """(B,) version that decided."""
    served_models: list[str | None] = field(default_factory=list)
    """Model that answered instead of the chosen one (upstream fallback), else None; [] = none recorded."""

    def fallback_served(self) -> np.ndarray:
        """(B,) True where another model than the chosen one answered: the reward is not the chosen model's."""
        if not self.served_models:
            return np.zeros(len(self.chosen_models), dtype=bool)
        return np.array([s is not None and s != c for s, c in zip(self.served_models, self.chosen_models)], dtype=bool)

    @classmethod
    def from_table(cls, table: pa.Table) -> "EventBatch":
        emb = table.column("embedding").combine_chunks()
        dim = len(emb[0]) if len(emb) else 0
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return cls(
            embeddings=flat.reshape(-1, dim) if dim else np.zeros((len(table), 0), np.float32),
            w_cost=table.column("w_cost").to_numpy().astype(np.float64),
            chosen_models=table.column("chosen_model").to_pylist(),
            propensities=table.column("probability").to_numpy().astype(np.float64),
            scores=table.column("score").to_numpy().astype(np.float64),
            costs=table.column("cost").to_numpy().astype(np.float64),
            candidates=table.column("candidates").to_pylist(),
            policy_versions=table.column("policy_version").to_numpy().astype(np.int64),
            served_models=table.column("served_model").to_pylist() if "served_model" in table.column_names else [],
        )

    @classmethod
    def from_events(cls, events: Sequence[JoinedEvent]) -> "EventBatch":
        return cls.from_table(events_to_table(events))

    def __len__(self) -> int:
        return len(self.chosen_models)


@dataclass
class WeightsSnapshot:
    """A versioned policy state, as the parameter server hands it to replicas.

    The snapshot owns the version: a policy that loads it (``load_weights``,
    ``policy.checkpoint.policy_from_snapshot``) serves ``policy_version``,
    whatever version the state's meta was written with.
    """

    policy_version: int
    """Monotonic version of these weights; replicas only ever move forward."""
    state: dict[str, Any]
    """``policy.state()``: kind, numpy weights + meta (models, tau, encoder)."""
    created_at: float = field(default_factory=time.time)
    """When the learner produced it (for freshness metrics)."""
    trained_through: float = 0.0
    """Newest reward_time among the events this version was trained on."""

    def check_finite(self) -> None:
        """Raise NonFiniteWeightsError naming the tensors that hold NaN or +-inf.

        Every path that makes weights current calls it (publish, pin, swap, cold
        start): non-finite weights make every routing batch fail, so they are
        refused and the previous weights stay in service.
        """
        bad = non_finite_weights(self.state.get("weights", {}))
        if bad:
            raise NonFiniteWeightsError(f"weights v{self.policy_version}: non-finite values in {bad[:5]}"
                                        + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


class NonFiniteWeightsError(ValueError):
    """Weights with NaN or infinite values: never made current."""


def non_finite_weights(weights: Any) -> list[str]:
    """Names of the tensors in ``weights`` (name -> array-like) that hold a NaN or an infinity."""
    return [name for name, value in weights.items() if not np.isfinite(np.asarray(value, dtype=np.float64)).all()]


class DecisionSink(Protocol):
    """Where replicas send their decisions (durably, before they are forgotten): one Arrow batch per call."""

    def emit_table(self, table: pa.Table) -> None:
        """Store ``table`` (DECISION_SCHEMA rows, see :func:`decisions_to_table`); durable when it returns, else raise."""
        ...

    def close(self) -> None: ...
