"""RouterCore: batched prompt encoding + policy decisions, without Ray.

The Serve ``Router`` deployment wraps one RouterCore per replica; the raw
benchmark drives it directly. Per batch it does exactly:

1. ONE tokenizer call (host; pinned memory when the encoder is on CUDA) on
   texts clipped to what the encoder's token window can see (``tokenize``),
2. ONE encoder forward (fp16 on GPU) that leaves the embeddings on the device,
3. ONE host->device copy of the per-row inputs (w_cost, explore flag, candidate mask),
4. ONE policy forward; explore rows are sampled and greedy rows argmaxed
   from the same softmax,
5. ONE device->host copy of (action, propensity, probabilities, embedding).

No per-request ``.cpu()``/``.item()``: a GPU replica is never launch- or
sync-bound by the number of requests in the batch.

Weights are swapped by replacing the policy REFERENCE under a lock; a batch
reads the reference once, so every row of a batch is decided by one version
and a swap lands between batches.

This module must not import Ray (the raw benchmark runs where Ray is absent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from banditroute.policy.barp import RoutingPolicy
from banditroute.policy.encoders import EncoderConfig, make_encoder, resolve_device
from banditroute.policy.exploration import (
    DEFAULT_EXPLORATION_CEILING,
    DEFAULT_EXPLORATION_FLOOR,
    bound_probabilities,
    check_bounds,
)
from banditroute.core.records import DECISION_SCHEMA, DecisionRecord, WeightsSnapshot, new_decision_id

ROUTE_MODES = ("explore", "greedy")
CLIP_CHARS_PER_TOKEN = 6
"""Texts longer than max_tokens * this are clipped before tokenizing (BERT WordPiece: ~4.2 chars/token on RouterBench, p99 4.4)."""
_WHITESPACE = re.compile(r"\s")


@dataclass
class RouteRequest:
    """One routing question: what to embed, the preference, the allowed models, the mode."""

    text: str
    """Text to embed (the prompt, or the chat messages' contents joined)."""
    w_cost: float
    """Preference on the simplex (weight of cost)."""
    candidates: list[str] | None = None
    """Allowed models (None = the whole pool)."""
    mode: str = "explore"
    """'explore' (sample, propensity logged) or 'greedy' (argmax, propensity 1)."""
    log: bool = True
    """Serving only: log the decision when it is made (False: the caller logs it later, e.g. with the upstream cost)."""


@dataclass
class RouteResult:
    """The outcome of one RouteRequest: a decision, or an error naming the field."""

    decision_id: str = ""
    model: str = ""
    """Chosen model."""
    probability: float = 0.0
    """Probability with which ``model`` was picked in this mode (1.0 when greedy)."""
    probabilities: dict[str, float] = field(default_factory=dict)
    """The policy's softmax over the candidates (sums to 1)."""
    policy_version: int = -1
    mode: str = "explore"
    w_cost: float = 0.0
    candidates: list[str] = field(default_factory=list)
    time: float = 0.0
    embedding: np.ndarray | None = field(default=None, repr=False)
    """(d,) float32 prompt embedding."""
    prompt_sha256: str = ""
    encoder_id: str = ""
    error: dict[str, Any] | None = None
    """{'status': 4xx/5xx, 'field': str, 'message': str} when the request could not be routed."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def response(self) -> dict[str, Any]:
        """The /v1/route answer (the contract's keys, plus mode and w_cost)."""
        return {
            "decision_id": self.decision_id,
            "model": self.model,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "policy_version": self.policy_version,
            "mode": self.mode,
            "w_cost": self.w_cost,
        }

    def record(self, upstream_cost: float | None = None, served_model: str | None = None) -> DecisionRecord:
        """The DecisionRecord the learner needs (embedding inline)."""
        emb = [] if self.embedding is None else self.embedding.astype(np.float32).tolist()
        return DecisionRecord(
            decision_id=self.decision_id,
            time=self.time,
            embedding=emb,
            w_cost=float(self.w_cost),
            candidates=list(self.candidates),
            chosen_model=self.model,
            probability=float(self.probability),
            policy_version=int(self.policy_version),
            mode=self.mode,
            candidate_probabilities=[float(self.probabilities[m]) for m in self.candidates],
            encoder_id=self.encoder_id,
            prompt_sha256=self.prompt_sha256,
            upstream_cost=upstream_cost,
            served_model=served_model,
        )


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def as_route_request(item: Any) -> RouteRequest:
    """Accept RouteRequest or a (text, w_cost, candidates, mode) tuple."""
    if isinstance(item, RouteRequest):
        return item
    if isinstance(item, dict):
        return RouteRequest(**item)
    text, w_cost, *rest = item
    candidates = rest[0] if len(rest) > 0 else None
    mode = rest[1] if len(rest) > 1 else "explore"
    return RouteRequest(text=text, w_cost=float(w_cost), candidates=None if candidates is None else list(candidates), mode=mode)


def decisions_table(
    results: Sequence[RouteResult],
    upstream_costs: Sequence[float | None] | None = None,
    served_models: Sequence[str | None] | None = None,
) -> pa.Table:
    """Arrow table (records.DECISION_SCHEMA) of successful results, built columnar (no per-row dicts)."""
    rows = [r for r in results if r.ok]
    n = len(rows)
    dim = rows[0].embedding.shape[0] if n and rows[0].embedding is not None else 0
    if n and dim:
        flat = np.concatenate([r.embedding.astype(np.float32, copy=False) for r in rows])
    else:
        flat = np.zeros(0, np.float32)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim, pa.int32())
    emb = pa.ListArray.from_arrays(offsets, pa.array(flat, pa.float32()))
    cols = {
        "decision_id": pa.array([r.decision_id for r in rows], pa.string()),
        "time": pa.array([r.time for r in rows], pa.float64()),
        "embedding": emb,
        "w_cost": pa.array([r.w_cost for r in rows], pa.float64()),
        "candidates": pa.array([r.candidates for r in rows], pa.list_(pa.string())),
        "chosen_model": pa.array([r.model for r in rows], pa.string()),
        "probability": pa.array([r.probability for r in rows], pa.float64()),
        "policy_version": pa.array([r.policy_version for r in rows], pa.int64()),
        "mode": pa.array([r.mode for r in rows], pa.string()),
        "candidate_probabilities": pa.array(
            [[r.probabilities[m] for m in r.candidates] for r in rows], pa.list_(pa.float64())
        ),
        "encoder_id": pa.array([r.encoder_id for r in rows], pa.string()),
        "prompt_sha256": pa.array([r.prompt_sha256 for r in rows], pa.string()),
        "upstream_cost": pa.array(
            list(upstream_costs) if upstream_costs is not None else [None] * n, pa.float64()
        ),
        "served_model": pa.array(list(served_models) if served_models is not None else [None] * n, pa.string()),
    }
    return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in DECISION_SCHEMA], schema=DECISION_SCHEMA)


def policy_from_state(state: dict[str, Any], device: Any = "cpu"):
    """A policy from ``state()`` of any kind ('barp' unless the state says otherwise)."""
    kind = state.get("kind") or state.get("meta", {}).get("kind", "barp")
    if kind == "identity":
        from banditroute.policy.identity_policy import IdentityPolicy

        return IdentityPolicy.from_state(state, device=device)
    if kind != "barp":
        raise ValueError(f"unknown policy kind {kind!r} in weights snapshot")
    return RoutingPolicy.from_state(state, device=device)


class RouterCore:
    """An encoder + a routing policy on one device, deciding batches of requests.

    The policy is any checkpoint kind with the serving interface of
    ``policy.barp.RoutingPolicy`` (``models``, ``logits(emb, w_cost, mask)``,
    ``meta.encoder``/``encoder_id``/``embed_dim``, ``state``/``from_state``):
    'barp' and 'identity' (``policy.checkpoint.load_policy`` dispatches on the kind).
    The pool (``models``) is read once per batch, since an identity policy's is live.
    """

    def __init__(
        self,
        policy: RoutingPolicy,
        encoder: Any | None = None,
        *,
        seed: int | None = None,
        torch_threads: int = 0,
        exploration_floor: float = DEFAULT_EXPLORATION_FLOOR,
        exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING,
    ):
        check_bounds(exploration_floor, exploration_ceiling)
        self.exploration_floor = float(exploration_floor)
        self.exploration_ceiling = float(exploration_ceiling)
        if torch_threads > 0:
            torch.set_num_threads(int(torch_threads))
        self.device = policy.device
        if encoder is None:
            enc_cfg = dataclasses.replace(policy.meta.encoder, device=str(self.device))
            encoder = make_encoder(enc_cfg)
        self.encoder = encoder
        self.encoder_id = str(encoder.encoder_id)
        self._check_compatible(policy.meta.encoder_id, policy.meta.embed_dim, "the checkpoint")
        if hasattr(policy, "network"):
            policy.network.eval()
        self._lock = threading.Lock()
        self._policy = policy
        self._generator: torch.Generator | None = None
        if seed is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._pin = self.device.type == "cuda"
        self._has_tokens = hasattr(encoder, "tokenize") and hasattr(encoder, "embed_tokens")
        self.clip_fallbacks = 0
        """Batches re-tokenized unclipped because a clipped row did not fill the token window."""

    # --- construction ------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        device: str = "auto",
        seed: int | None = None,
        torch_threads: int = 0,
        encoder_overrides: dict[str, Any] | None = None,
        exploration_floor: float = DEFAULT_EXPLORATION_FLOOR,
        exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING,
    ) -> "RouterCore":
        """Load a policy checkpoint and build the encoder it was trained with, on ``device``."""
        dev = resolve_device(device)
        from banditroute.policy.checkpoint import load_policy

        policy = load_policy(path, device=dev)
        return cls(policy, cls._make_encoder(policy, dev, encoder_overrides), seed=seed, torch_threads=torch_threads,
                   exploration_floor=exploration_floor, exploration_ceiling=exploration_ceiling)

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        *,
        device: str = "auto",
        seed: int | None = None,
        torch_threads: int = 0,
        encoder_overrides: dict[str, Any] | None = None,
        policy_version: int | None = None,
        exploration_floor: float = DEFAULT_EXPLORATION_FLOOR,
        exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING,
    ) -> "RouterCore":
        """From ``RoutingPolicy.state()`` (e.g. a parameter server's WeightsSnapshot.state)."""
        dev = resolve_device(device)
        policy = policy_from_state(state, device=dev)
        if policy_version is not None:
            policy.meta.policy_version = int(policy_version)
        return cls(policy, cls._make_encoder(policy, dev, encoder_overrides), seed=seed, torch_threads=torch_threads,
                   exploration_floor=exploration_floor, exploration_ceiling=exploration_ceiling)

    @staticmethod
    def _make_encoder(policy: RoutingPolicy, device: str, overrides: dict[str, Any] | None):
        cfg: EncoderConfig = dataclasses.replace(policy.meta.encoder, device=device, **(overrides or {}))
        return make_encoder(cfg)

    def _check_compatible(self, encoder_id: str, embed_dim: int, what: str) -> None:
        if encoder_id and encoder_id != self.encoder_id:
            raise ValueError(
                f"encoder mismatch: {what} was trained on encoder_id {encoder_id!r} but the serving encoder "
                f"is {self.encoder_id!r}; serve it with the same encoder settings (name, max_tokens, model_path)"
            )
        if int(embed_dim) != int(self.encoder.dim):
            raise ValueError(f"embedding size mismatch: {what} expects {embed_dim}, the encoder gives {self.encoder.dim}")

    # --- state ---------------------------------------------------------------

    @property
    def policy(self) -> RoutingPolicy:
        with self._lock:
            return self._policy

    @property
    def policy_version(self) -> int:
        return self.policy.policy_version

    @property
    def models(self) -> list[str]:
        return list(self.policy.models)

    def swap_weights(self, snapshot: WeightsSnapshot) -> int:
        """Install a newer snapshot atomically (between batches); returns the version now served.

        Older or equal versions are ignored. A snapshot for another encoder or
        embedding size raises ValueError and changes nothing.
        """
        current = self.policy
        if snapshot.policy_version <= current.policy_version:
            return current.policy_version
        meta = snapshot.state["meta"]
        self._check_compatible(meta.get("encoder_id", ""), meta["embed_dim"], f"snapshot v{snapshot.policy_version}")
        fresh = policy_from_state(snapshot.state, device=self.device)
        fresh.meta.policy_version = int(snapshot.policy_version)
        if hasattr(fresh, "network"):
            fresh.network.eval()
        with self._lock:
            self._policy = fresh
        return fresh.policy_version

    # --- inference -------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]):
        """The encoder's tokenizer on ``texts``, with long texts clipped first (same token ids).

        The encoder keeps the last ``max_tokens`` tokens (left truncation), but a
        tokenizer call still pays for the whole text, and on a GPU replica the
        host tokenizer, not the GPU, bounds throughput. So a text longer than
        ``max_tokens * CLIP_CHARS_PER_TOKEN`` characters is cut to its tail,
        starting at a whitespace (a word boundary for BERT-style tokenizers, so
        the tail's tokens are exactly the full text's last tokens). If a
        clipped row does not fill the token window (a tail of unusually long
        tokens), the whole batch is re-tokenized unclipped: exact ids first.
        """
        max_tokens = getattr(self.encoder, "max_tokens", None)
        tokenizer = getattr(self.encoder, "tokenizer", None)
        if not max_tokens or getattr(tokenizer, "truncation_side", "right") != "left":
            return self.encoder.tokenize(texts)
        limit = int(max_tokens) * CLIP_CHARS_PER_TOKEN
        clipped, rows = list(texts), []
        for i, text in enumerate(texts):
            if len(text) > limit:
                tail = text[-limit:]
                match = _WHITESPACE.search(tail)
                if match is not None and match.end() < len(tail) // 2:
                    clipped[i] = tail[match.end():]
                    rows.append(i)
        batch = self.encoder.tokenize(clipped)
        if rows and bool((batch["attention_mask"][rows].sum(dim=1) < max_tokens).any()):
            self.clip_fallbacks += 1
            batch = self.encoder.tokenize(list(texts))
        return batch

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, d) float32 embeddings on the device: one tokenizer call, one forward."""
        if self._has_tokens:
            return self.encoder.embed_tokens(self.tokenize(texts))
        vecs = torch.from_numpy(np.ascontiguousarray(self.encoder.encode(list(texts)), dtype=np.float32))
        return vecs.to(self.device)

    def route_batch(self, items: Sequence[Any]) -> list[RouteResult]:
        """Decide a batch: items are RouteRequest or (text, w_cost, candidates|None, mode) tuples.

        Rows that cannot be routed (unknown candidate, bad mode) get a result
        with ``error`` set; the others are decided in one forward.
        """
        reqs = [as_route_request(x) for x in items]
        now = time.time()
        with self._lock:
            policy = self._policy
        models = list(policy.models)  # read once: the batch's pool
        index = {m: k for k, m in enumerate(models)}
        n_models = len(models)
        results: list[RouteResult | None] = [None] * len(reqs)
        host = np.zeros((len(reqs), 2 + n_models), dtype=np.float32)  # [w_cost, explore, mask...]
        valid: list[int] = []
        cand_lists: list[list[str]] = []
        for i, req in enumerate(reqs):
            err = None
            if req.mode not in ROUTE_MODES:
                err = {"status": 422, "field": "mode", "message": f"mode must be one of {list(ROUTE_MODES)}, got {req.mode!r}"}
            elif req.candidates is not None and len(req.candidates) == 0:
                err = {"status": 422, "field": "candidates", "message": "candidates must not be empty"}
            elif req.candidates is not None and any(c not in index for c in req.candidates):
                bad = next(c for c in req.candidates if c not in index)
                err = {"status": 422, "field": "candidates", "message": f"candidates: unknown model {bad!r}; known: {list(models)}"}
            elif not isinstance(req.text, str) or not req.text:
                err = {"status": 422, "field": "prompt", "message": "prompt must be a non-empty string"}
            if err is not None:
                results[i] = RouteResult(error=err, mode=str(req.mode), policy_version=policy.policy_version)
                continue
            host[i, 0] = req.w_cost
            host[i, 1] = 1.0 if req.mode == "explore" else 0.0
            if req.candidates is None:
                host[i, 2:] = 1.0
                cand_lists.append(list(models))
            else:
                cands = list(dict.fromkeys(req.candidates))
                host[i, [2 + index[c] for c in cands]] = 1.0
                cand_lists.append(cands)
            valid.append(i)
        if not valid:
            return results  # type: ignore[return-value]

        texts = [reqs[i].text for i in valid]
        out = self._forward(policy, texts, host[valid] if len(valid) != len(reqs) else host)
        dim = out.shape[1] - 2 - n_models
        version = policy.policy_version
        for row, i in enumerate(valid):
            req = reqs[i]
            cands = cand_lists[row]
            probs = out[row, 2 : 2 + n_models]
            k = int(out[row, 0])
            results[i] = RouteResult(
                decision_id=new_decision_id(),
                model=models[k],
                probability=float(out[row, 1]),
                probabilities={m: float(probs[index[m]]) for m in cands},
                policy_version=version,
                mode=req.mode,
                w_cost=float(req.w_cost),
                candidates=cands,
                time=now,
                embedding=out[row, 2 + n_models : 2 + n_models + dim].copy(),
                prompt_sha256=prompt_sha256(req.text),
                encoder_id=self.encoder_id,
            )
        return results  # type: ignore[return-value]

    def _forward(self, policy: RoutingPolicy, texts: list[str], host: np.ndarray) -> np.ndarray:
        """One encoder forward + one policy forward; returns (B, 2 + K + d) on the host."""
        with torch.inference_mode():
            return self.decide_embedded(policy, self.embed(texts), host)

    def decide_embedded(self, policy: RoutingPolicy, emb: torch.Tensor, host: np.ndarray) -> np.ndarray:
        """Policy forward on device embeddings ``emb`` (B, d) with per-row inputs ``host``
        (B, 2 + K: w_cost, explore flag, candidate mask); returns the packed (B, 2 + K + d)
        host array [action, propensity, probabilities..., embedding...] after ONE copy."""
        with torch.inference_mode():
            inputs = torch.from_numpy(host)
            if self._pin:
                inputs = inputs.pin_memory()
            inputs = inputs.to(self.device, non_blocking=True)
            w_cost, explore, mask = inputs[:, 0], inputs[:, 1] > 0.5, inputs[:, 2:] > 0.5
            logits = policy.logits(emb, w_cost, mask)
            probs = torch.softmax(logits.float(), dim=-1)
            # Explore rows sample from the BOUNDED distribution (policy.exploration) and
            # report it, so the logged propensity is what was really sampled from; greedy
            # rows keep the plain softmax (and propensity 1).
            bounded = bound_probabilities(probs, mask, self.exploration_floor, self.exploration_ceiling)
            probs = torch.where(explore.unsqueeze(1), bounded, probs)
            sampled = torch.multinomial(probs, 1, generator=self._generator).squeeze(1)
            greedy = probs.argmax(dim=-1)
            actions = torch.where(explore, sampled, greedy)
            chosen_p = probs.gather(1, actions.unsqueeze(1)).squeeze(1)
            propensity = torch.where(explore, chosen_p, torch.ones_like(chosen_p))
            packed = torch.cat([actions.unsqueeze(1).float(), propensity.unsqueeze(1), probs, emb.float()], dim=1)
            return packed.cpu().numpy()  # the batch's single device->host copy
